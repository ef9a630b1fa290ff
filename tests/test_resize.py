"""Parity of jaxvit.models.resize against real torch interpolation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxvit.models.resize import (
    bicubic_matrix,
    bilinear_matrix,
    interpolate_grid,
    resize_patch_kernel,
)

PAIRS = [(37, 16), (37, 64), (16, 37), (4, 9), (5, 3), (37, 37), (14, 16), (16, 8), (2, 7), (9, 1)]


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())


def _torch_1d(x: np.ndarray, mode: str, out: int | None, aa: bool = False, scale: float | None = None):
    """Resize rows of x (B, n) along the last axis with torch's 2-D interpolate."""
    t = torch.from_numpy(x)[:, None, None, :]  # (B, 1, 1, n)
    kw = dict(size=(1, out)) if scale is None else dict(scale_factor=(1.0, scale))
    return F.interpolate(t, mode=mode, align_corners=False, antialias=aa, **kw)[:, 0, 0].numpy()


@pytest.mark.parametrize("n_in,n_out", PAIRS)
@pytest.mark.parametrize("aa", [False, True])
def test_bicubic_matrix_matches_torch(n_in: int, n_out: int, aa: bool) -> None:
    x = np.random.default_rng(n_in * 100 + n_out).standard_normal((6, n_in))
    m = bicubic_matrix(n_in, n_out, antialias=aa)
    assert m.shape == (n_out, n_in) and m.dtype == np.float64
    # float64 torch: the matrix is exact; float32 torch: rounding-level agreement.
    assert _rel(x @ m.T, _torch_1d(x, "bicubic", n_out, aa)) < 1e-12
    x32 = x.astype(np.float32)
    assert _rel(x32.astype(np.float64) @ m.T, _torch_1d(x32, "bicubic", n_out, aa)) < 2e-6


@pytest.mark.parametrize("n_in,scale", [(37, 16.1 / 37), (37, 1.7), (16, 2.5), (5, 0.6), (37, 64.1 / 37)])
@pytest.mark.parametrize("aa", [False, True])
def test_bicubic_matrix_scale_factor(n_in: int, scale: float, aa: bool) -> None:
    x = np.random.default_rng(1).standard_normal((4, n_in))
    ref = _torch_1d(x, "bicubic", None, aa, scale)
    m = bicubic_matrix(n_in, ref.shape[1], antialias=aa, scale=scale)
    assert _rel(x @ m.T, ref) < 1e-6  # torch maps coordinates in float32 here
    with pytest.raises(ValueError):
        bicubic_matrix(n_in, ref.shape[1] + 1, antialias=aa, scale=scale)


@pytest.mark.parametrize("n_in,n_out", PAIRS)
def test_bilinear_matrix_matches_torch(n_in: int, n_out: int) -> None:
    x = np.random.default_rng(2).standard_normal((4, n_in))
    assert _rel(x @ bilinear_matrix(n_in, n_out).T, _torch_1d(x, "bilinear", n_out)) < 1e-12


def _torch_grid(g: np.ndarray, aa: bool, size=None, scale=None) -> np.ndarray:
    t = torch.from_numpy(g).permute(2, 0, 1)[None]
    kw = dict(size=size) if scale is None else dict(scale_factor=scale)
    return F.interpolate(t, mode="bicubic", align_corners=False, antialias=aa, **kw)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("hw,out_hw", [((37, 37), (16, 23)), ((37, 37), (64, 50)), ((10, 7), (37, 3))])
@pytest.mark.parametrize("aa", [False, True])
def test_interpolate_grid_matches_torch_2d(hw, out_hw, aa: bool) -> None:
    g = np.random.default_rng(3).standard_normal((*hw, 16)).astype(np.float32)
    ref64 = _torch_grid(g.astype(np.float64), aa, size=out_hw)
    ref32 = _torch_grid(g, aa, size=out_hw)
    out_np = interpolate_grid(g, out_hw, antialias=aa)
    out_jit = jax.jit(lambda x: interpolate_grid(x, out_hw, antialias=aa))(jnp.asarray(g))
    assert out_np.dtype == np.float32 and out_jit.dtype == jnp.float32
    assert out_np.shape == out_jit.shape == (*out_hw, 16)
    # Against float64 torch we agree to float32 output rounding (measured 3e-8 / 1.3e-7).
    assert _rel(out_np, ref64) < 1e-7
    assert _rel(out_jit, ref64) < 3e-7
    # torch's float32 kernel is itself ~1-3e-6 off the float64 result (weights in float32).
    assert _rel(out_np, ref32) < 5e-6 and _rel(out_jit, ref32) < 5e-6


@pytest.mark.parametrize("aa", [False, True])
def test_interpolate_grid_scale_factor(aa: bool) -> None:
    # DINOv2-style: scale_factor = ((h0 + 0.1) / 37, (w0 + 0.1) / 37).
    g = np.random.default_rng(4).standard_normal((37, 37, 8)).astype(np.float32)
    scale = (16.1 / 37, 46.1 / 37)
    ref64 = _torch_grid(g.astype(np.float64), aa, scale=scale)
    ref32 = _torch_grid(g, aa, scale=scale)
    out = jax.jit(lambda x: interpolate_grid(x, (16, 46), antialias=aa, scale=scale))(jnp.asarray(g))
    assert ref64.shape == out.shape == (16, 46, 8)
    assert _rel(out, ref64) < 3e-7 and _rel(out, ref32) < 5e-6


