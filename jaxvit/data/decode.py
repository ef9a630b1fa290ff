"""Decoding to native-valued arrays (microscopy, multi-band, 16-bit data) and float conversion.

`load_array` returns (H, W, C) in the file's own dtype: nothing is scaled, clipped or converted to
RGB (unlike `sources.load_image`). Supported inputs:
* PNG / JPEG / BMP / WEBP (PIL): L -> C=1, LA -> 2, RGB -> 3, RGBA -> 4, palette -> RGB (RGBA when
  the palette has transparency), 1-bit -> uint8 0/255, 16-bit grayscale PNG / PGM -> uint16, other
  colour spaces (CMYK, YCbCr, ...) -> RGB. EXIF orientation is applied. 16-bit colour PNGs are
  rejected: PIL can only read them reduced to 8 bits.
* TIFF (tifffile): any dtype. 2-D -> C=1; a stack of 2-D pages -> one channel per page; a 3-D
  series is HWC or CHW as its axes say (YXS / CYX, IYX, SYX, ...), or by `to_hwc` when they are
  unknown (tifffile's default "QYX"); several equal 2-D series (pages written one at a time) ->
  one channel each; otherwise the first series.
* .npy: 2-D -> C=1, 3-D via `to_hwc`.
* A sequence of paths: one file per channel group, concatenated along C (same H, W and dtype).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tifffile
from PIL import Image, ImageOps

from jaxvit.data.sources import ImageLoadError

PathLike = str | os.PathLike
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
MAX_HWC_CHANNELS = 16  # a 3-D array whose last axis is at most this (and < H) is taken as HWC
_EXIF_ORIENTATION = 0x0112
_MAX_16BIT_FORMATS = frozenset({"PNG", "PPM"})  # PIL mode "I" from these is 16-bit data


def to_hwc(x: np.ndarray) -> np.ndarray:
    """2-D -> (H, W, 1); 3-D -> HWC if the last axis is small (<= 16) and smaller than the first
    axis, else CHW transposed to HWC."""
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D array, got shape {x.shape}")
    if x.shape[2] <= MAX_HWC_CHANNELS and x.shape[2] < x.shape[0]:
        return x
    return np.moveaxis(x, 0, -1)


def _pil_array(path: PathLike) -> np.ndarray:
    with Image.open(path) as img:
        fmt, raw = img.format, (img.tile[0][3] if img.tile else None)
        if fmt == "PNG" and img.mode in ("RGB", "RGBA", "LA") and ";16" in str(raw):
            raise ValueError("16-bit colour PNG: PIL can only read it reduced to 8 bits; "
                             "save it as TIFF or as one 16-bit grayscale PNG per channel")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode == "1":
            img = img.convert("L")
        elif mode not in ("L", "LA", "RGB", "RGBA", "F") and not mode.startswith("I"):
            img = img.convert("RGB")
        x = np.asarray(img)
    if mode.startswith("I;16"):
        x = x.astype(np.uint16)  # I;16B etc. come back big-endian
    elif mode == "I" and fmt in _MAX_16BIT_FORMATS and x.size and 0 <= x.min() <= x.max() < 2**16:
        x = x.astype(np.uint16)  # PIL gives int32 for 16-bit PGM (and PNG in older versions)
    return x


def _tiff_array(path: PathLike) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        if len(series) > 1 and all(len(s.shape) == 2 and s.shape == series[0].shape
                                   and s.dtype == series[0].dtype for s in series):
            return np.stack([s.asarray() for s in series], axis=-1)  # pages written one by one
        x, axes = series[0].asarray(), series[0].axes
    while x.ndim > 3 and x.shape[0] == 1:  # leading singleton axes (ImageJ TZC...)
        x, axes = x[0], axes[1:]
    if x.ndim == 3 and axes[0] != "Q":  # the file names its axes ("Q" = unknown)
        return x if axes[-1] in "SC" else np.moveaxis(x, 0, -1)
    return to_hwc(x)


def load_array(path: PathLike | Sequence[PathLike]) -> np.ndarray:
    """Decodes an image (or one file per channel) to (H, W, C) with the file's native dtype.

    Raises `ImageLoadError(path, reason)` for unreadable files, unsupported shapes and channel
    files that do not match the first one.
    """
    if not isinstance(path, (str, os.PathLike)):
        return _stack_channels(list(path))
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    try:
        if suffix in TIFF_EXTENSIONS:
            x = _tiff_array(path)
        elif suffix == ".npy":
            x = to_hwc(np.load(path, allow_pickle=False))
        else:
            x = to_hwc(_pil_array(path))
    except Exception as e:  # PIL / tifffile / numpy raise many types
        raise ImageLoadError(str(path), f"{type(e).__name__}: {e}") from e
    if x.dtype.kind not in "uifb" or 0 in x.shape:
        raise ImageLoadError(str(path), f"unsupported array: shape {x.shape}, dtype {x.dtype}")
    return np.ascontiguousarray(x)


def _stack_channels(paths: list[PathLike]) -> np.ndarray:
    if not paths:
        raise ValueError("load_array got an empty list of channel files")
    parts = [load_array(p) for p in paths]
    first = parts[0]
    for p, x in zip(paths[1:], parts[1:]):
        if x.shape[:2] != first.shape[:2]:
            raise ImageLoadError(str(p), f"size {x.shape[1]}x{x.shape[0]} (WxH) differs from "
                                 f"{first.shape[1]}x{first.shape[0]} of {str(paths[0])!r}")
        if x.dtype != first.dtype:
            raise ImageLoadError(str(p), f"dtype {x.dtype} differs from {first.dtype} of "
                                 f"{str(paths[0])!r}")
    return np.concatenate(parts, axis=2)


# ----------------------------------------------------------------------------- float conversion


def to_float(x: np.ndarray, scale: str = "dtype") -> np.ndarray:
    """Casts to float32; with scale="dtype" integer data is divided to roughly [0, 1].

    8/16-bit integers (uint8, uint16, int8, int16) are divided by their dtype's max (255, 65535,
    127, 32767). Wider integers (int32 from PIL mode "I", uint32, int64) are divided by 65535 when
    all values lie in [0, 65535], else by their own max |value| (data dependent). Booleans and
    floats are only cast. scale="none" only casts.
    """
    if scale not in ("dtype", "none"):
        raise ValueError(f"scale must be 'dtype' or 'none', got {scale!r}")
    out = x.astype(np.float32)
    if scale == "none" or x.dtype.kind not in "ui":
        return out
    if x.dtype.itemsize <= 2:
        div = np.iinfo(x.dtype).max
    else:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        div = 65535 if lo >= 0 and hi <= 65535 else max(abs(lo), abs(hi))
    out /= np.float32(div)
    return out


def normalize_channels(
    x: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """(x - mean) / std per channel (last axis) as float32; mean/std of length C or 1."""
    c = x.shape[-1]
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for name, v in (("mean", mean32), ("std", std32)):
        if v.ndim != 1 or len(v) not in (1, c):
            raise ValueError(f"{name} has {v.size} values; expected 1 or {c} (one per channel)")
    out = np.empty(x.shape, np.float32)
    for k in range(c):  # per-channel loops beat broadcasting over a short last axis (same float32 operations)
        np.subtract(x[..., k], mean32[k % len(mean32)], out=out[..., k], dtype=np.float32)
        out[..., k] /= std32[k % len(std32)]
    return out
