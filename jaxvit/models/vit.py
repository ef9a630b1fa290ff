"""One configurable ViT for the DINOv2 and DINOv3 families (Flax linen, NHWC inputs).

Parameter paths mirror the transformers on-disk names so rules read naturally, e.g.
`encoder/layer_3/attention/query/kernel`, `encoder/layer_3/mlp/fc1/bias`, `embeddings/cls_token`.
LoRA adapters live in a separate `lora` collection with the same paths (see `jaxvit.lora`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvit.models.layers import Linear, dot
from jaxvit.models.resize import interpolate_grid

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    family: str = "dinov2"  # dinov2 | dinov3: default token/position scheme and export key names
    patch_size: int = 14
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_hidden: int = 1536
    mlp: str = "mlp"  # mlp (fc2(act(fc1))) | swiglu (down_proj(act(gate_proj) * up_proj))
    act: str = "gelu"  # gelu (exact) | silu; SwiGLU models use silu
    num_registers: int = 0
    pos_embed: str = "abs"  # abs (learned grid, interpolated) | rope (DINOv3)
    pos_grid: int = 37  # abs: side of the stored position grid
    pos_antialias: bool = False  # abs: antialiased bicubic interpolation (DINOv2 register models)
    rope_theta: float = 100.0
    rope_rescale: float | None = None  # train-time RoPE coordinate rescale, log-uniform in [1/s, s]
    qkv_bias: bool = True  # query and value bias
    key_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    layerscale: float | None = 1.0  # LayerScale init value; None disables LayerScale
    ln_eps: float = 1e-6
    num_channels: int = 3
    drop_path: float = 0.0
    dtype: str = "float32"  # compute dtype; params stay float32
    remat: str = "none"  # none | full | dots (save matmul outputs)
    attn_impl: str | None = None  # einsum | xla | cudnn; None: einsum on the CPU, else XLA picks
    lora_alpha: float = 16.0  # LoRA scale is lora_alpha / rank (rank read from the adapter shapes)
    lora_dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix(self) -> int:
        return 1 + self.num_registers


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float, rescale: Array | float = 1.0):
    """cos/sin tables [h*w, head_dim] for DINOv3's axial RoPE over normalised patch-centre coordinates."""
    h, w = grid
    ys = (np.arange(0.5, h) / h) * 2 - 1
    xs = (np.arange(0.5, w) / w) * 2 - 1
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    inv_freq = (1.0 / theta ** np.arange(0, 1, 4 / head_dim)).astype(np.float32)
    coords = jnp.asarray(coords) * rescale
    angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # [hw, 2 (y, x), d/4]
    angles = jnp.tile(angles.reshape(h * w, -1), (1, 2))  # [hw, d]
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: Array, cos: Array, sin: Array, num_prefix: int) -> Array:
    """Rotate the patch tokens of x [B, T, H, d] in float32; prefix tokens (CLS, registers) stay as they are."""
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:].astype(jnp.float32)
    x1, x2 = jnp.split(patches, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    patches = patches * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


class Attention(nn.Module):
    cfg: ViTConfig
    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array] | None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, d = x.shape
        lin = dict(dtype=dtype, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                   deterministic=self.deterministic)
        heads = (b, t, cfg.num_heads, cfg.head_dim)
        q = Linear(d, cfg.qkv_bias, name="query", **lin)(x).reshape(heads)
        k = Linear(d, cfg.key_bias, name="key", **lin)(x).reshape(heads)
        v = Linear(d, cfg.qkv_bias, name="value", **lin)(x).reshape(heads)
        if rope is not None:
            q, k = (_apply_rope(z, *rope, cfg.num_prefix) for z in (q, k))
        scale = cfg.head_dim ** -0.5
        impl = cfg.attn_impl or ("einsum" if jax.default_backend() == "cpu" else None)
        weights = None
        if self.return_weights or impl == "einsum":
            out, weights = einsum_attention(q, k, v, scale)
        else:
            out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
        out = Linear(d, cfg.proj_bias, name="dense", **lin)(out.reshape(b, t, d).astype(dtype))
        return out, weights if self.return_weights else None


