"""Loading a training run's outputs: config, classes, model and the weights of one checkpoint.

    run = load_run("runs/gz2", "best_acc")      # or "best_f1", "final", "periodic" (newest), or a step: 1200
    logits = run.model.apply(run.variables, images)

`variables` are the evaluation weights ({"params": {"backbone", "head"}[, "lora"]}): the EMA weights when the
run used EMA, exactly as `jaxvit.train.eval_variables` picks them during training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxvit import lora
from jaxvit import train as train_lib  # a module import: train imports evaluate, which imports this
from jaxvit.config import base_config
from jaxvit.data.sources import ImageFolder
from jaxvit.models import WeightLoadError
from jaxvit.models.heads import Classifier

log = logging.getLogger("jaxvit")

NAMED = ("best_acc", "best_f1", "final")
_KEEP = ("step", "trainable", "frozen", "ema")  # all of the state that evaluation needs (no optimizer state)


@dataclasses.dataclass
class Run:
    workdir: Path
    cfg: mlc.ConfigDict
    classes: list[str]
    model: Classifier
    variables: dict
    checkpoint: str  # "<name>/<step>", e.g. "best_acc/1200"
    step: int
    ema: bool  # whether `variables` hold EMA weights

    def backbone_params(self) -> dict:
        return merged_backbone(self.model, self.variables)


def backbone_variables(variables: dict) -> dict:
    """The backbone's part of classifier variables, for `ViT.apply` (LoRA adapters kept separate)."""
    return {col: tree["backbone"] for col, tree in variables.items() if "backbone" in tree}


def merged_backbone(model: Classifier, variables: dict) -> dict:
    """Backbone params with any LoRA adapters merged in: plain ViT weights."""
    params = variables["params"]["backbone"]
    if "lora" in variables:
        params = lora.merge(params, variables["lora"]["backbone"], model.backbone.lora_alpha)
    return params


def setup_logging() -> None:
    """INFO logs for the command-line tools, without the libraries' chatter."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet(logger: logging.Logger, level: int):
    """Raise `logger`'s level for the duration of the block."""
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _update(cfg: mlc.ConfigDict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), mlc.ConfigDict):
            _update(cfg[k], v)
        else:
            cfg[k] = tuple(v) if isinstance(v, list) else v


def load_config(workdir: str | Path) -> mlc.ConfigDict:
    """The run's resolved config (`config.json`) over today's defaults, so keys added since still exist."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a jaxvit run directory?")
    cfg = base_config()
    _update(cfg, json.loads(path.read_text()))
    return cfg


def load_classes(workdir: str | Path, cfg: mlc.ConfigDict) -> list[str]:
    """Class names in label order: `classes.json`, else the config, else the training split's directories."""
    path = Path(workdir) / "classes.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    if cfg.data.classes:
        return list(cfg.data.classes)
    return ImageFolder(cfg.data.data_dir, "train").classes


def _steps(directory: Path) -> list[int]:
    """Finalised orbax steps under `directory` (temporary, unfinished saves have non-numeric names)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def find_checkpoint(workdir: str | Path, checkpoint: str | int = "best_acc") -> tuple[str, int, Path]:
    """(name, step, state directory) for a checkpoint name (newest step) or a step number (any kind)."""
    root = Path(workdir) / "checkpoints"
    kinds = {d.name: _steps(d) for d in sorted(root.iterdir())} if root.is_dir() else {}
    available = ", ".join(f"{k} {v}" for k, v in kinds.items() if v) or "none"
    spec = str(checkpoint)
    if spec.isdigit():
        step = int(spec)
        name = next((k for k in ("periodic", *NAMED) if step in kinds.get(k, [])), None)
    else:
        name, step = spec, (kinds.get(spec) or [None])[-1]
    if name is None or step is None:
        raise FileNotFoundError(f"no checkpoint {spec!r} under {root}; available: {available}")
    return name, step, root / name / str(step) / "state"


def restore_state(state_dir: Path) -> dict:
    """{step, trainable, frozen[, ema]} of a saved train state as numpy arrays (the optimizer state is
    skipped, so this needs about the model's size in memory, on any number of devices)."""
    ckptr = ocp.PyTreeCheckpointer()
    # orbax warns that the step's metadata file is not in the item directory (the manager keeps it one up)
    with _quiet(logging.getLogger("absl"), logging.ERROR):
        saved = ckptr.metadata(state_dir).item_metadata
        item = {k: saved[k] for k in _KEEP if k in saved}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                    partial_restore=True))


def _check_matches(template: dict, variables: dict, where: str) -> None:
    want = {k: v.shape for k, v in traverse_util.flatten_dict(template).items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}
    problems = [f"missing {'/'.join(k)}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {'/'.join(k)}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{'/'.join(k)}: checkpoint {got[k]}, model {want[k]}" for k in sorted(want.keys() & got.keys())
                 if want[k] != got[k]]
    if problems:
        raise ValueError(f"{where} does not match the model its config.json describes:\n  "
                         + "\n  ".join(problems[:20]))


def build_for_run(cfg: mlc.ConfigDict, num_classes: int) -> tuple[Classifier, dict]:
    """The run's model, built as training built it, and the shapes of its variables (abstract: nothing is
    initialised or compiled). Where the pretrained weights are not available here, the architecture comes from
    `model.arch` + `model.overrides` instead (the weights come from the checkpoint either way; a mismatch is
    then reported by shape)."""
    def build(c: mlc.ConfigDict) -> tuple[Classifier, dict]:
        built = {}

        def variables():
            built["model"], v = train_lib.build_model(c, num_classes, jax.random.key(c.seed))
            return v
        with _quiet(log, logging.WARNING):  # build_model's "initialised fresh ..." is about the template only
            shapes = jax.eval_shape(variables)
        return built["model"], shapes

    try:
        return build(cfg)
    except (WeightLoadError, FileNotFoundError) as e:
        log.warning("pretrained weights %r not available (%s); using the architecture of model.arch=%r",
                    cfg.model.pretrained, e, cfg.model.arch)
        cfg = cfg.copy_and_resolve_references()
        cfg.model.pretrained = ""
        return build(cfg)


def load_run(workdir: str | Path, checkpoint: str | int = "best_acc", data_dir: str | None = None) -> Run:
    """Config, classes, model and evaluation variables of `checkpoint` (see `find_checkpoint`).
    `data_dir` replaces the data directory recorded in the config."""
    workdir = Path(workdir).absolute()  # orbax needs absolute paths
    cfg = load_config(workdir)
    if data_dir:
        cfg.data.data_dir = str(data_dir)
    cfg.data.synthetic = False  # never re-render a data set when only reading a run
    classes = load_classes(workdir, cfg)
    name, step, state_dir = find_checkpoint(workdir, checkpoint)
    model, template = build_for_run(cfg, len(classes))
    state = restore_state(state_dir)
    variables = train_lib.eval_variables(state)
    _check_matches(template, variables, str(state_dir))
    log.info("loaded %s (%s, step %d%s)", workdir, name, step, ", EMA weights" if "ema" in state else "")
    return Run(workdir, cfg, classes, model, variables, f"{name}/{step}", step, "ema" in state)


def describe(run: Run) -> dict[str, Any]:
    """What identifies the weights used, for result files."""
    return {"workdir": str(run.workdir), "checkpoint": run.checkpoint, "ema": run.ema}
