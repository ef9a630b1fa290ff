"""TerraMind checkpoints (terratorch `TerraMind.state_dict()`, e.g. `TerraMind_v1_base.pt`) <-> jaxvit params.

The torch layout has, besides the parameters, derived buffers (the fixed sin-cos `pos_emb` of every embedding,
and zero `bias` buffers of its bias-free LayerNorms) and tied copies (`decoder_embeddings.<m>.to_logits.weight`
is `token_emb.weight`; `decoder_embeddings.<m>.mod_emb` is the encoder's). Import checks buffers and ties
against the model and reports every missing, unexpected or mis-shaped key; export writes all of them back.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from jaxvit.models.keymap import Entry, _copy, _linear
from jaxvit.models.terramind.config import IMAGE, KNOWN, SEQUENCE, TOKENS, ModalitySpec, TerraMindConfig
from jaxvit.models.terramind.embeddings import sincos_1d, sincos_2d
from jaxvit.models.terramind.model import TerraMind, init_params, param_shapes
from jaxvit.models.weights import WeightLoadError, export_entries, import_entries, read_checkpoint, write_state_dict

log = logging.getLogger(__name__)


def _norm(prefix: str, path: str) -> Entry:
    return _copy(f"{prefix}.weight", f"{path}/scale")


def _block(cfg: TerraMindConfig, t: str, p: str, attn: str) -> list[Entry]:
    e = [_norm(t + "norm1", p + "norm1"), _norm(t + "norm2", p + "norm2")]
    e += _linear(f"{t}{attn}.qkv", f"{p}{attn}/qkv", cfg.qkv_bias)
    e += _linear(f"{t}{attn}.proj", f"{p}{attn}/proj", cfg.proj_bias)
    for fc in ("fc1", "fc2") + (("fc3",) if cfg.gated_mlp else ()):
        e += _linear(f"{t}mlp.{fc}", f"{p}mlp/{fc}", cfg.mlp_bias)
    return e


def entries(cfg: TerraMindConfig) -> list[Entry]:
    """Every torch parameter key of `cfg` and the jaxvit leaf it maps to (tied keys share a leaf)."""
    e: list[Entry] = []
    for side, specs in (("encoder", cfg.encoder_modalities), ("decoder", cfg.decoder_modalities)):
        for spec in specs:
            t, p = f"{side}_embeddings.{spec.key}.", f"{side}_embeddings/{spec.key}/"
            if spec.kind == IMAGE:  # encoder side only (TerraMindConfig checks)
                e += _linear(t + "proj", p + "proj", False)
            else:
                e.append(_copy(t + "token_emb.weight", p + "token_emb/embedding"))
            if side == "decoder":
                e.append(_copy(t + "to_logits.weight", p + "token_emb/embedding"))
            e.append(_copy(t + "mod_emb", f"mod_emb/{spec.key}"))
    for i in range(cfg.encoder_depth):
        e += _block(cfg, f"encoder.{i}.", f"encoder/layer_{i}/", "attn")
    for i in range(cfg.decoder_depth):
        t, p = f"decoder.{i}.", f"decoder/layer_{i}/"
        e += _block(cfg, t, p, "self_attn") + [_norm(t + n, p + n) for n in ("query_norm", "context_norm")]
        for n, bias in (("q", cfg.qkv_bias), ("kv", cfg.qkv_bias), ("proj", cfg.proj_bias)):
            e += _linear(f"{t}cross_attn.{n}", f"{p}cross_attn/{n}", bias)
    e += [_norm("encoder_norm", "encoder_norm"), _norm("decoder_norm", "decoder_norm"),
          _copy("mask_token", "mask_token")] + _linear("decoder_proj_context", "decoder_proj_context", True)
    return e


def buffers(cfg: TerraMindConfig) -> dict[str, np.ndarray]:
    """The derived buffers of the torch module: position tables and the zero biases of the LayerNorms."""
    out = {}
    for side, specs in (("encoder", cfg.encoder_modalities), ("decoder", cfg.decoder_modalities)):
        for s in specs:
            # terratorch slices its 512-row 1-D table with [:max_length] on the batch axis: all 512 rows stay.
            table = sincos_1d(512, cfg.dim) if s.kind == SEQUENCE else sincos_2d(cfg.grid, cfg.grid, cfg.dim)
            out[f"{side}_embeddings.{s.key}.pos_emb"] = table[None]
    norms = [e.key for e in entries(cfg) if e.paths[0][-1] == "scale"]
    return out | {k.removesuffix(".weight") + ".bias": np.zeros(cfg.dim, np.float32) for k in norms}


def import_params(cfg: TerraMindConfig, sd: dict[str, np.ndarray], *, strict: bool = True,
                  where: str = "checkpoint") -> dict:
    """Nested float32 params from a TerraMind state dict. Missing, unexpected and mis-shaped keys, buffers that
    differ from the model's and tied copies that differ from each other are all reported by name."""
    return import_entries(entries(cfg), sd, param_shapes(cfg), lambda: {"params": init_params(cfg)},
                          strict=strict, where=where, buffers=buffers(cfg), hint="check the size and modalities")