def einsum_attention(q: Array, k: Array, v: Array, scale: float) -> tuple[Array, Array]:
    """Softmax attention on [B, T, heads, d] inputs, computed heads-first with a float32 softmax; returns
    the output [B, T, heads, d] and the weights [B, heads, T, T]. On the CPU this is ~2x faster than
    `jax.nn.dot_product_attention`'s XLA path (benchmarks/RESULTS.md)."""
    q, k, v = (z.transpose(0, 2, 1, 3) for z in (q * jnp.asarray(scale, q.dtype), k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)
    return out.transpose(0, 2, 1, 3), weights


def gelu(x: Array) -> Array:
    """Exact GELU, x * Phi(x), through erf: XLA's CPU erfc (jax.nn.gelu's form) costs about twice as much."""
    return x * (1 + jax.lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype))) * np.asarray(0.5, x.dtype)


_ACTIVATIONS = {"gelu": gelu, "silu": nn.silu}


class Mlp(nn.Module):
    cfg: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        lin = dict(use_bias=cfg.mlp_bias, dtype=dtype, lora_alpha=cfg.lora_alpha,
                   lora_dropout=cfg.lora_dropout, deterministic=self.deterministic)
        if cfg.mlp == "swiglu":
            gate = Linear(cfg.mlp_hidden, name="gate_proj", **lin)(x)
            up = Linear(cfg.mlp_hidden, name="up_proj", **lin)(x)
            return Linear(cfg.hidden_size, name="down_proj", **lin)(_ACTIVATIONS[cfg.act](gate) * up)
        h = _ACTIVATIONS[cfg.act](Linear(cfg.mlp_hidden, name="fc1", **lin)(x))
        return Linear(cfg.hidden_size, name="fc2", **lin)(h)


class LayerScale(nn.Module):
    init_value: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        lam = self.param("lambda1", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * lam.astype(x.dtype)


class Block(nn.Module):
    cfg: ViTConfig
    drop_path: float = 0.0
    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array] | None):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        # One keep/drop decision per sample, scaled by 1/keep (stochastic depth).
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=self.deterministic)

        def scale(name: str):
            return LayerScale(cfg.layerscale, name=name) if cfg.layerscale is not None else (lambda y: y)

        h, weights = Attention(cfg, self.deterministic, self.return_weights, name="attention")(
            nn.LayerNorm(cfg.ln_eps, dtype=dtype, name="norm1")(x), rope)
        x = x + drop(scale("layer_scale1")(h))
        h = Mlp(cfg, self.deterministic, name="mlp")(nn.LayerNorm(cfg.ln_eps, dtype=dtype, name="norm2")(x))
        x = x + drop(scale("layer_scale2")(h))
        return x, weights


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class PatchEmbed(nn.Module):
    """Stride-p convolution as a matmul over non-overlapping p x p x C patches; kernel is HWIO."""

    patch_size: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        b, hh, ww, c = images.shape
        p, d = self.patch_size, self.features
        kernel = self.param("kernel", nn.initializers.truncated_normal(0.02), (p, p, c, d))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        patches = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = dot(patches.reshape(b, -1, p * p * c), kernel.reshape(-1, d), self.dtype)
        return x + bias.astype(self.dtype)


