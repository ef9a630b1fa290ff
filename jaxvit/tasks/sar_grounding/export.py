"""PyTorch export of a TerraMind stage-3 run (`SarGrounding.export`): D/terramind.pt, TerraMind with the LoRA
adapters merged, in terratorch's state-dict layout."""
from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import lora

log = logging.getLogger("jaxvit")


def terramind_params(run) -> dict:
    """A stage-3 run's TerraMind weights with its LoRA adapters merged."""
    params = run.variables["params"]["terramind"]
    if "lora" in run.variables:
        params = lora.merge(params, run.variables["lora"]["terramind"], run.model.terramind.cfg.lora_alpha)
    return params


def export_terramind(run, out: Path) -> Path:
    """A TerraMind stage-3 run: D/terramind.pt, TerraMind with the adapters merged in terratorch's state-dict layout
    (`TerraMind.load_state_dict`, or `jaxvit.models.terramind.load_terramind`)."""
    from jaxvit.models.terramind import save_terramind
    save_terramind(run.model.terramind.cfg, terramind_params(run), out / "terramind.pt")
    log.info("exported TerraMind of %s (%s) to %s", run.workdir, run.checkpoint, out)
    return out


def check_terramind_export(run, d: Path, seed: int = 0) -> dict[str, float]:
    """Target-token logits of D/terramind.pt (read back by jaxvit's loader) against the run's model with adapters."""
    from jaxvit.models.terramind import load_terramind
    task, size = run.task, run.cfg.data.image_size
    channels = run.model.terramind.cfg.spec(task.input, "encoder").size
    s1 = jnp.asarray(np.random.default_rng(seed).standard_normal((2, size, size, channels)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = task._terramind(run.model, run.variables, {task.input: s1}, task.s.target, jax.random.key(0), False)
        model, params = load_terramind(d / "terramind.pt", run.model.terramind.cfg)
        got = model.apply({"params": params}, {task.input: s1}, task.s.target)["logits"]
    return {"terramind_rel_diff": float(jnp.abs(got - want).max() / jnp.abs(want).max())}
