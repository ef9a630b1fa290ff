"""Name and layout maps between jaxvit parameter paths and PyTorch state-dict keys.

Four torch layouts: transformers on-disk names for DINOv2 ("hf", model_type dinov2 / dinov2_with_registers)
and DINOv3 ("hf", dinov3_vit), and the original repositories' checkpoints ("official", dinov2 and dinov3).
Each `Entry` maps one torch tensor to one or more jaxvit leaves (fused qkv, fused SwiGLU input).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxvit.models.vit import ViTConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    paths: tuple[Path, ...]
    to_flax: Callable[[np.ndarray], list[np.ndarray]]
    to_torch: Callable[[list[np.ndarray]], np.ndarray]


def _path(s: str) -> Path:
    return tuple(s.split("/"))


def _copy(key: str, path: str) -> Entry:
    return Entry(key, (_path(path),), lambda t: [t], lambda a: a[0])


def _reshaped(key: str, path: str, torch_shape: tuple[int, ...], flax_shape: tuple[int, ...]) -> Entry:
    return Entry(key, (_path(path),), lambda t: [t.reshape(flax_shape)], lambda a: a[0].reshape(torch_shape))


def _linear(prefix: str, path: str, bias: bool) -> list[Entry]:
    out = [Entry(f"{prefix}.weight", (_path(f"{path}/kernel"),), lambda t: [t.T], lambda a: a[0].T)]
    if bias:
        out.append(_copy(f"{prefix}.bias", f"{path}/bias"))
    return out


def _norm(prefix: str, path: str) -> list[Entry]:
    return [_copy(f"{prefix}.weight", f"{path}/scale"), _copy(f"{prefix}.bias", f"{path}/bias")]


def _fused(prefix: str, paths: list[str], bias: list[bool]) -> list[Entry]:
    """A torch Linear whose output rows stack several jaxvit Linears (q;k;v or gate;up)."""
    n = len(paths)
    out = [Entry(f"{prefix}.weight", tuple(_path(f"{p}/kernel") for p in paths),
                 lambda t: [w.T for w in np.split(t, n, axis=0)],
                 lambda a: np.concatenate([k.T for k in a], axis=0))]
    if any(bias):
        have = [i for i, b in enumerate(bias) if b]

        def to_flax(t):
            parts = np.split(t, n)
            return [parts[i] for i in have]

        def to_torch(a):
            width = a[0].shape[0]
            parts = [np.zeros(width, a[0].dtype) for _ in range(n)]  # an absent bias is exported as zeros
            for i, v in zip(have, a):
                parts[i] = v
            return np.concatenate(parts)
        out.append(Entry(f"{prefix}.bias", tuple(_path(f"{paths[i]}/bias") for i in have), to_flax, to_torch))
    return out


def _conv(key: str, path: str) -> Entry:
    """torch OIHW <-> flax HWIO."""
    return Entry(key, (_path(path),), lambda t: [t.transpose(2, 3, 1, 0)], lambda a: a[0].transpose(3, 2, 0, 1))


def entries(cfg: ViTConfig, fmt: str) -> list[Entry]:
    """All entries for a backbone of config `cfg` in torch layout `fmt` ("hf" or "official")."""
    if fmt not in ("hf", "official"):
        raise ValueError(f"unknown weight format {fmt!r}; use 'hf' or 'official'")
    d, v2, hf = cfg.hidden_size, cfg.family == "dinov2", fmt == "hf"
    e: list[Entry] = []
    emb = "embeddings/"
    # Tokens and patch embedding.
    e.append(_copy("embeddings.cls_token" if hf else "cls_token", emb + "cls_token"))
    mask_torch_shape = (1, 1, d) if (hf and not v2) else (1, d)
    e.append(_reshaped("embeddings.mask_token" if hf else "mask_token", emb + "mask_token",
                       mask_torch_shape, (1, 1, d)))
    if cfg.num_registers:
        name = "embeddings.register_tokens" if hf else ("register_tokens" if v2 else "storage_tokens")
        e.append(_copy(name, emb + "register_tokens"))
    if cfg.pos_embed == "abs":
        e.append(_copy("embeddings.position_embeddings" if hf else "pos_embed", emb + "position_embeddings"))
    patch = ("embeddings.patch_embeddings.projection" if v2 else "embeddings.patch_embeddings") if hf else (
        "patch_embed.proj")
    e.append(_conv(f"{patch}.weight", emb + "patch_embeddings/kernel"))
    e.append(_copy(f"{patch}.bias", emb + "patch_embeddings/bias"))
    # Blocks.
    for i in range(cfg.depth):
        p = f"encoder/layer_{i}/"
        t = (f"encoder.layer.{i}." if v2 else f"layer.{i}.") if hf else f"blocks.{i}."
        e += _norm(t + "norm1", p + "norm1") + _norm(t + "norm2", p + "norm2")
        qkv = [p + "attention/" + n for n in ("query", "key", "value")]
        if hf:
            names = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense") if v2 else (
                "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
            for n, path, b in zip(names[:3], qkv, (cfg.qkv_bias, cfg.key_bias, cfg.qkv_bias)):
                e += _linear(t + n, path, b)
            e += _linear(t + names[3], p + "attention/dense", cfg.proj_bias)
        else:
            e += _fused(t + "attn.qkv", qkv, [cfg.qkv_bias, cfg.key_bias, cfg.qkv_bias])
            e += _linear(t + "attn.proj", p + "attention/dense", cfg.proj_bias)
        if cfg.layerscale is not None:
            ls = ("layer_scale1.lambda1", "layer_scale2.lambda1") if hf else ("ls1.gamma", "ls2.gamma")
            e += [_copy(t + ls[0], p + "layer_scale1/lambda1"), _copy(t + ls[1], p + "layer_scale2/lambda1")]
        m, b = p + "mlp/", cfg.mlp_bias
        if cfg.mlp == "mlp":
            names = ("mlp.fc1", "mlp.fc2") if (v2 or not hf) else ("mlp.up_proj", "mlp.down_proj")
            e += _linear(t + names[0], m + "fc1", b) + _linear(t + names[1], m + "fc2", b)
        elif hf and not v2:
            for n in ("gate_proj", "up_proj", "down_proj"):
                e += _linear(t + "mlp." + n, m + n, b)
        elif not v2:  # official DINOv3: w1 gate, w2 up, w3 down
            e += _linear(t + "mlp.w1", m + "gate_proj", b) + _linear(t + "mlp.w2", m + "up_proj", b)
            e += _linear(t + "mlp.w3", m + "down_proj", b)
        else:  # DINOv2 fuses gate;up in one Linear
            fused_in, out = ("mlp.weights_in", "mlp.weights_out") if hf else ("mlp.w12", "mlp.w3")
            e += _fused(t + fused_in, [m + "gate_proj", m + "up_proj"], [b, b])
            e += _linear(t + out, m + "down_proj", b)
    final = ("layernorm" if v2 else "norm") if hf else "norm"
    e += _norm(final, "layernorm")
    return e
