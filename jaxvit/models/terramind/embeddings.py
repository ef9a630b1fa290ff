"""Per-modality embeddings (terratorch `encoder_embeddings.py`, `decoder_embeddings.py`).

Image (pixels): bias-free Linear over (ph pw c)-ordered patches, path `encoder_embeddings/<key>/proj`.
Image tokens and sequences: a token table `<side>_embeddings/<key>/token_emb/embedding`; the decoder's table
also gives the logits (terratorch ties `to_logits.weight` to it). Modality embeddings `mod_emb/<key>` [1, 1, D]
are one per modality, shared by encoder and decoder as in terratorch. Position embeddings are fixed sin-cos
tables (not parameters): 2-D on the `image_size / patch_size` grid, bicubically resized for other grids.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvit.models.layers import Linear
from jaxvit.models.resize import interpolate_grid
from jaxvit.models.terramind.config import IMAGE, ModalitySpec, TerraMindConfig

Array = jax.Array
_init = nn.initializers.normal(0.02)


def _angles(positions: np.ndarray, n: int, temperature: float) -> np.ndarray:
    """positions x 1 / temperature ** (i / n), in float32 as terratorch computes it (its buffers match bit for bit
    up to the last ulp of sin / cos)."""
    omega = np.float32(1.0) / np.float32(temperature) ** (np.arange(n, dtype=np.float32) / np.float32(n))
    return positions.astype(np.float32).reshape(-1, 1) * omega


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """[h * w, dim] table of terratorch's build_2d_sincos_posemb, including its index order: the first half of
    the channels encodes n // h and the second half n % h (row and column for a square grid)."""
    grid_w, grid_h = np.meshgrid(np.arange(w), np.arange(h), indexing="ij")
    out_w, out_h = _angles(grid_w, dim // 4, temperature), _angles(grid_h, dim // 4, temperature)
    return np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], 1)


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """[length, dim] table of terratorch's build_1d_sincos_posemb."""
    out = _angles(np.arange(length), dim // 2, temperature)
    return np.concatenate([np.sin(out), np.cos(out)], 1)


@functools.lru_cache(maxsize=32)
def image_positions(dim: int, stored: int, grid: tuple[int, int]) -> np.ndarray:
    """Position table [h * w, dim] for a token grid: the stored `stored` x `stored` table, resized as terratorch's
    interpolate_pos_encoding does (bicubic, align_corners=False) when the grid differs."""
    table = sincos_2d(stored, stored, dim)
    if grid == (stored, stored):
        return table
    return interpolate_grid(table.reshape(stored, stored, dim), grid).reshape(-1, dim)


def sequence_positions(dim: int, length: int, drop: Array | None) -> Array:
    """[B or 1, L, dim]: position i for the i-th kept token of each row, zero where `drop` [B, L] is True."""
    table = sincos_1d(512, dim)  # terratorch keeps all 512 rows (see weights.buffers)
    if drop is None:
        return jnp.asarray(table[:length])[None]
    ids = jnp.cumsum(~drop, axis=1) - 1
    return jnp.where(drop[..., None], 0.0, jnp.asarray(table)[jnp.maximum(ids, 0)])


def patchify(images: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] with features in (ph, pw, c) order."""
    b, hh, ww, c = images.shape
    x = images.reshape(b, hh // patch, patch, ww // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hh // patch) * (ww // patch), patch * patch * c)


class ModalityEmbeddings(nn.Module):
    """One learned [1, 1, D] embedding per modality."""

    dim: int

    @nn.compact
    def __call__(self, key: str) -> Array:
        return self.param(key, _init, (1, 1, self.dim))


class TokenTable(nn.Module):
    """A [V, D] token table: look-up of ids, and float32 logits of vectors against it (tied output layer)."""

    vocab: int
    dim: int
    dtype: str = "float32"

    def setup(self):
        self.embedding = self.param("embedding", _init, (self.vocab, self.dim))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, y: Array) -> Array:
        table = self.embedding.astype(self.dtype)
        return jnp.einsum("bmd,vd->bmv", y.astype(self.dtype), table, preferred_element_type=jnp.float32)


class EncoderEmbedding(nn.Module):
    """Input tokens [B, N, D] of one modality: projected pixel patches or looked-up token ids."""

    cfg: TerraMindConfig
    spec: ModalitySpec

    @nn.compact
    def __call__(self, value: Array) -> Array:
        cfg = self.cfg
        if self.spec.kind == IMAGE:
            return Linear(cfg.dim, use_bias=False, dtype=jnp.dtype(cfg.dtype), name="proj")(
                patchify(value, cfg.patch_size))
        return TokenTable(self.spec.size, cfg.dim, cfg.dtype, name="token_emb")(value.reshape(value.shape[0], -1))


class DecoderEmbedding(nn.Module):
    """Float32 logits [B, M, V] of decoder outputs [B, M, D] against the modality's token table."""

    cfg: TerraMindConfig
    spec: ModalitySpec

    @nn.compact
    def __call__(self, y: Array) -> Array:
        return TokenTable(self.spec.size, self.cfg.dim, self.cfg.dtype, name="token_emb").attend(y)


class Embeddings(nn.Module):
    """`encoder_embeddings` or `decoder_embeddings`: one submodule per modality key, created on first use."""

    cfg: TerraMindConfig
    side: str  # encoder | decoder

    @nn.compact
    def __call__(self, key: str, value: Array) -> Array:
        cls = EncoderEmbedding if self.side == "encoder" else DecoderEmbedding
        return cls(self.cfg, self.cfg.spec(key, self.side), name=key)(value)