class Embeddings(nn.Module):
    """Patch embedding, mask tokens, CLS + register tokens and (abs) position embeddings."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: Array, mask: Array | None) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        b, hh, ww, _ = images.shape
        d = cfg.hidden_size
        grid = (hh // cfg.patch_size, ww // cfg.patch_size)
        x = PatchEmbed(cfg.patch_size, d, dtype, name="patch_embeddings")(images)
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, d))
        if mask is not None:
            x = jnp.where(mask[..., None], mask_token.astype(dtype), x)
        cls = self.param("cls_token", nn.initializers.truncated_normal(0.02), (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
        if cfg.pos_embed == "abs":
            x = x + self._position(grid).astype(dtype)
        if cfg.num_registers:
            reg = self.param("register_tokens", nn.initializers.truncated_normal(0.02),
                             (1, cfg.num_registers, d))
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg.astype(dtype), (b, cfg.num_registers, d)),
                                 x[:, 1:]], axis=1)
        return x

    def _position(self, grid: tuple[int, int]) -> Array:
        """Position embeddings for [CLS, patches] on `grid`, interpolated like transformers when it differs."""
        g, d = self.cfg.pos_grid, self.cfg.hidden_size
        pos = self.param("position_embeddings", nn.initializers.truncated_normal(0.02), (1, 1 + g * g, d))
        if grid == (g, g):
            return pos
        patch_pos = interpolate_grid(pos[0, 1:].reshape(g, g, d), grid, antialias=self.cfg.pos_antialias)
        return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, -1, d).astype(pos.dtype)], axis=1)


class Encoder(nn.Module):
    cfg: ViTConfig
    train: bool = False
    return_attention: bool = False

    @nn.compact
    def __call__(self, x: Array, rope, return_layers: tuple[int, ...]):
        cfg = self.cfg
        block_cls = Block if cfg.remat == "none" else nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat])
        wanted = {i % cfg.depth for i in return_layers}
        intermediate, attentions = {}, []
        for i in range(cfg.depth):
            rate = cfg.drop_path * i / max(cfg.depth - 1, 1)  # linearly increasing drop path
            x, weights = block_cls(cfg, rate, not self.train, self.return_attention, name=f"layer_{i}")(x, rope)
            if i in wanted:
                intermediate[i] = x
            attentions.append(weights)
        return x, [intermediate[i % cfg.depth] for i in return_layers], attentions


class ViT(nn.Module):
    """DINO-family ViT. Call with normalised NHWC images; returns a dict of outputs.

    Outputs: last_hidden_state (all tokens after the final norm, order [CLS, registers, patches]),
    pooler_output (CLS), patch_tokens, register_tokens; with `return_layers` the raw outputs of those
    blocks under `intermediate` and their patch tokens as [B, h, w, D] grids under `feature_maps` (through the
    final norm when `norm_layers`, as DPT / Depth Anything and DINOCell read them); with `return_attention` each block's attention probabilities
    [B, heads, T, T] under `attentions`. `mask` [B, num_patches] (bool) swaps patches for the mask token.
    """

    cfg: ViTConfig

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False, mask: Array | None = None,
                 return_layers: tuple[int, ...] = (), norm_layers: bool = True, return_attention: bool = False
                 ) -> dict[str, Any]:
        cfg = self.cfg
        _, hh, ww, c = images.shape
        p = cfg.patch_size
        if hh % p or ww % p or c != cfg.num_channels:
            raise ValueError(f"input shape {tuple(images.shape)} must be [B, H, W, {cfg.num_channels}] with H "
                             f"and W multiples of the patch size {p}")
        grid = (hh // p, ww // p)
        x = Embeddings(cfg, name="embeddings")(images, mask)
        rope = None
        if cfg.pos_embed == "rope":
            rescale = 1.0
            if train and cfg.rope_rescale:
                r = math.log(cfg.rope_rescale)
                rescale = jnp.exp(jax.random.uniform(self.make_rng("dropout"), (), minval=-r, maxval=r))
            rope = rope_tables(grid, cfg.head_dim, cfg.rope_theta, rescale)
        x, intermediate, attentions = Encoder(cfg, train, return_attention, name="encoder")(
            x, rope, tuple(return_layers))
        norm = nn.LayerNorm(cfg.ln_eps, dtype=jnp.dtype(cfg.dtype), name="layernorm")
        x = norm(x)
        out = dict(last_hidden_state=x, pooler_output=x[:, 0], register_tokens=x[:, 1:cfg.num_prefix],
                   patch_tokens=x[:, cfg.num_prefix:])
        if return_layers:
            out["intermediate"] = intermediate
            out["feature_maps"] = [(norm(h) if norm_layers else h)[:, cfg.num_prefix:].reshape(
                h.shape[0], *grid, h.shape[-1]) for h in intermediate]
        if return_attention:
            out["attentions"] = attentions
        return out
