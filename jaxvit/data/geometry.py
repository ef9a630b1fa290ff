"""Geometric transforms applied identically to several spatial fields of one example.

A `Geometry` is sampled once per example (crop box, output size, flips, quarter turns) and then
applied to every spatial field: images with bilinear resampling (float32 out, any channel count
and dtype), label / instance masks with nearest sampling (ids and dtype preserved).

Conventions: the crop box is (x0, y0, x1, y1) in source pixels with pixel i covering [i, i+1),
as in PIL's `resize(box=...)`; flips and quarter turns run after the resize, in the order
hflip, vflip, rot90 (`np.rot90` k, counter-clockwise). The output always has shape `out_size`:
for an odd number of quarter turns the box is resized to the transposed size before turning.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Geometry:
    box: Box  # (x0, y0, x1, y1) in source pixels
    out_size: tuple[int, int]  # (height, width); an int means square
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0  # counter-clockwise quarter turns, 0..3

    def __post_init__(self):
        size = self.out_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "out_size", size)
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "rot90", int(self.rot90) % 4)


def sample_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """Random-resized-crop box (torchvision semantics): area fraction ~ U(scale), log-uniform
    aspect (w / h) in `ratio`; after 10 misses the largest centred box with aspect clamped to
    `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if 0 < cw <= width and 0 < ch <= height:
            x0, y0 = rng.uniform(0, width - cw), rng.uniform(0, height - ch)
            return (x0, y0, x0 + cw, y0 + ch)
    aspect = min(max(width / height, ratio[0]), ratio[1])
    return _centered_box(height, width, aspect, 1.0)


def _centered_box(height: int, width: int, aspect: float, fraction: float) -> Box:
    """Largest centred box of aspect w / h inside the image, each side scaled by `fraction`."""
    cw, ch = (width, width / aspect) if width / height < aspect else (height * aspect, height)
    cw, ch = cw * fraction, ch * fraction
    return ((width - cw) / 2, (height - ch) / 2, (width + cw) / 2, (height + ch) / 2)


def sample_geometry(
    height: int,
    width: int,
    out_size: int | tuple[int, int],
    rng: np.random.Generator,
    *,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    vflip: bool = False,
    rot90: bool = False,
) -> Geometry:
    """Train geometry: random resized crop box, then each enabled flip with probability 1/2 and
    a uniform number of quarter turns if `rot90`."""
    box = sample_box(height, width, rng, crop_scale, crop_ratio)
    return Geometry(
        box=box,
        out_size=out_size,
        hflip=hflip and bool(rng.random() < 0.5),
        vflip=vflip and bool(rng.random() < 0.5),
        rot90=int(rng.integers(4)) if rot90 else 0,
    )


def center_geometry(
    height: int, width: int, out_size: int | tuple[int, int], crop_ratio: float = 1.0
) -> Geometry:
    """Eval geometry: resize so the output fits the image, scaled by 1 / crop_ratio, and centre
    crop; for a square output that is "shorter side to out_size / crop_ratio, centre crop"."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    g = Geometry((0, 0, width, height), out_size)
    oh, ow = g.out_size
    return dataclasses.replace(g, box=_centered_box(height, width, ow / oh, crop_ratio))


# ----------------------------------------------------------------------------- application


def _nearest_index(lo: float, hi: float, n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel centre (as PIL NEAREST does)."""
    centres = lo + (np.arange(n_out) + 0.5) * ((hi - lo) / n_out)
    return np.clip(np.floor(centres).astype(np.int64), 0, n_in - 1)


def _resize(x: np.ndarray, box: Box, size: tuple[int, int], interpolation: str) -> np.ndarray:
    h, w = size
    if interpolation == "nearest":  # exact numpy indexing: any dtype, ids preserved
        rows = _nearest_index(box[1], box[3], h, x.shape[0])
        cols = _nearest_index(box[0], box[2], w, x.shape[1])
        return x[rows[:, None], cols[None, :]]
    if interpolation != "bilinear":
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    planes = x[:, :, None] if x.ndim == 2 else x
    out = np.empty((h, w, planes.shape[2]), np.float32)
    for c in range(planes.shape[2]):  # PIL mode "F": float32 per channel
        img = Image.fromarray(np.ascontiguousarray(planes[:, :, c], dtype=np.float32))
        out[:, :, c] = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, box=box))
    return out[:, :, 0] if x.ndim == 2 else out


def apply_geometry(x: np.ndarray, g: Geometry, interpolation: str) -> np.ndarray:
    """Crops `g.box` of an (H, W, C) or (H, W) array, resizes it to `g.out_size`, then flips and
    turns it. "bilinear" returns float32; "nearest" keeps the input dtype and values."""
    if x.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {x.shape}")
    h, w = g.out_size
    y = _resize(x, g.box, (w, h) if g.rot90 % 2 else (h, w), interpolation)
    if g.hflip:
        y = y[:, ::-1]
    if g.vflip:
        y = y[::-1]
    if g.rot90:
        y = np.rot90(y, k=g.rot90, axes=(0, 1))
    return np.ascontiguousarray(y)


def apply_to_fields(example: dict, g: Geometry, spatial: dict[str, str]) -> dict:
    """Returns a copy of `example` with `g` applied to each field in `spatial` (field ->
    interpolation); other fields are passed through unchanged."""
    missing = sorted(set(spatial) - set(example))
    if missing:
        raise KeyError(f"spatial fields {missing} not in example (fields: {sorted(example)})")
    return {k: apply_geometry(v, g, spatial[k]) if k in spatial else v for k, v in example.items()}
