"""Image-space terms of stage-3 SAR grounding, on NHWC float images, one value per example [B].

SAR and optical tiles have different units, so agreement is measured scale-free: Pearson correlation of
single-channel summaries (the mean over bands of the normalised stack). Edges are Sobel gradient magnitudes,
texture is the local standard deviation in a square window; both use reflect padding ("reflect" as in
scipy.ndimage, i.e. the edge pixel repeated: numpy's "symmetric").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_SMOOTH = jnp.asarray([1.0, 2.0, 1.0])
_DIFF = jnp.asarray([-1.0, 0.0, 1.0])


def gray(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W]: the mean over bands."""
    return x.astype(jnp.float32).mean(-1)


def _separable(x: jax.Array, along_h: jax.Array, along_w: jax.Array) -> jax.Array:
    """Correlates [B, H, W] with the outer product of two odd 1-D kernels (reflect padding)."""
    r = along_h.shape[0] // 2
    x = jnp.pad(x, ((0, 0), (r, r), (r, r)), mode="symmetric")
    h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
    x = sum(k * x[:, i:i + h, :] for i, k in enumerate(along_h))
    return sum(k * x[:, :, i:i + w] for i, k in enumerate(along_w))


def sobel_magnitude(x: jax.Array) -> jax.Array:
    """[B, H, W] -> gradient magnitude sqrt(gx^2 + gy^2) of the 3x3 Sobel operator."""
    gy = _separable(x, _DIFF, _SMOOTH)
    gx = _separable(x, _SMOOTH, _DIFF)
    return jnp.sqrt(gx ** 2 + gy ** 2 + 1e-12)


def local_std(x: jax.Array, window: int = 7) -> jax.Array:
    """[B, H, W] -> standard deviation in a window x window neighbourhood (window odd)."""
    box = jnp.full((window,), 1.0 / window)
    mean = _separable(x, box, box)
    return jnp.sqrt(jnp.maximum(_separable(x * x, box, box) - mean ** 2, 0.0) + 1e-12)


def correlation(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation per example of [B, ...] arrays."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-12)


def sar_agreement(optical: jax.Array, sar: jax.Array) -> jax.Array:
    """The monitored "SAR agreement": correlation of the optical and SAR edge maps, in [-1, 1]."""
    return correlation(sobel_magnitude(gray(optical)), sobel_magnitude(gray(sar)))


def sar_consistency(optical: jax.Array, sar: jax.Array, window: int = 7) -> jax.Array:
    """(1 - edge correlation) + (1 - local-texture correlation): 0 when the generated optical tile's edges and
    texture follow the SAR tile's."""
    o, s = gray(optical), gray(sar)
    edges = correlation(sobel_magnitude(o), sobel_magnitude(s))
    texture = correlation(local_std(o, window), local_std(s, window))
    return (1 - edges) + (1 - texture)


def spectral_l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute difference over pixels and bands (normalised units)."""
    return jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).reshape(pred.shape[0], -1).mean(-1)


def feature_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """1 - cosine similarity of per-token features [B, T, D], averaged over tokens (the DINO-feature stand-in for
    LPIPS, which needs torchvision's VGG/AlexNet weights)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    cos = (a * b).sum(-1) / jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-12)
    return (1 - cos).mean(-1)
