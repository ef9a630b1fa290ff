"""Stage-3 SAR grounding's image-space terms against scipy / numpy on known and random tiles."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from jaxvit.tasks.sar_grounding import losses


def test_sobel_and_local_std_equal_scipy():
    x = np.random.default_rng(0).normal(size=(2, 17, 23)).astype(np.float32)
    want = np.stack([np.hypot(ndimage.sobel(im, 0), ndimage.sobel(im, 1)) for im in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(losses.sobel_magnitude(x)), want, rtol=1e-5, atol=1e-5)
    mean = np.stack([ndimage.uniform_filter(im, 5) for im in x.astype(np.float64)])
    sq = np.stack([ndimage.uniform_filter(im ** 2, 5) for im in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(losses.local_std(x, 5)), np.sqrt(np.maximum(sq - mean ** 2, 0)),
                               rtol=1e-4, atol=1e-3)


def test_sar_consistency_is_zero_for_aligned_tiles_and_large_for_unrelated_ones():
    rng = np.random.default_rng(1)
    scene = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 2)
    optical = np.stack([scene * 3 + 1, scene * 2 - 4, scene], -1)[None].astype(np.float32)  # any affine per band
    sar = np.stack([scene * -1.5, scene * -1.5 + 0.2], -1)[None].astype(np.float32)
    assert float(losses.sar_consistency(optical, sar)[0]) == pytest.approx(0.0, abs=1e-4)
    assert float(losses.sar_agreement(optical, sar)[0]) == pytest.approx(1.0, abs=1e-5)
    other = ndimage.gaussian_filter(rng.normal(size=(32, 32)), 2)[None, :, :, None].astype(np.float32)
    assert float(losses.sar_consistency(other, sar)[0]) > 0.8
    assert float(losses.sar_agreement(other, sar)[0]) < 0.5


def test_pointwise_terms():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 4, 5, 6)), rng.normal(size=(3, 4, 5, 6))
    np.testing.assert_allclose(np.asarray(losses.spectral_l1(a, b)), np.abs(a - b).mean((1, 2, 3)), rtol=1e-5)
    f, g = rng.normal(size=(3, 7, 8)), rng.normal(size=(3, 7, 8))
    cos = (f * g).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(g, axis=-1)
    np.testing.assert_allclose(np.asarray(losses.feature_distance(f, g)), (1 - cos).mean(-1), rtol=1e-5)
    assert np.allclose(np.asarray(losses.feature_distance(f, 2 * f)), 0, atol=1e-6)
