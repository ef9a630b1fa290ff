"""Photometric and geometric augmentations of field photos (the biomass seed's strong augmentation), on uint8 RGB
arrays (H, W, 3), all randomness from a `np.random.Generator`.

  clahe              contrast-limited adaptive histogram equalisation of the luminance (tiles x tiles regions,
                     histograms clipped at clip_limit x their mean bin, mappings interpolated bilinearly)
  motion_blur        the mean of `length` copies shifted along a line at `angle` (a straight camera shake)
  perspective_jitter each corner moved by up to `strength` x the side, the image warped to the new quadrilateral
                     (the annotation frame drawn slightly off)
  border_mask        a black band of random width (up to `fraction` of the side) on each edge (frame artefacts)
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _equalise_maps(y: np.ndarray, tiles: int, clip_limit: float) -> np.ndarray:
    """Per-tile mappings [tiles, tiles, 256] of a uint8 channel: clipped histogram -> scaled CDF."""
    h, w = y.shape
    ys, xs = np.linspace(0, h, tiles + 1).astype(int), np.linspace(0, w, tiles + 1).astype(int)
    maps = np.zeros((tiles, tiles, 256), np.float32)
    for i in range(tiles):
        for j in range(tiles):
            tile = y[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            hist = np.bincount(tile.ravel(), minlength=256).astype(np.float64)
            limit = max(clip_limit * tile.size / 256, 1.0)
            excess = np.maximum(hist - limit, 0).sum()
            hist = np.minimum(hist, limit) + excess / 256  # clipped counts spread over every bin
            maps[i, j] = np.cumsum(hist) / max(tile.size, 1) * 255
    return maps


def clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE on the Y of YCbCr; colour (Cb, Cr) kept."""
    ycc = np.asarray(Image.fromarray(image).convert("YCbCr")).copy()
    y = ycc[..., 0]
    h, w = y.shape
    tiles = max(1, min(tiles, h, w))
    maps = _equalise_maps(y, tiles, clip_limit)
    # Each pixel mixes the mappings of the four nearest tile centres.
    fy = np.clip((np.arange(h) + 0.5) / h * tiles - 0.5, 0, tiles - 1)
    fx = np.clip((np.arange(w) + 0.5) / w * tiles - 0.5, 0, tiles - 1)
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    v = y.astype(np.int64)
    at = lambda ty, tx: maps[ty[:, None], tx[None, :], v]
    out = ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1)) + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1)))
    ycc[..., 0] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))


def motion_blur(image: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Mean of `length` copies shifted along the direction `angle` (degrees), edges extended."""
    if length <= 1:
        return image
    offsets = np.linspace(-(length - 1) / 2, (length - 1) / 2, length)
    dy = np.rint(offsets * math.sin(math.radians(angle))).astype(int)
    dx = np.rint(offsets * math.cos(math.radians(angle))).astype(int)
    r = int(max(np.abs(dy).max(), np.abs(dx).max()))
    padded = np.pad(image.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    total = sum(padded[r + a:r + a + h, r + b:r + b + w] for a, b in zip(dy, dx))
    return np.clip(np.rint(total / length), 0, 255).astype(np.uint8)


def _perspective_coefficients(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """PIL's 8 PERSPECTIVE coefficients mapping output points `dst` to input points `src` (4 x 2 each)."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.asarray(rows, np.float64), src.reshape(-1).astype(np.float64)).tolist()


def perspective_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Moves each corner by up to strength x (width, height) and warps; uncovered pixels are black."""
    h, w = image.shape[:2]
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    moved = corners + rng.uniform(-strength, strength, (4, 2)) * [w, h]
    coeffs = _perspective_coefficients(corners, moved)
    return np.asarray(Image.fromarray(image).transform((w, h), Image.Transform.PERSPECTIVE, coeffs,
                                                       Image.Resampling.BILINEAR))


def border_mask(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Blacks out a band of width U(0, fraction) x the side on each of the four edges."""
    h, w = image.shape[:2]
    top, bottom = (int(rng.uniform(0, fraction) * h) for _ in range(2))
    left, right = (int(rng.uniform(0, fraction) * w) for _ in range(2))
    out = image.copy()
    out[:top], out[h - bottom:], out[:, :left], out[:, w - right:] = 0, 0, 0, 0
    return out
