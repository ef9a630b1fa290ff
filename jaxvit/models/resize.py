"""Resize helpers with exact PyTorch parity, expressed as small linear maps.

* ``bicubic_matrix``: 1-D matrix reproducing ``F.interpolate(mode="bicubic",
  align_corners=False)`` (with or without ``antialias``).
* ``interpolate_grid``: separable 2-D bicubic resize of an (h, w, D) grid, used for
  position-embedding interpolation (e.g. DINOv2's 37x37 grid -> (H/14, W/14)).
* ``resize_patch_kernel``: FlexiViT-style change of a patch-embedding patch size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# torch's plain bicubic uses Keys' cubic kernel with A=-0.75; its antialiased path
# (`_upsample_bicubic2d_aa`, PIL-style) uses A=-0.5 (checked against torch).
_A_PLAIN = -0.75
_A_ANTIALIAS = -0.5


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with constant ``a``."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _coord_scale(in_size: int, out_size: int, scale: float | None) -> float:
    """Input pixels per output pixel, as torch computes it for align_corners=False."""
    if scale is None:
        return in_size / out_size
    if math.floor(in_size * scale) != out_size:
        raise ValueError(f"floor({in_size} * {scale}) != out_size={out_size}")
    return 1.0 / scale


def bicubic_matrix(
    in_size: int, out_size: int, antialias: bool = False, scale: float | None = None
) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with ``M @ x`` == torch bicubic resize of x.

    ``scale`` mirrors torch's ``scale_factor=`` (coordinates mapped with 1/scale).
    """
    s = _coord_scale(in_size, out_size, scale)
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if not antialias:
        # 4 taps around the (unclamped) source coordinate; indices clamped at borders.
        src = s * (rows + 0.5) - 0.5
        base = np.floor(src)
        t = src - base
        for k in range(-1, 3):
            idx = np.clip(base.astype(np.int64) + k, 0, in_size - 1)
            np.add.at(m, (rows, idx), _cubic(t - k, _A_PLAIN))
        return m
    # Antialiased: the filter is stretched by the downscale factor and renormalised.
    stretch = max(s, 1.0)
    support = 2.0 * stretch
    for i in rows:
        center = s * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _cubic((np.arange(lo, hi) - center + 0.5) / stretch, _A_ANTIALIAS)
        m[i, lo:hi] = w / w.sum()
    return m


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of torch's bilinear resize (align_corners=False, no antialias)."""
    src = np.maximum((in_size / out_size) * (np.arange(out_size) + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def _apply_2d(a_h: np.ndarray, a_w: np.ndarray, x, eq: str):
    """``einsum(eq, a_h, a_w, x)`` in numpy (float64) or jax (HIGHEST precision, float32)."""
    if isinstance(x, np.ndarray):
        return np.einsum(eq, a_h, a_w, x)
    a_h, a_w = jnp.asarray(a_h, jnp.float32), jnp.asarray(a_w, jnp.float32)
    return jnp.einsum(eq, a_h, a_w, x, precision=jax.lax.Precision.HIGHEST)


def interpolate_grid(
    grid,
    out_hw: tuple[int, int],
    antialias: bool = False,
    scale: tuple[float, float] | None = None,
):
    """Bicubic resize of an (h, w, D) grid to (H, W, D) float32, matching torch's
    ``F.interpolate(grid.permute(2, 0, 1)[None], size=out_hw, mode="bicubic",
    align_corners=False, antialias=antialias)`` (``scale`` -> ``scale_factor=``).

    Computed as ``Mh @ grid @ Mw^T``; the matrices are numpy constants built at trace
    time, so this works inside ``jax.jit``. Numpy in -> numpy out, jax in -> jax out.
    """
    h, w = grid.shape[:2]
    sh, sw = scale if scale is not None else (None, None)
    m_h = bicubic_matrix(h, out_hw[0], antialias, sh)
    m_w = bicubic_matrix(w, out_hw[1], antialias, sw)
    if not isinstance(grid, np.ndarray):
        grid = jnp.asarray(grid, jnp.float32)
    return _apply_2d(m_h, m_w, grid, "Hh,Ww,hwd->HWd").astype(np.float32)


def _kernel_axis_map(old: int, new: int) -> np.ndarray:
    """(new, old) matrix A with w_new = A @ w_old along one spatial axis of the kernel."""
    if new < old:
        return bilinear_matrix(new, old).T  # U^T, U: new -> old upsample
    if new > old:
        return np.linalg.pinv(bilinear_matrix(old, new).T)  # pinv(U^T), U: old -> new
    return np.eye(old)


def resize_patch_kernel(kernel, new_patch: int | tuple[int, int]):
    """Resize a (p_h, p_w, C, D) HWIO patch-embedding kernel to a new patch size.

    With U the per-patch bilinear upsampling from the smaller to the larger patch, ask
    <x, w_small> = <U x, w_large> for every small patch x (embedding kept when the image
    is upsampled by the patch ratio). Shrinking (16 -> 8): w_new = U^T w_old, exact.
    Growing (8 -> 16, 14 -> 16): w_new = pinv(U^T) w_old, the exact minimum-norm solution.
    U = U_h (x) U_w, so both maps act per spatial axis. Whole-image resizes also mix
    neighbouring patches at patch borders; that residual error is not corrected.
    """
    q_h, q_w = (new_patch, new_patch) if isinstance(new_patch, int) else new_patch
    p_h, p_w = kernel.shape[:2]
    a_h, a_w = _kernel_axis_map(p_h, q_h), _kernel_axis_map(p_w, q_w)
    return _apply_2d(a_h, a_w, kernel, "ai,bj,ijcd->abcd").astype(kernel.dtype)
