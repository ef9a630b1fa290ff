"""The CSIRO biomass project's strong augmentation (jaxvit.data.photo_aug) on small known images."""
from __future__ import annotations

import numpy as np
import pytest

from jaxvit.data import photo_aug


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


def test_clahe_without_clipping_is_histogram_equalisation_and_full_clipping_keeps_the_image():
    two_levels = _gray(np.where(np.arange(64)[None, :] < 32, 100, 110).repeat(32, 0))
    out = photo_aug.clahe(two_levels, clip_limit=1e9, tiles=1)[..., 0]
    # CDF mapping: half the pixels at or below 100 -> 255 / 2, all at or below 110 -> 255 (YCbCr rounding +-1).
    assert np.abs(out[:, :32].astype(int) - 128).max() <= 1 and np.abs(out[:, 32:].astype(int) - 255).max() <= 1
    rng = np.random.default_rng(0)
    ramp = _gray(rng.integers(0, 256, (48, 48)))
    flat = photo_aug.clahe(ramp, clip_limit=1.0, tiles=4)  # every bin clipped to the mean: a uniform histogram
    assert np.abs(flat.astype(int) - ramp.astype(int)).mean() < 4
    low = _gray(100 + rng.integers(0, 20, (48, 48)))
    assert photo_aug.clahe(low, clip_limit=2.0, tiles=4).std() > 2 * low.std()  # low contrast is raised (limited)



def _tile_maps_one_by_one(y, tiles, clip_limit):
    """The tile mappings computed tile by tile (OpenCV's definition, as `_tile_maps` documents it)."""
    if y.shape[0] % tiles or y.shape[1] % tiles:
        y = np.pad(y, ((0, tiles - y.shape[0] % tiles), (0, tiles - y.shape[1] % tiles)), mode="reflect")
    th, tw = y.shape[0] // tiles, y.shape[1] // tiles
    limit = max(int(clip_limit * th * tw / 256), 1)
    maps = np.zeros((tiles, tiles, 256), np.float32)
    for i in range(tiles):
        for j in range(tiles):
            hist = np.bincount(y[i * th:(i + 1) * th, j * tw:(j + 1) * tw].ravel(), minlength=256)
            excess = int(np.maximum(hist - limit, 0).sum())
            hist = np.minimum(hist, limit) + excess // 256
            if excess % 256:
                hist[::max(256 // (excess % 256), 1)][:excess % 256] += 1
            maps[i, j] = np.rint(np.cumsum(hist) * (255 / (th * tw)))
    return maps


def test_clahe_tile_maps_of_all_tiles_at_once_are_those_tile_by_tile():
    rng = np.random.default_rng(1)
    for shape, tiles, clip in [((64, 64), 8, 2.0), ((37, 53), 8, 2.0), ((30, 41), 3, 0.01), ((16, 24), 1, 1e9)]:
        for y in (rng.integers(0, 256, shape), rng.integers(100, 110, shape), np.full(shape, 7)):
            maps, th, tw = photo_aug._tile_maps(y.astype(np.uint8), tiles, clip)
            np.testing.assert_array_equal(maps, _tile_maps_one_by_one(y.astype(np.uint8), tiles, clip))


@pytest.mark.parametrize("clip_limit", [2.0, 3.0])
def test_clahe_matches_opencv(clip_limit):
    """OpenCV is no dependency of jaxvit: this runs where opencv-python-headless is installed (docs/clahe.md)."""
    cv2 = pytest.importorskip("cv2")
    from skimage import data
    rng = np.random.default_rng(0)
    images = [data.camera(), data.coins(), data.cell(), data.page(),  # coins, page: sides the grid does not divide
              rng.integers(90, 140, (61, 97)).astype(np.uint8)]
    for y in images:
        ours = photo_aug.clahe_channel(y, clip_limit, 8).astype(int)
        ref = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(8, 8)).apply(y).astype(int)
        assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 0.01, y.shape

def test_motion_blur_spreads_a_point_along_its_angle():
    image = np.zeros((15, 15, 3), np.uint8)
    image[7, 7] = 250
    horizontal = photo_aug.motion_blur(image, 5, 0.0)[..., 0]
    assert horizontal[7, 5:10].tolist() == [50] * 5 and horizontal.sum() == 250
    vertical = photo_aug.motion_blur(image, 5, 90.0)[..., 0]
    assert vertical[5:10, 7].tolist() == [50] * 5 and vertical.sum() == 250
    flat = np.full((9, 9, 3), 77, np.uint8)
    assert (photo_aug.motion_blur(flat, 7, 33.0) == 77).all()
    assert photo_aug.motion_blur(image, 1, 45.0) is image


def test_perspective_jitter_is_the_identity_at_zero_and_moves_corners_otherwise():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
    np.testing.assert_array_equal(photo_aug.perspective_jitter(image, 0.0, rng), image)
    moved = photo_aug.perspective_jitter(image, 0.1, np.random.default_rng(1))
    assert moved.shape == image.shape and not np.array_equal(moved, image)
    again = photo_aug.perspective_jitter(image, 0.1, np.random.default_rng(1))
    np.testing.assert_array_equal(moved, again)  # deterministic in the generator


@pytest.mark.parametrize("seed", range(5))
def test_border_mask_blacks_out_bands_no_wider_than_asked(seed):
    image = np.full((40, 80, 3), 200, np.uint8)
    out = photo_aug.border_mask(image, 0.25, np.random.default_rng(seed))
    assert (out[10:30, 20:60] == 200).all()  # the centre is never touched
    rows = np.flatnonzero((out[:, 40, 0] == 0))
    assert all(r < 10 or r >= 30 for r in rows)
    assert (image == 200).all()  # the input is not modified
