"""`load_pretrained` / `save_pretrained`: a ViT (`jaxvit.models.weights`) or a Depth Anything model
(`jaxvit.models.depth_weights`), chosen by the checkpoint's config or the model given."""
from __future__ import annotations

import json
import os
from pathlib import Path

from jaxvit.models import depth_weights
from jaxvit.models.depth_anything import DepthAnything, DepthAnythingConfig
from jaxvit.models.variants import HUB_IDS, get_config
from jaxvit.models.vit import ViT, ViTConfig
from jaxvit.models.weights import (WeightLoadError, official_backbone, config_from_hf, config_to_hf,
                                   export_state_dict, import_params, infer_official_config, read_checkpoint,
                                   write_state_dict)


def load_pretrained(source: str | os.PathLike, arch: str | ViTConfig | None = None, *, strict: bool = True,
                    which: str = "teacher", **overrides) -> tuple[ViT | DepthAnything, dict]:
    """(module, params) from a transformers directory, a hub id (downloaded, or from the cache offline), or an
    original .pth / .safetensors.

    `arch` (a preset name or ViTConfig) overrides the architecture read from config.json or inferred from
    shapes; `overrides` set ViTConfig fields that do not change weights (dtype, remat, drop_path, ...).
    `which` picks the teacher or student of an original training checkpoint. A transformers Depth Anything
    checkpoint (model_type depth_anything) gives a `DepthAnything` module instead (`jaxvit.models.depth_weights`).
    """
    sd, fmt, hf_cfg, path = read_checkpoint(source)
    if hf_cfg is not None and depth_weights.is_depth_anything(hf_cfg):
        if arch is not None:
            raise WeightLoadError(f"{path}: a Depth Anything checkpoint takes its architecture from config.json; "
                                  "leave arch unset")
        return depth_weights.from_state_dict(sd, hf_cfg, strict=strict, where=str(path), **overrides)
    if fmt == "official":
        sd = official_backbone(sd, which)
    if arch is not None:
        cfg = get_config(arch)
    elif hf_cfg is not None:
        cfg = config_from_hf(hf_cfg)
    elif fmt == "official":
        cfg = infer_official_config(sd)
    else:
        cfg = get_config(HUB_IDS[str(source)])
    cfg = get_config(cfg, **overrides)
    params = import_params(cfg, sd, fmt, strict=strict, where=str(path))
    return ViT(cfg), params


def save_pretrained(model: ViT | ViTConfig | DepthAnything | DepthAnythingConfig, params: dict,
                    out_dir: str | os.PathLike, format: str = "hf") -> Path:
    """Write params for PyTorch: "hf" -> config.json + model.safetensors (transformers.AutoModel loads it;
    a Depth Anything model: DepthAnythingForDepthEstimation); "official" -> model.pth with the original
    repository's keys (needs torch; ViT only)."""
    if isinstance(model, (DepthAnything, DepthAnythingConfig)):
        if format != "hf":
            raise WeightLoadError(f"format={format!r}: Depth Anything exports to the transformers layout ('hf') only")
        return depth_weights.save(model, params, out_dir)
    cfg = model.cfg if isinstance(model, ViT) else model
    out = Path(out_dir)
    sd = export_state_dict(cfg, params, format)
    if format == "hf":
        write_state_dict(sd, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(config_to_hf(cfg) | {"torch_dtype": "float32"}, indent=2))
    else:
        write_state_dict(sd, out / "model.pth")
    return out