# ---------------------------------------------------------------- patch-kernel resize


def _embed(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Patch embedding = stride-p conv with an HWIO kernel (lax conv, the Flax layout)."""
    p = kernel.shape[0]
    out = jax.lax.conv_general_dilated(
        jnp.asarray(img[None], jnp.float32), jnp.asarray(kernel, jnp.float32), (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(out[0], np.float64)


def _bilinear_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def _criterion(old: int, new: int, img_small: np.ndarray, img_large: np.ndarray, seed: int) -> float:
    """Relative embedding mismatch; img_large is img_small resized by max(p)/min(p)."""
    k_old = np.random.default_rng(seed).standard_normal((old, old, 3, 64))
    k_new = resize_patch_kernel(k_old, new)
    assert k_new.shape == (new, new, 3, 64)
    if new < old:  # embed the small image with the new kernel, its upsampling with the old
        a, b = _embed(img_small, k_new), _embed(img_large, k_old)
    else:  # embed the original image with the old kernel, its upsampling with the new
        a, b = _embed(img_large, k_new), _embed(img_small, k_old)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _images(small: int, large: int, kind: str, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(small * 31 + large)
    if kind == "smooth":  # low frequency: a 6x6 random field, bilinearly upsampled
        x = _bilinear_image(rng.standard_normal((6, 6, 3)), (n * small, n * small))
    else:
        x = rng.standard_normal((n * small, n * small, 3))
    return x, _bilinear_image(x, (n * large, n * large))


def _patchwise(x: np.ndarray, small: int, large: int) -> np.ndarray:
    """Resize every patch on its own: this is exactly the per-patch map the kernel assumes."""
    n = x.shape[0] // small
    rows = [
        np.concatenate([_bilinear_image(np.ascontiguousarray(
            x[i * small:(i + 1) * small, j * small:(j + 1) * small]), (large, large)) for j in range(n)], axis=1)
        for i in range(n)
    ]
    return np.concatenate(rows, axis=0)


# Measured relative errors (8x8 patches, random N(0,1) kernel, float32 convs):
#   16->8: smooth 0.018, noise 0.21 | 14->16: smooth 0.0024, noise 0.045 | 8->16: smooth 0.016, noise 0.16
# The remaining error comes only from patch borders, where the whole-image bilinear
# resize mixes in the neighbouring patch (see the exact patch-wise test below); hence
# noise, whose neighbours are uncorrelated, is worse. Tolerances are ~2x the measurements.
@pytest.mark.parametrize(
    "old,new,kind,tol",
    [
        (16, 8, "smooth", 0.04), (16, 8, "noise", 0.4),
        (14, 16, "smooth", 0.006), (14, 16, "noise", 0.1),
        (8, 16, "smooth", 0.04), (8, 16, "noise", 0.3),
    ],
)
def test_resize_patch_kernel_preserves_embedding(old: int, new: int, kind: str, tol: float) -> None:
    small, large = min(old, new), max(old, new)
    x, x_large = _images(small, large, kind)
    assert _criterion(old, new, x, x_large, seed=old + new) < tol


@pytest.mark.parametrize("old,new", [(16, 8), (14, 16), (8, 16)])
def test_resize_patch_kernel_exact_for_patchwise_resize(old: int, new: int) -> None:
    small, large = min(old, new), max(old, new)
    x = np.random.default_rng(5).standard_normal((4 * small, 4 * small, 3))
    assert _criterion(old, new, x, _patchwise(x, small, large), seed=7) < 1e-5


def test_resize_patch_kernel_beats_pinv_of_downsampling() -> None:
    # FlexiViT's pinv(B^T) w with B the 16->8 downsampling is the other candidate for
    # shrinking; under this criterion it is clearly worse (measured 0.046 / 0.80).
    x, x_large = _images(8, 16, "smooth")
    k_old = np.random.default_rng(9).standard_normal((16, 16, 3, 64))
    a = np.linalg.pinv(bilinear_matrix(16, 8).T)
    k_alt = np.einsum("ai,bj,ijcd->abcd", a, a, k_old)
    ref = _embed(x_large, k_old)
    err_alt = np.linalg.norm(_embed(x, k_alt) - ref) / np.linalg.norm(ref)
    assert _criterion(16, 8, x, x_large, seed=9) < 0.5 * err_alt


def test_resize_patch_kernel_identity_jax_and_rect() -> None:
    k = np.random.default_rng(6).standard_normal((14, 14, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(resize_patch_kernel(k, 14), k, atol=1e-7)
    k_np = resize_patch_kernel(k, (8, 16))
    k_jx = jax.jit(lambda w: resize_patch_kernel(w, (8, 16)))(jnp.asarray(k))
    assert k_np.shape == k_jx.shape == (8, 16, 3, 8) and k_jx.dtype == jnp.float32
    assert _rel(k_jx, k_np) < 1e-5
