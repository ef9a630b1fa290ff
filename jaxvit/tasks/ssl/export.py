"""PyTorch export of an SSL run (`SSL.export`): the teacher as D/model (transformers) and D/teacher_checkpoint.pth,
the official DINOv2 training format."""
from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.models import ViT, load_pretrained, save_pretrained
from jaxvit.models.weights import export_state_dict

log = logging.getLogger("jaxvit")


def ssl_head_state_dict(head: dict) -> dict[str, np.ndarray]:
    """A jaxvit DINO/iBOT head as the official DINOHead's state dict (mlp.{0,2,4}, last_layer[.weight_g/_v])."""
    sd, step = {}, 3 if "bn_0" in head else 2  # Sequential(Linear, [BatchNorm1d,] GELU, ..., Linear)
    for i in range(len([k for k in head if k.startswith("mlp_")])):
        sd[f"mlp.{step * i}.weight"] = np.asarray(head[f"mlp_{i}"]["kernel"], np.float32).T
        sd[f"mlp.{step * i}.bias"] = np.asarray(head[f"mlp_{i}"]["bias"], np.float32)
        if f"bn_{i}" in head:  # batch statistics only: no running mean / var to export
            sd[f"mlp.{step * i + 1}.weight"] = np.asarray(head[f"bn_{i}"]["scale"], np.float32)
            sd[f"mlp.{step * i + 1}.bias"] = np.asarray(head[f"bn_{i}"]["bias"], np.float32)
    kernel = np.asarray(head["kernel"], np.float32).T
    if "weight_g" in head:
        sd["last_layer.weight_g"] = np.asarray(head["weight_g"], np.float32)[:, None]
        sd["last_layer.weight_v"] = kernel
    else:
        sd["last_layer.weight"] = kernel
    return sd


def export_ssl(run, out: Path) -> Path:
    """An SSL run's teacher: D/model (transformers) and D/teacher_checkpoint.pth, the official training format
    ({"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}; `jaxvit.models.load_pretrained` and the DINOCell
    task read its backbone)."""
    import torch
    teacher = run.variables["teacher"]
    vit_cfg = run.model.backbone
    save_pretrained(vit_cfg, teacher["backbone"], out / "model")
    sd = {f"backbone.{k}": v for k, v in export_state_dict(vit_cfg, teacher["backbone"], "official").items()}
    for name in ("dino_head", "ibot_head"):
        if name in teacher:
            sd.update({f"{name}.{k}": v for k, v in ssl_head_state_dict(teacher[name]).items()})
    torch.save({"teacher": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
               out / "teacher_checkpoint.pth")
    log.info("exported the teacher of %s (%s) to %s", run.workdir, run.checkpoint, out)
    return out


def check_ssl_export(run, d: Path, x: np.ndarray) -> dict[str, float]:
    """The teacher's features from D/model (transformers) and from D/teacher_checkpoint.pth (read back by
    jaxvit's loader) against the Flax teacher."""
    import torch
    from transformers import AutoModel
    teacher = run.variables["teacher"]["backbone"]
    with jax.default_matmul_precision("highest"):
        want = np.asarray(ViT(run.model.backbone).apply({"params": teacher}, jnp.asarray(x))["last_hidden_state"])
        # the official format has no config: the head count is inferred (width / 64) unless given, as here
        vit, params = load_pretrained(d / "teacher_checkpoint.pth", run.model.backbone)
        reread = np.asarray(vit.apply({"params": params}, jnp.asarray(x))["last_hidden_state"])
    with torch.no_grad():
        got = AutoModel.from_pretrained(d / "model").eval()(
            pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    scale = np.abs(want).max()
    return {"transformers_rel_diff": float(np.abs(got - want).max() / scale),
            "teacher_checkpoint_rel_diff": float(np.abs(reread - want).max() / scale)}
