"""Depth Anything weights: transformers `DepthAnythingForDepthEstimation` directories <-> `DepthAnything` params.

Torch keys: `backbone.` + the DINOv2 on-disk names (see `keymap.entries`), `neck.reassemble_stage.layers.{i}.
{projection,resize}`, `neck.convs.{i}`, `neck.fusion_stage.layers.{i}.{projection,residual_layer{1,2}.
convolution{1,2}}`, `head.conv{1,2,3}`. `jaxvit.models.load_pretrained` and `save_pretrained` dispatch here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvit.models import keymap, weights
from jaxvit.models.depth_anything import DepthAnything, DepthAnythingConfig
from jaxvit.models.keymap import Entry
from jaxvit.models.variants import get_config
from jaxvit.models.weights import WeightLoadError

# transformers' defaults for fields a config.json may leave out (Dinov2Config, DepthAnythingConfig).
_DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                        layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                        layerscale_value=1.0, use_swiglu_ffn=False, apply_layernorm=True)
_DEFAULTS = dict(patch_size=14, reassemble_factors=(4, 2, 1, 0.5), neck_hidden_sizes=(48, 96, 192, 384),
                 fusion_hidden_size=64, head_in_index=-1, head_hidden_size=32, depth_estimation_type="relative",
                 max_depth=1)


def is_depth_anything(hf: dict) -> bool:
    return hf.get("model_type") == "depth_anything" or "DepthAnythingForDepthEstimation" in (
        hf.get("architectures") or [])


# ---------------------------------------------------------------------------------------------- configs

def config_from_hf(hf: dict, where: str = "config.json") -> DepthAnythingConfig:
    hf = _DEFAULTS | {k: v for k, v in hf.items() if v is not None}
    bb = hf.get("backbone_config")
    if not bb:
        raise WeightLoadError(f"{where}: Depth Anything without a backbone_config (a named timm/hub backbone) is "
                              "not supported; jaxvit reads DINOv2 backbones described in config.json")
    if bb.get("model_type", "dinov2") != "dinov2":
        raise WeightLoadError(f"{where}: backbone_config.model_type={bb.get('model_type')!r}; Depth Anything "
                              "is supported on a dinov2 backbone only")
    bb = _DINOV2_DEFAULTS | {k: v for k, v in bb.items() if v is not None}
    out_indices = bb.get("out_indices") or [int(s.removeprefix("stage")) for s in bb.get("out_features") or []]
    vit = weights.config_from_hf(bb)
    if hf["patch_size"] != vit.patch_size:
        raise WeightLoadError(f"{where}: patch_size {hf['patch_size']} differs from the backbone's {vit.patch_size}")
    if hf.get("reassemble_hidden_size", vit.hidden_size) != vit.hidden_size:
        raise WeightLoadError(f"{where}: reassemble_hidden_size {hf['reassemble_hidden_size']} differs from the "
                              f"backbone width {vit.hidden_size}")
    try:
        return DepthAnythingConfig(
            backbone=vit, out_indices=tuple(out_indices or [vit.depth]), apply_layernorm=bb["apply_layernorm"],
            reassemble_factors=tuple(hf["reassemble_factors"]), neck_hidden_sizes=tuple(hf["neck_hidden_sizes"]),
            fusion_hidden_size=hf["fusion_hidden_size"], head_in_index=hf["head_in_index"],
            head_hidden_size=hf["head_hidden_size"], depth_estimation_type=hf["depth_estimation_type"],
            max_depth=float(hf["max_depth"]))
    except ValueError as e:
        raise WeightLoadError(f"{where}: {e}") from e


def config_to_hf(cfg: DepthAnythingConfig) -> dict:
    """transformers config.json (DepthAnythingConfig) for `cfg`; the backbone must be a plain DINOv2.
    max_depth is written as an int when it is one (transformers 5 validates it as int)."""
    vit = cfg.backbone
    if vit.family != "dinov2" or vit.num_registers:
        raise WeightLoadError("transformers' Depth Anything takes a DINOv2 backbone without registers; this one is "
                              f"family={vit.family!r} with {vit.num_registers} registers")
    backbone = weights.config_to_hf(vit) | dict(
        out_indices=list(cfg.out_indices), out_features=[f"stage{i}" for i in cfg.out_indices],
        reshape_hidden_states=False, apply_layernorm=cfg.apply_layernorm)
    backbone.pop("architectures")
    return dict(model_type="depth_anything", architectures=["DepthAnythingForDepthEstimation"],
                 backbone_config=backbone, patch_size=vit.patch_size, reassemble_hidden_size=vit.hidden_size,
                 reassemble_factors=list(cfg.reassemble_factors), neck_hidden_sizes=list(cfg.neck_hidden_sizes),
                 fusion_hidden_size=cfg.fusion_hidden_size, head_in_index=cfg.head_in_index,
                 head_hidden_size=cfg.head_hidden_size, depth_estimation_type=cfg.depth_estimation_type,
                 max_depth=int(cfg.max_depth) if cfg.max_depth == int(cfg.max_depth) else cfg.max_depth)


# ---------------------------------------------------------------------------------------------- key map

def _conv_transpose(key: str, path: str) -> Entry:
    """torch ConvTranspose2d (in, out, kh, kw) <-> (kh, kw, in, out); the same permutation both ways."""
    return Entry(key, (tuple(path.split("/")),), lambda t: [t.transpose(2, 3, 0, 1)],
                 lambda a: a[0].transpose(2, 3, 0, 1))


def _conv(key: str, path: str, bias: bool = True) -> list[Entry]:
    out = [keymap._conv(f"{key}.weight", f"{path}/kernel")]
    return out + [keymap._copy(f"{key}.bias", f"{path}/bias")] if bias else out


def entries(cfg: DepthAnythingConfig) -> list[Entry]:
    """Every torch tensor of a DepthAnythingForDepthEstimation of config `cfg` and its jaxvit leaves."""
    e = [dataclasses.replace(b, key="backbone." + b.key, paths=tuple(("backbone",) + p for p in b.paths))
         for b in keymap.entries(cfg.backbone, "hf")]
    for i, factor in enumerate(cfg.reassemble_factors):
        t, p = f"neck.reassemble_stage.layers.{i}.", f"neck/reassemble_{i}/"
        e += _conv(t + "projection", p + "projection")
        if factor > 1:
            e += [_conv_transpose(t + "resize.weight", p + "resize/kernel"),
                  keymap._copy(t + "resize.bias", p + "resize/bias")]
        elif factor < 1:
            e += _conv(t + "resize", p + "resize")
        e += _conv(f"neck.convs.{i}", f"neck/conv_{i}", bias=False)
        t, p = f"neck.fusion_stage.layers.{i}.", f"neck/fusion_{i}/"
        e += _conv(t + "projection", p + "projection")
        for unit in ("residual_layer1", "residual_layer2"):
            for conv in ("convolution1", "convolution2"):
                e += _conv(f"{t}{unit}.{conv}", f"{p}{unit}/{conv}")
    for conv in ("conv1", "conv2", "conv3"):
        e += _conv(f"head.{conv}", f"head/{conv}")
    return e


# ---------------------------------------------------------------------------------------- import/export

def _init(cfg: DepthAnythingConfig):
    size = 2 * cfg.backbone.patch_size
    x = jnp.zeros((1, size, size, cfg.backbone.num_channels))
    return lambda: DepthAnything(cfg).init(jax.random.key(0), x)


def from_state_dict(sd: dict[str, np.ndarray], hf: dict, *, strict: bool = True, where: str = "checkpoint",
                    **overrides) -> tuple[DepthAnything, dict]:
    """(module, params) from a transformers Depth Anything state dict and config.json; `overrides` set backbone
    ViTConfig fields that do not change weights (dtype, remat, attn_impl, ...)."""
    cfg = config_from_hf(hf, where)
    cfg = dataclasses.replace(cfg, backbone=get_config(cfg.backbone, **overrides))
    init = _init(cfg)
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(jax.eval_shape(init)["params"]).items()}
    params = weights.import_entries(entries(cfg), sd, shapes, init, strict=strict, where=where)
    return DepthAnything(cfg), params


def save(model: DepthAnything | DepthAnythingConfig, params: dict, out_dir: str | os.PathLike) -> Path:
    """config.json + model.safetensors that `DepthAnythingForDepthEstimation.from_pretrained` loads."""
    cfg = model.cfg if isinstance(model, DepthAnything) else model
    out = Path(out_dir)
    weights.write_state_dict(weights.export_entries(entries(cfg), params), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg) | {"torch_dtype": "float32"}, indent=2))
    return out
