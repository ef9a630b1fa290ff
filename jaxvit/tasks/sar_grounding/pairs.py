"""Paired Sentinel-1 / Sentinel-2 tiles listed in a CSV, normalised with TerraMind's pre-training statistics.

Layout: one CSV (data.pairs, relative to data.data_dir or absolute) with a header and one row per pair:

    s1_path,s2_path[,split][,id]
    s1/t0001.tif,s2/t0001.tif,train,t0001

  s1_path, s2_path  the tiles' files, absolute or relative to the CSV's folder; the two must cover the same
                    ground on the same pixel grid (same height and width)
  split             optional: train / val / test (any names); absent: every row is in every split
  id                optional: the name predictions are written under; absent: the stem of s2_path

Files: GeoTIFF (.tif/.tiff, read with tifffile: band-interleaved "SYX" or pixel-interleaved "YXS", any dtype;
the georeferencing is not used) or .npy band stacks in (C, H, W) band-first order, as rasterio's `read()` gives;
an (H, W, C) .npy is recognised when its last axis has the expected band count and its first does not.
Bands are in terratorch's PRETRAINED_BANDS order (STATS below): S2L2A 12 bands B01 B02 B03 B04 B05 B06 B07
B08 B8A B09 B11 B12 (no B10) as reflectance x 10000 (the L2A product's integers), S2L1C 13 (with B10), S1GRD /
S1RTC 2 bands VV, VH as backscatter in dB (data.s1_scale="linear" converts sigma0 / gamma0 10*log10 first).
Processing baseline >= 04.00 L2A products carry +1000 on every band: set data.s2_offset=1000 (added to the
mean, as terratorch's `offset`).

Normalisation: (x - mean) / std per band. Nodata: non-finite values (NaN, inf, linear S1 <= 0) and S2 pixels
whose bands are all 0 (the L2A nodata value). data.nodata="zero" sets them to 0 after normalisation (the band
mean) and to 0 in the example's `valid` mask; "error" raises ImageLoadError naming the file.

Examples: `PairTransform.train(example, rng)` / `.eval(example)` give {"s1": float32 [S, S, 2], "s2": float32
[S, S, 12], "valid": float32 [S, S]} with S = data.image_size: a random S x S crop, flips and quarter turns
(data.aug.hflip / vflip / rot90) applied identically to both tiles (train), the centre crop (eval). The rng
comes from data.pipeline, so the content of each step is a function of (seed, step). Unreadable files, wrong
band counts and pair size mismatches raise ImageLoadError(path, reason) (the training pipeline replaces the
example with a warning, evaluation masks it); `open_split` checks the first pair up front and raises DataError.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.data.decode import TIFF_EXTENSIONS, load_array
from jaxvit.data.geometry import Geometry, apply_geometry
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import ConfigError, DataError, MissingDataError


@dataclasses.dataclass(frozen=True)
class BandStats:
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


# TerraMind v1 pre-training statistics: terratorch terratorch/models/backbones/terramind/model/terramind_register.py
# (PRETRAINED_BANDS, v1_pretraining_mean, v1_pretraining_std; the "untok_*@224" entries; tok_* are the same).
_L2A = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
STATS: dict[str, BandStats] = {
    "S2L2A": BandStats(_L2A,
                       (1390.458, 1503.317, 1718.197, 1853.91, 2199.1, 2779.975, 2987.011, 3083.234, 3132.22,
                        3162.988, 2424.884, 1857.648),
                       (2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926, 1820.257, 1871.918, 1753.829,
                        1797.379, 1434.261, 1334.311)),
    "S2L1C": BandStats(_L2A[:10] + ("B10",) + _L2A[10:],
                       (2357.089, 2137.385, 2018.788, 2082.986, 2295.651, 2854.537, 3122.849, 3040.56, 3306.481,
                        1473.847, 506.07, 2472.825, 1838.929),
                       (1624.683, 1675.806, 1557.708, 1833.702, 1823.738, 1733.977, 1732.131, 1679.732, 1727.26,
                        1024.687, 442.165, 1331.411, 1160.419)),
    "RGB": BandStats(("R", "G", "B"), (87.271, 80.931, 66.667), (58.767, 47.663, 42.631)),  # S2 RGB in 0..255
    "S1GRD": BandStats(("VV", "VH"), (-12.599, -20.293), (5.195, 5.890)),  # dB
    "S1RTC": BandStats(("VV", "VH"), (-10.93, -17.329), (4.391, 4.459)),  # dB
    "DEM": BandStats(("DEM",), (670.665,), (951.272,)),  # metres
}
S1_MODALITIES, S2_MODALITIES = ("S1GRD", "S1RTC"), ("S2L2A", "S2L1C")
S1_SCALES, NODATA_MODES = ("db", "linear"), ("zero", "error")

# The data.* keys this source reads (besides data.data_dir, data.image_size and data.aug.{hflip,vflip,rot90}).
CONFIG_DEFAULTS: dict[str, Any] = {
    "pairs": "pairs.csv",  # the pair table, relative to data.data_dir (or absolute)
    "s1_modality": "S1GRD",  # S1GRD | S1RTC: which statistics the SAR tiles are normalised with
    "s2_modality": "S2L2A",  # S2L2A | S2L1C
    "s1_scale": "db",  # db | linear: the unit of the S1 files (TerraMind expects dB)
    "s2_offset": 0.0,  # added to the S2 mean: 1000 for L2A processing baseline >= 04.00
    "nodata": "zero",  # zero: nodata -> 0 after normalisation, valid = 0 there | error: raise
}


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"data.{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def normalize(x: np.ndarray, modality: str, offset: float = 0.0) -> np.ndarray:
    """(x - (mean + offset)) / std per band of an [..., C] array with `modality`'s TerraMind statistics."""
    s = STATS[modality]
    return ((x - (np.float32(offset) + np.asarray(s.mean, np.float32))) / np.asarray(s.std, np.float32)
            ).astype(np.float32)


