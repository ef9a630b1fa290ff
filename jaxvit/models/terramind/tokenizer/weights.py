"""Read and write TerraMind tokenizer checkpoints in terratorch's `DiVAE` state-dict layout.

Released files (`TerraMind_Tokenizer_S2L2A.pt`, ...) are flat state dicts: `encoder.*` (ViTEncoder),
`quant_proj.*` (1x1 conv) and `decoder.*` (PatchedUNetCondCat). Import reports every missing, unexpected and
mis-shaped key; export writes the same keys, so `DiVAE.load_state_dict(strict=True)` takes the result.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import traverse_util

from jaxvit.models import hub
from jaxvit.models.keymap import Entry, _conv, _copy, _fused, _linear, _norm, _path
from jaxvit.models.terramind.tokenizer.config import TokenizerConfig, tokenizer_config
from jaxvit.models.terramind.tokenizer.model import Tokenizer, init_params, param_shapes
from jaxvit.models.terramind.tokenizer.unet import flax_name, unet_plan
from jaxvit.models.weights import (WeightLoadError, export_entries, import_entries, read_checkpoint,
                                   write_state_dict)

# terratorch's tokenizer_register.py: Hugging Face repository and file of each released tokenizer.
HUB_FILES = {
    "terramind_v1_tokenizer_s2l2a": ("ibm-esa-geospatial/TerraMind-1.0-Tokenizer-S2L2A", "TerraMind_Tokenizer_S2L2A.pt"),
    "terramind_v1_tokenizer_s1grd": ("ibm-esa-geospatial/TerraMind-1.0-Tokenizer-S1GRD", "TerraMind_Tokenizer_S1GRD.pt"),
    "terramind_v1_tokenizer_s1rtc": ("ibm-esa-geospatial/TerraMind-1.0-Tokenizer-S1RTC", "TerraMind_Tokenizer_S1RTC.pt"),
    "terramind_v1_tokenizer_dem": ("ibm-esa-geospatial/TerraMind-1.0-Tokenizer-DEM", "TerraMind_Tokenizer_DEM.pt"),
    "terramind_v1_tokenizer_ndvi": ("ibm-esa-geospatial/TerraMind-1.0-Tokenizer-NDVI", "TerraMind_Tokenizer_NDVI.pt"),
}


def _conv1d(key: str, path: str) -> Entry:
    """torch Conv1d(kernel 1) weight [out, in, 1] <-> Linear kernel [in, out]."""
    return Entry(key, (_path(path),), lambda t: [t[:, :, 0].T], lambda a: a[0].T[:, :, None])


def _conv2d(prefix: str, path: str) -> list[Entry]:
    return [_conv(f"{prefix}.weight", f"{path}/kernel"), _copy(f"{prefix}.bias", f"{path}/bias")]


def _encoder_entries(cfg: TokenizerConfig) -> list[Entry]:
    e = [Entry("encoder.pos_emb", (("encoder", "pos_emb"),), lambda t: [t[0].transpose(1, 2, 0)],
               lambda a: a[0].transpose(2, 0, 1)[None])]
    e += _conv2d("encoder.proj", "encoder/proj")
    for i in range(cfg.enc_depth):
        t, p = f"encoder.blocks.{i}.", f"encoder/blocks_{i}/"
        e += _norm(t + "norm1", p + "norm1") + _norm(t + "norm2", p + "norm2")
        e += _fused(t + "attn.qkv", [p + "attention/" + n for n in ("query", "key", "value")], [True] * 3)
        e += _linear(t + "attn.proj", p + "attention/dense", True)
        e += _linear(t + "mlp.fc1", p + "mlp/fc1", True) + _linear(t + "mlp.fc2", p + "mlp/fc2", True)
    if cfg.post_mlp:
        e += _norm("encoder.norm_mlp", "encoder/norm_mlp")
        e += _linear("encoder.post_mlp.fc1", "encoder/post_mlp_fc1", True)
        e += _linear("encoder.post_mlp.fc2", "encoder/post_mlp_fc2", True)
    e.append(Entry("quant_proj.weight", (("quant_proj", "kernel"),), lambda t: [t[:, :, 0, 0].T],
                   lambda a: a[0].T[:, :, None, None]))
    e.append(_copy("quant_proj.bias", "quant_proj/bias"))
    return e


def _decoder_entries(cfg: TokenizerConfig) -> list[Entry]:
    e = _linear("decoder.time_embed.0", "decoder/time_embed_0", True)
    e += _linear("decoder.time_embed.2", "decoder/time_embed_2", True)
    inputs, middle, outputs = unet_plan(cfg)
    for prefix, kind, cin, cout in [layer for group in inputs + [middle] + outputs for layer in group]:
        t, p = f"decoder.{prefix}.", f"decoder/{flax_name(prefix)}/"
        if kind == "conv":
            e += _conv2d(t[:-1], p[:-1])
        elif kind == "down":
            e += _conv2d(t + "op", p[:-1])
        elif kind == "up":
            e += _conv2d(t + "conv", p[:-1])
        elif kind == "attn":
            e += _norm(t + "norm", p + "norm")
            e += [_conv1d(t + "qkv.weight", p + "qkv/kernel"), _copy(t + "qkv.bias", p + "qkv/bias")]
            e += [_conv1d(t + "proj_out.weight", p + "proj_out/kernel"),
                  _copy(t + "proj_out.bias", p + "proj_out/bias")]
        else:  # res
            e += _norm(t + "in_layers.0", p + "in_norm") + _conv2d(t + "in_layers.2", p + "in_conv")
            e += _linear(t + "emb_layers.1", p + "emb_proj", True)
            e += _norm(t + "out_layers.0", p + "out_norm") + _conv2d(t + "out_layers.3", p + "out_conv")
            if cin != cout:
                e += _conv2d(t + "skip_connection", p + "skip")
    e += _norm("decoder.out.0", "decoder/out_0") + _conv2d("decoder.out.2", "decoder/out_2")
    return e


def entries(cfg: TokenizerConfig) -> list[Entry]:
    return _encoder_entries(cfg) + _decoder_entries(cfg)


def import_params(cfg: TokenizerConfig, sd: dict[str, np.ndarray], *, strict: bool = True,
                  where: str = "checkpoint") -> dict:
    """Nested float32 params from a DiVAE state dict. Missing, unexpected or mis-shaped keys raise (strict) or,
    with strict=False, are logged and the missing ones taken from a fresh init; shape mismatches always raise."""
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(param_shapes(cfg)).items()}
    return import_entries(entries(cfg), sd, expected, lambda: {"params": init_params(cfg)}, strict=strict,
                          where=where, hint=f"pick the matching tokenizer name (this config: channels={cfg.channels}, "
                                            f"enc_dim={cfg.enc_dim}, dec_channels={cfg.dec_channels})")


def export_state_dict(cfg: TokenizerConfig, params: dict) -> dict[str, np.ndarray]:
    return export_entries(entries(cfg), params)


def _resolve(source: str | os.PathLike) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    key = str(source) if str(source) in HUB_FILES else f"terramind_v1_tokenizer_{str(source).lower()}"
    if key not in HUB_FILES:
        raise WeightLoadError(f"{source}: no such file, and not a released tokenizer ({', '.join(HUB_FILES)})")
    return hub.file(*HUB_FILES[key])


def load_tokenizer(source: str | os.PathLike, name: str | TokenizerConfig | None = None, *, strict: bool = True,
                   **overrides) -> tuple[Tokenizer, dict]:
    """(module, params) from a DiVAE checkpoint (.pt / .pth / .safetensors) or a released tokenizer name (downloaded,
    or from the local Hugging Face cache offline). `name` picks the architecture (default: `source` when it is a released name);
    `overrides` set config fields that do not change weights (dtype, thresholding, ...)."""
    path = _resolve(source)
    if name is None:
        if Path(str(source)).exists():
            raise WeightLoadError(f"{source}: say which tokenizer it holds (name='s2l2a', 's1grd', 's1rtc', ...)")
        name = str(source)
    cfg = tokenizer_config(name, **overrides)
    sd, _, _, _ = read_checkpoint(path)
    return Tokenizer(cfg), import_params(cfg, sd, strict=strict, where=str(path))


def save_tokenizer(cfg: TokenizerConfig, params: dict, path: str | os.PathLike) -> Path:
    """Write params with terratorch's keys: a torch pickle (.pt/.pth, needs torch) or .safetensors."""
    return write_state_dict(export_state_dict(cfg, params), path)
