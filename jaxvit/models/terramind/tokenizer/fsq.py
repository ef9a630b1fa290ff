"""Finite scalar quantisation as TerraMind's tokenizers use it (terratorch `FiniteScalarQuantizer`).

Each of the d latent channels is squashed by a sigmoid and rounded (half to even, straight-through gradient)
to one of `levels[i]` values; the code is that digit divided by levels[i] - 1, so codes lie in [0, 1]. The
token id is the mixed-radix number sum_i digit_i * prod(levels[:i]) (first channel least significant).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _radix(levels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    levels = np.asarray(levels, np.int32)
    basis = np.cumprod(np.concatenate([[1], levels[:-1]])).astype(np.int32)
    return levels, basis


def quantize(latent: Array, levels: Sequence[int]) -> tuple[Array, Array]:
    """latent [..., d] -> (codes [..., d] in [0, 1] with straight-through gradients, ids [...] int32)."""
    lv, basis = _radix(levels)
    scale = jnp.asarray(lv - 1, jnp.float32)
    x = jax.nn.sigmoid(latent.astype(jnp.float32)) * scale
    digits = x + jax.lax.stop_gradient(jnp.round(x) - x)
    ids = jnp.sum(jax.lax.stop_gradient(digits).astype(jnp.int32) * basis, axis=-1)
    return digits / scale, ids


def ids_to_codes(ids: Array, levels: Sequence[int]) -> Array:
    """Token ids [...] -> codes [..., d] (float32)."""
    lv, basis = _radix(levels)
    digits = (jnp.asarray(ids, jnp.int32)[..., None] // basis) % lv
    return digits.astype(jnp.float32) / jnp.asarray(lv - 1, jnp.float32)


def codebook(levels: Sequence[int]) -> Array:
    """All codes in id order: [prod(levels), d]."""
    return ids_to_codes(jnp.arange(int(np.prod(levels))), levels)


def expected_codes(probs: Array, levels: Sequence[int]) -> Array:
    """Expected code under a distribution over ids: probs [..., V] -> [..., d]. Differentiable in probs, so
    a predicted token distribution reaches the decoder (a soft stand-in for ids_to_codes(argmax))."""
    lv, basis = _radix(levels)
    if probs.shape[-1] != int(np.prod(lv)):
        raise ValueError(f"probs has {probs.shape[-1]} classes; levels {tuple(levels)} have {int(np.prod(lv))}")
    return jnp.einsum("...v,vd->...d", probs.astype(jnp.float32), codebook(levels),
                      precision=jax.lax.Precision.HIGHEST)