def denormalize(x: np.ndarray, modality: str, offset: float = 0.0) -> np.ndarray:
    """The inverse of `normalize`: back to the modality's physical units (reflectance x 10000, dB, ...)."""
    s = STATS[modality]
    return (x * np.asarray(s.std, np.float32) + np.asarray(s.mean, np.float32) + np.float32(offset)).astype(
        np.float32)


def rgb_composite(s2: np.ndarray, modality: str = "S2L2A", max_reflectance: float = 0.3) -> np.ndarray:
    """uint8 true-colour view (B04, B03, B02) of a normalised [..., H, W, C] S2 tile, reflectance
    0..max_reflectance mapped to 0..255 (whatever data.s2_offset was: normalisation removed it)."""
    bands = STATS[modality].bands
    rgb = denormalize(s2, modality)[..., [bands.index(b) for b in ("B04", "B03", "B02")]]
    return np.rint(np.clip(rgb / (10000.0 * max_reflectance), 0.0, 1.0) * 255.0).astype(np.uint8)


def read_bands(path: str, bands: int) -> np.ndarray:
    """A GeoTIFF or .npy band stack as float32 [H, W, bands] (see the module docstring for layouts).
    Raises ImageLoadError naming the file when it is missing, unreadable or has another band count."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TIFF_EXTENSIONS and suffix != ".npy":
        raise ImageLoadError(path, "not a GeoTIFF (.tif/.tiff) or .npy band stack")
    if not os.path.isfile(path):
        raise ImageLoadError(path, "file not found")
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except Exception as e:  # numpy raises several types for corrupt files
            raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
        if x.ndim == 2:  # one band
            x = x[:, :, None]
        elif x.ndim == 3 and not (x.shape[0] != bands and x.shape[2] == bands):
            x = np.moveaxis(x, 0, -1)  # (C, H, W), the documented layout
        layout = "(C, H, W) or (H, W, C)"
    else:
        x = load_array(path)
        layout = "the TIFF's (H, W, C) as tifffile reads its axes"
    if x.ndim != 3 or x.shape[2] != bands:
        raise ImageLoadError(path, f"array of shape {x.shape} ({layout}); expected {bands} bands")
    if x.dtype.kind not in "uif":
        raise ImageLoadError(path, f"dtype {x.dtype} is not numeric")
    return x.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PairFormat:
    """How the files of a pair are read and normalised (the data.* keys of CONFIG_DEFAULTS)."""

    s1_modality: str = "S1GRD"
    s2_modality: str = "S2L2A"
    s1_scale: str = "db"
    s2_offset: float = 0.0
    nodata: str = "zero"

    def __post_init__(self):
        _choice("s1_modality", self.s1_modality, S1_MODALITIES)
        _choice("s2_modality", self.s2_modality, S2_MODALITIES)
        _choice("s1_scale", self.s1_scale, S1_SCALES)
        _choice("nodata", self.nodata, NODATA_MODES)

    def read_s1(self, path: str) -> np.ndarray:
        """An S1 tile [H, W, 2] in dB, normalised; nodata stays NaN (`load` handles it)."""
        s1 = read_bands(path, len(STATS[self.s1_modality].bands))
        if self.s1_scale == "linear":
            with np.errstate(divide="ignore", invalid="ignore"):
                s1 = np.where(s1 > 0, 10.0 * np.log10(s1), np.nan).astype(np.float32)
        return normalize(s1, self.s1_modality)

    def load(self, example: dict) -> dict[str, np.ndarray]:
        """The pair's full tiles: {"s1": [H, W, 2], "s2": [H, W, C], "valid": [H, W]}, float32, normalised."""
        s1_path, s2_path = example["s1"], example["s2"]
        s1 = self.read_s1(s1_path)
        s2 = read_bands(s2_path, len(STATS[self.s2_modality].bands))
        if s1.shape[:2] != s2.shape[:2]:
            raise ImageLoadError(s1_path, f"size {s1.shape[1]}x{s1.shape[0]} (WxH) differs from "
                                 f"{s2.shape[1]}x{s2.shape[0]} of its S2 tile {s2_path!r}; pairs must share a grid")
        s2_nodata = np.all(s2 == 0, axis=-1)
        s2 = normalize(s2, self.s2_modality, self.s2_offset)
        bad1 = ~np.isfinite(s1).all(-1)
        bad2 = ~np.isfinite(s2).all(-1) | s2_nodata
        if self.nodata == "error":
            for path, bad, what in ((s1_path, bad1, "non-finite"), (s2_path, bad2, "non-finite or all bands 0")):
                if bad.any():
                    raise ImageLoadError(path, f"{int(bad.sum())} nodata pixels ({what}); set data.nodata='zero' "
                                         "to zero them after normalisation")
        s1 = np.where(np.isfinite(s1), s1, 0.0).astype(np.float32)
        s2 = np.where(np.isfinite(s2) & ~s2_nodata[..., None], s2, 0.0).astype(np.float32)
        return {"s1": s1, "s2": s2, "valid": (~(bad1 | bad2)).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class PairTransform:
    """Reads a pair (`fmt`) and cuts an image_size x image_size window of both tiles with the same geometry."""

    fmt: PairFormat
    image_size: int
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True

    def _window(self, example: dict, tiles: dict[str, np.ndarray], corner: tuple[int, int] | None,
                rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        side = self.image_size
        h, w = tiles["s2"].shape[:2]
        if h < side or w < side:
            raise ImageLoadError(example["s2"], f"tile {w}x{h} (WxH) is smaller than data.image_size={side}")
        if corner is None:  # random window and orientation (train)
            corner = (int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1)))
            flips = (self.hflip and bool(rng.random() < 0.5), self.vflip and bool(rng.random() < 0.5),
                     int(rng.integers(4)) if self.rot90 else 0)
        else:
            flips = (False, False, 0)
        x0, y0 = corner
        g = Geometry((x0, y0, x0 + side, y0 + side), side, *flips)
        return {k: apply_geometry(v, g, "nearest") for k, v in tiles.items()}  # nearest: exact pixel copies

    def train(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A random window, flips and quarter turns, the same for S1, S2 and the valid mask."""
        return self._window(example, self.fmt.load(example), None, rng)

    def eval(self, example: dict) -> dict[str, np.ndarray]:
        """The centre window."""
        tiles = self.fmt.load(example)
        h, w = tiles["s2"].shape[:2]
        return self._window(example, tiles, ((w - self.image_size) // 2, (h - self.image_size) // 2), None)

    def check(self, source: SarPairSource, indices: Any = None) -> list[tuple[str, str]]:
        """(path, reason) of each unreadable pair among `indices` (default: all), read as `eval` does."""
        problems = []
        for i in range(len(source)) if indices is None else indices:
            try:
                self.eval(source[int(i)])
            except ImageLoadError as e:
                problems.append((e.path, e.reason))
        return problems


class SarPairSource:
    """Random-access source of the pairs of one split (grain RandomAccessDataSource): examples are
    {"s1": path, "s2": path, "id": str, "path": the S2 path}. `split=None` takes every row."""

    def __init__(self, table: str | os.PathLike, split: str | None = None):
        self.location, self.split = str(table), split
        path = Path(table)
        if not path.is_file():
            raise MissingDataError(f"pair table {self.location!r} not found: set data.data_dir and data.pairs to a "
                                   "CSV with columns s1_path,s2_path[,split][,id]")
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]
        missing = {"s1_path", "s2_path"} - set(rows[0] if rows else {})
        if missing:
            raise DataError(f"{self.location}: columns {sorted(missing)} not found (or no rows); expected a header "
                            "s1_path,s2_path[,split][,id] and one row per pair")
        if split is not None and "split" in rows[0]:
            values = sorted({r["split"] for r in rows})
            rows = [r for r in rows if r["split"] == split]
            if not rows:
                raise DataError(f"{self.location}: no rows with split == {split!r}; values present: {values}")
        root = path.parent
        self.s1, self.s2, self.ids = [], [], []
        for r in rows:
            for col in ("s1_path", "s2_path"):
                if not r[col] or "://" in r[col]:
                    raise DataError(f"{self.location}: a row has s1_path={r['s1_path']!r}, s2_path={r['s2_path']!r}; "
                                    f"give local files, absolute or relative to {str(root)!r}")
            self.s1.append(str(root / r["s1_path"]))  # an absolute path replaces root
            self.s2.append(str(root / r["s2_path"]))
            self.ids.append(r.get("id") or Path(r["s2_path"]).stem)
        probe = self.s1[:8] + self.s2[:8]
        if not any(os.path.isfile(p) for p in probe):
            raise MissingDataError(f"{self.location}: tile files not found, e.g. {probe[0]!r}; paths are absolute or "
                                   f"relative to the table's folder {str(root)!r}")

    def __len__(self) -> int:
        return len(self.s2)

    def __getitem__(self, i: int) -> dict:
        return {"s1": self.s1[i], "s2": self.s2[i], "id": self.ids[i], "path": self.s2[i]}

    def __repr__(self) -> str:
        return f"SarPairSource({self.location!r}, split={self.split!r}, n={len(self)})"


def _key(data_cfg: Any, name: str) -> Any:
    return getattr(data_cfg, name, CONFIG_DEFAULTS[name])


def pair_transform(data_cfg: Any) -> PairTransform:
    """The transform the data.* keys describe (CONFIG_DEFAULTS, data.image_size, data.aug.{hflip,vflip,rot90});
    the task's train_transform is its `.train`, eval_transform its `.eval`."""
    fmt = PairFormat(**{k: _key(data_cfg, k) for k in ("s1_modality", "s2_modality", "s1_scale", "nodata")},
                     s2_offset=float(_key(data_cfg, "s2_offset")))
    aug = getattr(data_cfg, "aug", None)
    flips = {k: bool(getattr(aug, k, True)) for k in ("hflip", "vflip", "rot90")}
    size = int(getattr(data_cfg, "image_size", 224))
    if size <= 0:
        raise ConfigError(f"data.image_size={size} must be positive")
    return PairTransform(fmt, size, **flips)


def _check_units(example: dict, fmt: PairFormat) -> None:
    """Catches the usual unit mistakes on one pair: S1 in the other scale, S2 reflectance in 0..1."""
    s1 = read_bands(example["s1"], 2)
    s1 = s1[np.isfinite(s1)]
    if s1.size and fmt.s1_scale == "db" and s1.min() >= 0 and np.median(s1) < 1:
        raise DataError(f"{example['s1']}: S1 values are all >= 0 with median {np.median(s1):.3g}: that is linear "
                        "backscatter, not dB; set data.s1_scale='linear'")
    if s1.size and fmt.s1_scale == "linear" and np.mean(s1 <= 0) > 0.5:
        raise DataError(f"{example['s1']}: most S1 values are <= 0: that is dB, not linear backscatter; set "
                        "data.s1_scale='db'")
    s2 = read_bands(example["s2"], len(STATS[fmt.s2_modality].bands))
    top = np.nanmax(s2) if np.isfinite(s2).any() else 0.0
    if 0 < top <= 2.0:
        raise DataError(f"{example['s2']}: S2 values are at most {top:.3g}: reflectance in 0..1; TerraMind expects "
                        "reflectance x 10000 (the L2A product's integers): multiply the tiles by 10000")


def open_split(data_cfg: Any, split: str | None) -> SarPairSource:
    """The pairs of `split` in <data.data_dir>/<data.pairs>; the first pair is read and checked (band counts,
    sizes, units) so that a systematic mistake stops the run with a DataError before training."""
    table = Path(_key(data_cfg, "pairs"))
    data_dir = getattr(data_cfg, "data_dir", "")
    if not table.is_absolute():
        if not data_dir:
            raise ConfigError("data.data_dir is empty: set it to the folder of the pair table (data.pairs)")
        table = Path(data_dir) / table
    source = SarPairSource(table, split)
    if len(source):
        transform = pair_transform(data_cfg)
        problems = transform.check(source, [0])
        if problems:
            path, reason = problems[0]
            raise DataError(f"{source.location}: the first pair of split {split!r} is unusable: {path}: {reason}")
        _check_units(source[0], transform.fmt)
    return source
