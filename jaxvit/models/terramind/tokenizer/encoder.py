"""The tokenizer's ViT encoder (terratorch `ViTEncoder`, `vit_b_enc`): images -> [B, h, w, enc_dim] tokens.

Conv patch embedding with bias, a fixed 2-D sin-cos position grid stored as a parameter (`pos_emb`, bicubic
interpolated when the token grid differs from the training one), pre-norm blocks with biases, fused qkv in the
torch layout and an exact-GELU MLP (the jaxvit ViT `Block`, without LayerScale), then an optional residual
post-MLP with tanh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvit.models.layers import Linear
from jaxvit.models.resize import interpolate_grid
from jaxvit.models.terramind.tokenizer.config import TokenizerConfig
from jaxvit.models.vit import Block, PatchEmbed, ViTConfig

Array = jax.Array


def sincos_grid(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """terratorch's `build_2d_sincos_posemb` as an [h, w, dim] grid. It lays out (w, h)-meshgrid rows and reads
    them back as (h, w), so for square grids entry [i, j] is [sin(i*f), cos(i*f), sin(j*f), cos(j*f)]."""
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float32) / (dim // 4))
    out_w, out_h = gw.reshape(-1, 1) * omega, gh.reshape(-1, 1) * omega
    emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    return emb.reshape(h, w, dim).astype(np.float32)


def block_config(cfg: TokenizerConfig) -> ViTConfig:
    return ViTConfig(hidden_size=cfg.enc_dim, depth=cfg.enc_depth, num_heads=cfg.enc_heads,
                     mlp_hidden=int(cfg.enc_mlp_ratio * cfg.enc_dim), layerscale=None, ln_eps=1e-6,
                     num_channels=cfg.channels, patch_size=cfg.patch_size, dtype=cfg.dtype)


class TokenizerEncoder(nn.Module):
    cfg: TokenizerConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        b, hh, ww, c = images.shape
        p, d = cfg.patch_size, cfg.enc_dim
        if hh % p or ww % p or c != cfg.channels:
            raise ValueError(f"tokenizer input {tuple(images.shape)} must be [B, H, W, {cfg.channels}] with H and W "
                             f"multiples of {p}")
        grid = (hh // p, ww // p)
        x = PatchEmbed(p, d, dtype, name="proj")(images)
        g = cfg.image_size // p
        pos = self.param("pos_emb", lambda *_: jnp.asarray(sincos_grid(g, g, d)), (g, g, d))
        if grid != (g, g):
            pos = interpolate_grid(pos, grid)
        x = x + pos.reshape(1, -1, d).astype(dtype)
        vit_cfg = block_config(cfg)
        for i in range(cfg.enc_depth):
            x, _ = Block(vit_cfg, name=f"blocks_{i}")(x, None)
        if cfg.post_mlp:  # in float32, as upstream runs it outside autocast
            x = x.astype(jnp.float32)
            h = nn.LayerNorm(1e-6, dtype=jnp.float32, name="norm_mlp")(x)
            h = jnp.tanh(Linear(int(cfg.enc_mlp_ratio * d), name="post_mlp_fc1")(h))
            x = x + Linear(d, name="post_mlp_fc2")(h)
        return x.reshape(b, *grid, d)
