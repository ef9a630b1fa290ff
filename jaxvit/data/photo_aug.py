"""Photometric and geometric augmentations of field photos (the CSIRO biomass project's strong augmentation), on uint8 RGB
arrays (H, W, 3), all randomness from a `np.random.Generator`.

  clahe              contrast-limited adaptive histogram equalisation of the luminance (tiles x tiles regions,
                     histograms clipped at clip_limit x their mean bin, mappings interpolated bilinearly), as
                     OpenCV's createCLAHE computes it (clahe_channel: one uint8 channel)
  motion_blur        the mean of `length` copies shifted along a line at `angle` (a straight camera shake)
  perspective_jitter each corner moved by up to `strength` x the side, the image warped to the new quadrilateral
                     (the annotation frame drawn slightly off)
  border_mask        a black band of random width (up to `fraction` of the side) on each edge (frame artefacts)
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _tile_maps(y: np.ndarray, tiles: int, clip_limit: float) -> tuple[np.ndarray, int, int]:
    """Per-tile mappings [tiles, tiles, 256] of a uint8 channel and the tile height and width, as OpenCV's
    createCLAHE forms them: a side that the grid does not divide grows by tiles - side % tiles (both sides then,
    reflected without repeating the edge); each histogram is clipped at max(clip_limit x tile area / 256, 1),
    the excess spread evenly over the bins (the remainder one count per bin at a regular step), and its
    cumulative sum scaled to 0..255 and rounded."""
    h, w = y.shape
    if h % tiles or w % tiles:
        y = np.pad(y, ((0, tiles - h % tiles), (0, tiles - w % tiles)), mode="reflect")
    th, tw = y.shape[0] // tiles, y.shape[1] // tiles
    area = th * tw
    limit = max(int(clip_limit * area / 256), 1)
    n = tiles * tiles  # every tile's histogram from one bincount: [n, 256]
    pixels = y.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(n, area)
    hist = np.bincount((np.arange(n)[:, None] * 256 + pixels).ravel(), minlength=n * 256).reshape(n, 256)
    excess = np.maximum(hist - limit, 0).sum(axis=1)
    hist = np.minimum(hist, limit) + (excess // 256)[:, None]
    residual, bins = excess % 256, np.arange(256)[None, :]
    step = np.maximum(256 // np.maximum(residual, 1), 1)[:, None]  # one more count every step-th bin, residual times
    hist += (bins % step == 0) & (bins // step < residual[:, None])
    maps = np.rint(np.cumsum(hist, axis=1) * (255 / area)).astype(np.float32)
    return maps.reshape(tiles, tiles, 256), th, tw


def clahe_channel(y: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE of one uint8 channel [H, W]: cv2.createCLAHE(clip_limit, (tiles, tiles)).apply(y) to within one
    grey level (docs/clahe.md)."""
    h, w = y.shape
    tiles = max(1, min(tiles, h, w))
    maps, th, tw = _tile_maps(y, tiles, clip_limit)
    # Each pixel mixes the mappings of the four nearest tile centres (OpenCV's coordinates: x / tile - 0.5).
    fy, fx = np.arange(h) / th - 0.5, np.arange(w) / tw - 0.5
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    y1, x1 = np.clip(y0 + 1, 0, tiles - 1), np.clip(x0 + 1, 0, tiles - 1)
    y0, x0 = np.clip(y0, 0, tiles - 1), np.clip(x0, 0, tiles - 1)
    flat, v = maps.reshape(-1), y.astype(np.intp)
    at = lambda ty, tx: flat[(ty * tiles * 256)[:, None] + (tx * 256)[None, :] + v]  # noqa: E731 maps[ty, tx, v]
    out = (1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1)) + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE (clahe_channel) on the Y of YCbCr of a uint8 RGB image; colour (Cb, Cr) kept."""
    ycc = np.asarray(Image.fromarray(image).convert("YCbCr")).copy()
    ycc[..., 0] = clahe_channel(ycc[..., 0], clip_limit, tiles)
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