def export_state_dict(cfg: TerraMindConfig, params: dict) -> dict[str, np.ndarray]:
    """The terratorch state dict (parameters, tied copies and buffers) of `params`, float32."""
    return export_entries(entries(cfg), params) | buffers(cfg)


def _modalities(sd: dict, side: str, patch: int) -> tuple[ModalitySpec, ...]:
    keys = dict.fromkeys(m.group(1) for k in sd if (m := re.match(rf"{side}_embeddings\.(.+?)\.mod_emb$", k)))
    out = []
    for key in keys:
        t = f"{side}_embeddings.{key}."
        if t + "proj.weight" in sd:
            out.append(ModalitySpec(key, IMAGE, sd[t + "proj.weight"].shape[1] // patch ** 2))
            continue
        kind = KNOWN[key].kind if key in KNOWN else (TOKENS if "@" in key else SEQUENCE)
        length = (KNOWN[key].max_length if key in KNOWN else 512) if kind == SEQUENCE else 0
        out.append(ModalitySpec(key, kind, sd[t + "token_emb.weight"].shape[0], length))
    return tuple(out)


def infer_config(sd: dict[str, np.ndarray], patch_size: int = 16, **overrides) -> TerraMindConfig:
    """The architecture and modalities of a TerraMind state dict, from its keys and shapes (heads: dim / 64, as
    in every released size)."""
    if "mask_token" not in sd or "encoder.0.norm1.weight" not in sd:
        raise WeightLoadError(f"not a TerraMind state dict: no mask_token / encoder.0.norm1.weight "
                              f"(first keys: {sorted(sd)[:8]})")
    dim = sd["mask_token"].shape[-1]
    depth = {s: 1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"{s}\.(\d+)\.", k)))
             for s in ("encoder", "decoder")}
    gated = "encoder.0.mlp.fc3.weight" in sd
    hidden = sd["encoder.0.mlp.fc1.weight"].shape[0]
    ratio = next((r for r in (4.0, hidden / dim, 1.5 * hidden / dim)
                  if (int(2 * int(dim * r) / 3) if gated else int(dim * r)) == hidden), None)
    if ratio is None:
        raise WeightLoadError(f"MLP width {hidden} of encoder.0.mlp.fc1 fits no mlp_ratio for dim {dim}")
    encoder, decoder = _modalities(sd, "encoder", patch_size), _modalities(sd, "decoder", patch_size)
    grids = [sd[f"encoder_embeddings.{m.key}.pos_emb"].shape[1] for m in encoder
             if m.kind != SEQUENCE and f"encoder_embeddings.{m.key}.pos_emb" in sd]
    image_size = int(round(grids[0] ** 0.5)) * patch_size if grids else 224
    fields = dict(dim=dim, encoder_depth=depth["encoder"], decoder_depth=depth["decoder"], num_heads=max(dim // 64, 1),
                  mlp_ratio=ratio, gated_mlp=gated, act="silu" if gated else "gelu",
                  qkv_bias="encoder.0.attn.qkv.bias" in sd, proj_bias="encoder.0.attn.proj.bias" in sd,
                  mlp_bias="encoder.0.mlp.fc1.bias" in sd, patch_size=patch_size, image_size=image_size,
                  encoder_modalities=encoder, decoder_modalities=decoder)
    return TerraMindConfig(**(fields | overrides))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A TerraMind state dict from a .pt/.pth or .safetensors file; a terratorch generation wrapper's
    `sampler.model.` prefix is removed and its `tokenizer.` weights are left to the tokenizer loaders."""
    sd, _, _, resolved = read_checkpoint(path)
    if resolved.is_dir():  # a hub id (ibm-esa-geospatial/TerraMind-1.0-base): its one checkpoint file
        files = [f for f in resolved.iterdir() if f.suffix in (".pt", ".pth", ".safetensors")]
        if len(files) != 1:
            raise WeightLoadError(f"{resolved}: expected one TerraMind checkpoint file (e.g. TerraMind_v1_base.pt), "
                                  f"found {sorted(f.name for f in files)}")
        sd, _, _, resolved = read_checkpoint(files[0])
    sd = {re.sub(r"^sampler\.model\.", "", k): v for k, v in sd.items()}
    tokenizer = [k for k in sd if k.startswith("tokenizer.")]
    if tokenizer:
        log.info("%s: skipping %d tokenizer tensors", path, len(tokenizer))
    return {k: v for k, v in sd.items() if not k.startswith("tokenizer.")}


def load_terramind(path: str | os.PathLike, cfg: TerraMindConfig | None = None, *, strict: bool = True,
                   **overrides) -> tuple[TerraMind, dict]:
    """(module, params) from a TerraMind checkpoint. Without `cfg` the architecture and modalities are read from
    the file; `overrides` set fields that do not change weights (dtype, remat, lora_alpha, ...)."""
    sd = read_state_dict(path)
    cfg = infer_config(sd, **overrides) if cfg is None else cfg
    return TerraMind(cfg), import_params(cfg, sd, strict=strict, where=str(path))


def save_terramind(cfg: TerraMindConfig, params: dict, path: str | os.PathLike) -> Path:
    """Write the terratorch state dict, which `TerraMind.load_state_dict` reads (strict)."""
    return write_state_dict(export_state_dict(cfg, params), path)
