"""TerraMind transformer blocks (terratorch `tm_utils.py`): pre-norm encoder blocks with fused qkv, decoder blocks
with self-attention, cross-attention (`q`, fused `kv`, `proj`; `query_norm`, `context_norm`) and an MLP.

Every projection is `jaxvit.models.layers.Linear`, so LoRA attaches by path rules alone
(e.g. `decoder/layer_3/cross_attn/kv`). Attention masks are `keep` arrays [B, S] over the keys (True = attend).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvit.models.layers import Linear
from jaxvit.models.terramind.config import TerraMindConfig
from jaxvit.models.vit import _REMAT_POLICIES, gelu

Array = jax.Array
_ACTIVATIONS = {"gelu": gelu, "silu": nn.silu}


def attention(q: Array, k: Array, v: Array, keep: Array | None, impl: str | None) -> Array:
    """Softmax attention of q [B, T, H, d] over k, v [B, S, H, d], keys restricted to `keep` [B, S]."""
    scale = q.shape[-1] ** -0.5
    impl = impl or ("einsum" if jax.default_backend() == "cpu" else None)
    if impl != "einsum":
        mask = None if keep is None else keep[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask, implementation=impl)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if keep is not None:
        logits = jnp.where(keep[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def _linear_kwargs(cfg: TerraMindConfig, deterministic: bool) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                deterministic=deterministic)


def layer_norm(cfg: TerraMindConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.ln_eps, use_bias=False, dtype=jnp.dtype(cfg.dtype), name=name)


class SelfAttention(nn.Module):
    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, keep: Array | None) -> Array:
        cfg, (b, t, d) = self.cfg, x.shape
        lin = _linear_kwargs(cfg, self.deterministic)
        qkv = Linear(3 * d, cfg.qkv_bias, name="qkv", **lin)(x).reshape(b, t, 3, cfg.num_heads, -1)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], keep, cfg.attn_impl)
        return Linear(d, cfg.proj_bias, name="proj", **lin)(out.reshape(b, t, d))


class CrossAttention(nn.Module):
    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, context: Array, keep: Array | None) -> Array:
        cfg, (b, t, d), s = self.cfg, x.shape, context.shape[1]
        lin = _linear_kwargs(cfg, self.deterministic)
        q = Linear(d, cfg.qkv_bias, name="q", **lin)(x).reshape(b, t, cfg.num_heads, -1)
        kv = Linear(2 * d, cfg.qkv_bias, name="kv", **lin)(context).reshape(b, s, 2, cfg.num_heads, -1)
        out = attention(q, kv[:, :, 0], kv[:, :, 1], keep, cfg.attn_impl)
        return Linear(d, cfg.proj_bias, name="proj", **lin)(out.reshape(b, t, d))


class Mlp(nn.Module):
    """fc2(act(fc1 x)), or gated: fc2(act(fc1 x) * fc3 x)."""

    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        lin = dict(use_bias=cfg.mlp_bias, **_linear_kwargs(cfg, self.deterministic))
        h = _ACTIVATIONS[cfg.act](Linear(cfg.mlp_hidden, name="fc1", **lin)(x))
        if cfg.gated_mlp:
            h = h * Linear(cfg.mlp_hidden, name="fc3", **lin)(x)
        return Linear(cfg.dim, name="fc2", **lin)(h)


class EncoderBlock(nn.Module):
    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, keep: Array | None) -> Array:
        cfg, det = self.cfg, self.deterministic
        x = x + SelfAttention(cfg, det, name="attn")(layer_norm(cfg, "norm1")(x), keep)
        return x + Mlp(cfg, det, name="mlp")(layer_norm(cfg, "norm2")(x))


class DecoderBlock(nn.Module):
    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, y: Array, context: Array, self_keep: Array | None, context_keep: Array | None) -> Array:
        cfg, det = self.cfg, self.deterministic
        y = y + SelfAttention(cfg, det, name="self_attn")(layer_norm(cfg, "norm1")(y), self_keep)
        y = y + CrossAttention(cfg, det, name="cross_attn")(
            layer_norm(cfg, "query_norm")(y), layer_norm(cfg, "context_norm")(context), context_keep)
        return y + Mlp(cfg, det, name="mlp")(layer_norm(cfg, "norm2")(y))


def _block(cls, cfg: TerraMindConfig):
    return cls if cfg.remat == "none" else nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat])


class Encoder(nn.Module):
    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, keep: Array | None) -> Array:
        block = _block(EncoderBlock, self.cfg)
        for i in range(self.cfg.encoder_depth):
            x = block(self.cfg, self.deterministic, name=f"layer_{i}")(x, keep)
        return x


class Decoder(nn.Module):
    cfg: TerraMindConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, y: Array, context: Array, self_keep: Array | None, context_keep: Array | None) -> Array:
        block = _block(DecoderBlock, self.cfg)
        for i in range(self.cfg.decoder_depth):
            y = block(self.cfg, self.deterministic, name=f"layer_{i}")(y, context, self_keep, context_keep)
        return y
