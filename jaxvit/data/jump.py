"""JUMP Cell Painting sites listed in a CellProfiler "load data" table, as a labelled multi-channel source.

The table (CSV, or parquet read with pyarrow) has one row per imaging site with the columns
Metadata_Plate, Metadata_Well, Metadata_Site and, per channel X, FileName_X and PathName_X (the file's
directory, absolute or relative to the table's directory). Optional columns:
  ssl.jump.label_column  (default Metadata_Treatment)  the class of each site; absent: every site is "unlabelled"
  ssl.jump.split_column  (default Metadata_Split)      train / val / test; absent: every site is in every split
  FileName_CellMask / PathName_CellMask            a 16-bit cell label image per site (examples get "mask")

`open_split(data_cfg, split)` reads the keys in CONFIG_DEFAULTS (`ssl.jump.*`) plus data_dir. `JumpSource[i]` is a
dict of cheap fields; `load_stack` reads its channels as float32 [H, W, C] in [0, 1] (unreadable files raise
ImageLoadError, so the training pipeline replaces the example); `planes` makes (or takes from its cache) the uint8
planes that `views` turns into the views of a site; `to_rgb` makes uint8 RGB views of a stack.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.data import jump_tables, photo_aug
from jaxvit.data.cache import ArrayCache
from jaxvit.data.changes import stamps
from jaxvit.data.decode import load_array
from jaxvit.data.labels import class_counts, resolve_labels
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

DEFAULT_CHANNELS = ("OrigDNA", "OrigER", "OrigRNA", "OrigAGP", "OrigMito")
INTENSITY_MODES = ("image", "plate")
CHANNEL_MODES = ("average", "per_channel", "first3")
META_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
MASK_CHANNEL = "CellMask"
UNLABELLED = "unlabelled"
PERCENTILES = (0.1, 99.9)  # intensities are clipped at these and scaled to [0, 1]
CACHE_VERSION = 1  # of the cached site planes: bumped when the code makes different ones
PLATE_SAMPLE = 16  # sites per plate whose pixels set the plate's percentiles
_PLATE_PIXELS = 2**18  # at most about this many pixels per site and channel enter the plate percentiles

# The keys open_split reads (the config's ssl.jump section), with their defaults.
CONFIG_DEFAULTS: dict[str, Any] = {
    "load_data": "load_data.csv",  # the table (or a glob of per-plate tables), relative to data.data_dir (or absolute)
    "channels": DEFAULT_CHANNELS,  # channel names X of the FileName_X / PathName_X columns, in stack order
    "label_column": "Metadata_Treatment",  # the column of the labels (k-NN monitoring)
    "split_column": "Metadata_Split",  # the column of train / val / test; absent: every split is the whole table
    "intensity": "image",  # image: percentiles per site and channel | plate: per plate and channel
    "channel_mode": "average",  # average | per_channel | first3 (see to_rgb)
    "path_map": (),  # ("s3://prefix=/local/dir", ...): PathName_* prefixes rewritten to a local mirror
    "platemap_dir": "",  # metadata/platemaps/<batch>/ (relative to data_dir): the platemap columns joined by plate, well
    "holdout_by": "well",  # no split column and data.val_fraction > 0: hold out whole wells | plates as "val"
    "clahe": False,  # CLAHE on each uint8 view (the DINOv3 JUMP pretraining's preprocessing)
}


def default_data_keys() -> dict[str, Any]:
    """The ssl.jump.* keys this source reads (besides data.data_dir) and their defaults."""
    return dict(CONFIG_DEFAULTS)


def open_split(data_cfg: Any, split: str, classes: Sequence[str] | None = None) -> JumpSource:
    """The sites of `split` in the tables ssl.jump.load_data names (`jaxvit.data.jump_tables`); `classes` fixes the
    label order."""
    get = lambda key: getattr(data_cfg, key, CONFIG_DEFAULTS[key])  # noqa: E731
    if not getattr(data_cfg, "data_dir", ""):
        raise ConfigError("data.data_dir is empty: set it to the folder of the JUMP load-data table(s)")
    cols, location = jump_tables.site_table(data_cfg, get)
    return JumpSource(cols, split, get("channels"), get("label_column"), get("split_column"), classes,
                      get("intensity"), get("channel_mode"), location=location, clahe=get("clahe"),
                      cache_dir=getattr(data_cfg, "cache_dir", ""))


def read_table(path: str | os.PathLike) -> dict[str, list[str]]:
    """The columns of a CSV (optionally gzipped) or parquet table as lists of stripped strings ("" where missing)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"load-data table {str(path)!r} not found: set data.data_dir and ssl.jump.load_data "
                               "to a CSV (or parquet) with one row per imaging site")
    return jump_tables.read_any(path)


def _channel_names(value: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(c.strip() for c in (value.split(",") if isinstance(value, str) else value))
    if not names or not all(names):
        raise ConfigError(f"ssl.jump.channels={value!r}: name one or more channels, e.g. {DEFAULT_CHANNELS}")
    return names


def _check_mode(key: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"ssl.jump.{key}={value!r} is not one of {', '.join(allowed)}")
    return value


def _plate_samples(plates: list[str], wanted: set[str]) -> dict[str, list[int]]:
    """Up to PLATE_SAMPLE table rows of each wanted plate, spread evenly over its rows."""
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(plates):
        if p in wanted:
            rows.setdefault(p, []).append(i)
    return {p: [r[k] for k in np.unique(np.linspace(0, len(r) - 1, PLATE_SAMPLE).round().astype(int))]
            for p, r in rows.items()}


class JumpSource:
    """Random-access source over the sites of one split of a load-data table (grain RandomAccessDataSource).

    Examples are {"files": channel paths, "plate", "well", "site", "label", "path" (the first channel's file)
    [, "mask": the cell mask's file]}. Plate percentiles are computed on first use from up to PLATE_SAMPLE sites
    spread over the plate's rows (any split) and kept here; pickling keeps those already computed. Sites are
    stored compactly for grain workers (each directory once, file names in one byte array); `paths` is built on
    first use and not pickled.
    """

    files = True  # `paths` are files (the first channel's) that the pre-flight check opens

    def __init__(self, table: str | os.PathLike | dict[str, list[str]], split: str,
                 channels: str | Sequence[str] = DEFAULT_CHANNELS, label_column: str = "Metadata_Treatment",
                 split_column: str = "Metadata_Split", classes: Sequence[str] | None = None,
                 intensity: str = "image", channel_mode: str = "average", location: str = "", clahe: bool = False,
                 cache_dir: str = ""):
        """`table`: a table file, or its columns already read (relative PathName_* then resolve against `location`'s
        folder, absolute ones as they are). `cache_dir` (data.cache_dir): where `planes` keeps decoded sites
        ("": nowhere)."""
        self.split, self.location, self.clahe = split, location or str(table), clahe
        self.cache = ArrayCache(cache_dir, "jump_sites") if cache_dir else None
        self.channels = _channel_names(channels)
        self.intensity = _check_mode("intensity", intensity, INTENSITY_MODES)
        self.channel_mode = _check_mode("channel_mode", channel_mode, CHANNEL_MODES)
        if channel_mode == "first3" and len(self.channels) < 3:
            raise ConfigError(f"ssl.jump.channel_mode='first3' needs at least 3 channels; ssl.jump.channels has "
                              f"{self.channels}")
        cols = table if isinstance(table, dict) else read_table(table)
        self._check_columns(cols)
        rows = self._split_rows(cols, split_column)
        self.plates, self.wells, self.sites = (np.array([cols[c][i] for i in rows]) for c in META_COLUMNS)
        self.labels, self.classes = resolve_labels(self._label_values(cols, label_column, rows), classes,
                                                   self.location)
        # Table rows kept: this split's, then those whose pixels set the plate percentiles.
        samples = _plate_samples(cols["Metadata_Plate"], set(self.plates.tolist()))
        stored = list(dict.fromkeys(rows + [r for rs in samples.values() for r in rs]))
        position = {row: k for k, row in enumerate(stored)}
        self._plate_sample = {p: [position[r] for r in rs] for p, rs in samples.items()}
        self._plate_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.has_mask = {f"FileName_{MASK_CHANNEL}", f"PathName_{MASK_CHANNEL}"} <= cols.keys()
        root = Path(self.location if isinstance(table, dict) else table).parent
        self._store(cols, stored, self.channels + ((MASK_CHANNEL,) if self.has_mask else ()), root)
        probe = [self._file(k, 0) for k in range(min(8, len(rows)))]
        if not any(os.path.isfile(p) for p in probe):
            raise MissingDataError(f"{self.location}: image files not found, e.g. {probe[0]!r}; PathName_* columns "
                                   f"are directories, absolute or relative to the table's folder {str(root)!r}: "
                                   "fix them or move the table")

    def _check_columns(self, cols: dict[str, list[str]]) -> None:
        missing = [c for c in META_COLUMNS if c not in cols]
        if missing:
            raise DataError(f"{self.location}: columns {missing} not found; columns present: {list(cols)[:40]}")
        found = [c[9:] for c in cols if c.startswith("FileName_") and f"PathName_{c[9:]}" in cols]
        absent = [c for c in self.channels if c not in found]
        if absent:
            raise DataError(f"{self.location}: channels {absent} have no FileName_X / PathName_X columns; channels "
                            f"in the table: {found}; set ssl.jump.channels to some of them")

    def _split_rows(self, cols: dict[str, list[str]], column: str) -> list[int]:
        if column not in cols:
            return list(range(len(cols[META_COLUMNS[0]])))
        rows = [i for i, v in enumerate(cols[column]) if v == self.split]
        if not rows:
            raise DataError(f"{self.location}: no sites with {column} == {self.split!r}; values present: "
                            f"{sorted(set(cols[column]))}")
        return rows

    def _label_values(self, cols: dict[str, list[str]], column: str, rows: list[int]) -> list[str]:
        if column not in cols:
            return [UNLABELLED] * len(rows)
        values = [cols[column][i] for i in rows]
        empty = [k for k, v in enumerate(values) if not v]
        if empty:
            k = empty[0]
            raise DataError(f"{self.location}: {len(empty)} sites of split {self.split!r} have no {column} (e.g. "
                            f"plate {self.plates[k]}, well {self.wells[k]}, site {self.sites[k]}); fill it in or "
                            "drop those rows")
        return values

    def _store(self, cols: dict[str, list[str]], rows: list[int], kinds: Sequence[str], root: Path) -> None:
        """Sets _dirs (unique directories), _dir_idx (int32 [rows, kinds]) and _names (utf-8 bytes [rows, kinds])."""
        dirs: dict[str, int] = {}
        idx = np.empty((len(rows), len(kinds)), np.int32)
        names = []
        for r, i in enumerate(rows):
            for k, c in enumerate(kinds):
                name, folder = cols[f"FileName_{c}"][i], cols[f"PathName_{c}"][i]
                if not name:
                    raise DataError(f"{self.location}: data row {i + 1} (plate {cols['Metadata_Plate'][i]}, well "
                                    f"{cols['Metadata_Well'][i]}) has no FileName_{c}; fill it in or drop the row")
                if "://" in folder:
                    raise DataError(f"{self.location}: PathName_{c} is a URL ({folder!r}); download the images "
                                    "and map the prefix to their local folder with ssl.jump.path_map "
                                    "('s3://bucket/prefix=/local/dir')")
                idx[r, k] = dirs.setdefault(str(root / folder), len(dirs))  # an absolute folder replaces root
                names.append(name.encode())
        self._dirs, self._dir_idx = list(dirs), idx
        self._names = np.array(names, dtype=bytes).reshape(len(rows), len(kinds))

    def _file(self, k: int, c: int) -> str:
        return os.path.join(self._dirs[self._dir_idx[k, c]], self._names[k, c].decode())

    def _files(self, k: int) -> tuple[str, ...]:
        return tuple(self._file(k, c) for c in range(len(self.channels)))

    @functools.cached_property
    def paths(self) -> list[str]:
        return [self._file(i, 0) for i in range(len(self))]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "paths"}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        files = self._files(i)
        example = {"files": files, "plate": str(self.plates[i]), "well": str(self.wells[i]),
                   "site": str(self.sites[i]), "label": int(self.labels[i]), "path": files[0]}
        if self.has_mask:
            example["mask"] = self._file(i, len(self.channels))
        return example

    def class_counts(self) -> np.ndarray:
        return class_counts(self.labels, self.classes)

    def __repr__(self) -> str:
        return (f"JumpSource({self.location!r}, split={self.split!r}, n={len(self)}, channels={self.channels}, "
                f"classes={self.classes})")

    def plate_stats(self, plate: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) percentiles of `plate`, float32 [C] each (computed once, then cached)."""
        if plate not in self._plate_stats:
            if plate not in self._plate_sample:
                raise DataError(f"plate {plate!r} is not in {self.location}")
            pixels, errors = [], []
            for k in self._plate_sample[plate]:
                try:
                    x = read_channels(self._files(k))
                except ImageLoadError as e:
                    errors.append(e)
                    continue
                step = max(1, int(np.sqrt(x.shape[0] * x.shape[1] / _PLATE_PIXELS)))
                pixels.append(x[::step, ::step].reshape(-1, x.shape[2]))
            if not pixels:
                raise errors[0]
            if errors:
                log.warning("plate %s: %d of %d sampled sites unreadable (e.g. %s); percentiles from the rest",
                            plate, len(errors), len(errors) + len(pixels), errors[0])
            lo, hi = np.percentile(np.concatenate(pixels), PERCENTILES, axis=0).astype(np.float32)
            self._plate_stats[plate] = (lo, hi)
        return self._plate_stats[plate]

    def load_stack(self, example: dict, intensity: str | None = None) -> np.ndarray:
        """The example's channels as float32 [H, W, C] in [0, 1], clipped at the PERCENTILES of the site
        (intensity="image") or of its plate ("plate"); None: this source's ssl.jump.intensity."""
        mode = _check_mode("intensity", intensity or self.intensity, INTENSITY_MODES)
        x = read_channels(example["files"])
        lo, hi = (np.percentile(x, PERCENTILES, axis=(0, 1)).astype(np.float32) if mode == "image"
                  else self.plate_stats(example["plate"]))
        span = np.where(hi > lo, hi - lo, np.inf)  # a constant channel becomes 0
        return np.clip((x - lo) / span, 0.0, 1.0).astype(np.float32)

    def planes(self, example: dict, mode: str | None = None) -> np.ndarray:
        """`site_planes` of the example's stack for channel_mode `mode` (None: this source's), from the cache
        (data.cache_dir) when it holds them, else decoded (and stored there): 1 byte per pixel and plane, e.g.
        1.2 MB for a 1080 x 1080 site averaged to grey."""
        mode = mode or self.channel_mode
        make = lambda: self._make_planes(example, mode)  # noqa: E731
        if self.cache is None:
            return make()
        files = example["files"]
        stats = self.plate_stats(example["plate"]) if self.intensity == "plate" else None
        settings = dict(version=CACHE_VERSION, mode=mode, clahe=self.clahe, intensity=self.intensity,
                        percentiles=PERCENTILES, stats=None if stats is None else [v.tolist() for v in stats],
                        files=stamps(files[1:]))
        return self.cache.get(files[0], settings, make)

    def _make_planes(self, example: dict, mode: str) -> np.ndarray:
        if self.intensity == "plate":  # fixed percentiles: 8/16-bit counts through lookup tables (same values)
            counts = read_planes(example["files"])
            if all(p.dtype in (np.uint8, np.uint16) for p in counts):
                _check_view_mode(mode, len(counts))
                return _equalise(_count_planes(counts, *self.plate_stats(example["plate"]), mode), mode, self.clahe)
        return site_planes(self.load_stack(example), mode, self.clahe)

    def load_mask(self, example: dict) -> np.ndarray:
        """The example's cell label image as int32 [H, W] (0 = background)."""
        if "mask" not in example:
            raise DataError(f"{self.location} has no FileName_{MASK_CHANNEL} / PathName_{MASK_CHANNEL} columns")
        m = load_array(example["mask"])
        if m.shape[2] != 1 or m.dtype.kind not in "ui":
            raise ImageLoadError(example["mask"], f"a cell mask must be one integer channel, got {m.shape[2]} "
                                 f"channel(s) of {m.dtype}")
        return m[:, :, 0].astype(np.int32)


def read_channels(files: Sequence[str]) -> np.ndarray:
    """One single-channel image per file, stacked as float32 [H, W, C] in the files' own values."""
    return np.stack([p.astype(np.float32) for p in read_planes(files)], axis=-1)


def read_planes(files: Sequence[str]) -> list[np.ndarray]:
    """One single-channel image per file, [H, W] each in its own dtype (all the same size)."""
    planes: list[np.ndarray] = []
    for f in files:
        a = load_array(f)
        if a.shape[2] != 1:
            raise ImageLoadError(f, f"{a.shape[2]} channels; a load-data table names one single-channel image "
                                 "per channel")
        if planes and a.shape[:2] != planes[0].shape:
            (h, w), (h0, w0) = a.shape[:2], planes[0].shape
            raise ImageLoadError(f, f"size {w}x{h} (WxH) differs from {w0}x{h0} of {files[0]!r}")
        planes.append(a[:, :, 0])
    return planes


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _gray3(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x


def site_planes(stack: np.ndarray, mode: str = "average", clahe: bool = False) -> np.ndarray:
    """The uint8 planes [H, W, K] every view of a float [H, W, C] stack in [0, 1] is made of (`views`):
    average: K=1, the channels' mean; per_channel: K=C, each channel; first3: K=3, channels 0-2 as RGB. `clahe`:
    each view equalised (photo_aug.clahe, as on the RGB view: a grey view stays grey)."""
    _check_view_mode(mode, stack.shape[-1])
    planes = {"average": lambda: _uint8(stack.mean(axis=-1, keepdims=True)), "per_channel": lambda: _uint8(stack),
              "first3": lambda: _uint8(stack[:, :, :3])}[mode]()
    return _equalise(planes, mode, clahe)


def _check_view_mode(mode: str, c: int) -> None:
    _check_mode("channel_mode", mode, CHANNEL_MODES)
    if mode == "first3" and c < 3:
        raise ConfigError(f"ssl.jump.channel_mode='first3' needs at least 3 channels; the stack has {c}: add "
                          "channels to ssl.jump.channels or use 'average' / 'per_channel'")


def _count_planes(counts: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, mode: str) -> np.ndarray:
    """`site_planes` (before CLAHE) of 8/16-bit channel planes scaled by fixed per-channel percentiles (lo, hi),
    through one lookup table per channel: the same float32 operations per value as `load_stack` and the mean, without
    the float stack."""
    span = np.where(hi > lo, hi - lo, np.inf)
    used = range(3) if mode == "first3" else range(len(counts))
    luts = [np.clip((np.arange(np.iinfo(counts[k].dtype).max + 1, dtype=np.float32) - lo[k]) / span[k], 0.0, 1.0)
            for k in used]
    if mode != "average":
        return np.stack([_uint8(lut[counts[k]]) for k, lut in zip(used, luts)], axis=-1)
    total = luts[0][counts[0]]
    for k in used[1:]:  # the channels summed in order in float32, as np.mean does
        total += luts[k][counts[k]]
    total /= np.float32(len(counts))
    return _uint8(total)[:, :, None]


def _equalise(planes: np.ndarray, mode: str, clahe: bool) -> np.ndarray:
    if not clahe:
        return planes
    if mode == "first3":
        return photo_aug.clahe(planes)
    return np.stack([photo_aug.clahe(_gray3(planes[:, :, k]))[:, :, 0] for k in range(planes.shape[2])], axis=-1)


def views(planes: np.ndarray, mode: str = "average", rng: np.random.Generator | None = None,
          n_views: int = 1) -> list[np.ndarray]:
    """`n_views` uint8 images from `site_planes`: grey [H, W] (average: the mean, the same array for every view;
    per_channel: each view one channel drawn with `rng`) or RGB [H, W, 3] (first3, the same array for every view)."""
    _check_mode("channel_mode", mode, CHANNEL_MODES)
    if mode == "per_channel":
        if rng is None:
            raise ValueError("views(mode='per_channel') needs rng, a numpy Generator")
        return [planes[:, :, k] for k in rng.integers(0, planes.shape[2], n_views)]
    return [planes if mode == "first3" else planes[:, :, 0]] * n_views


def to_rgb(stack: np.ndarray, mode: str = "average", rng: np.random.Generator | None = None,
           n_views: int = 1, clahe: bool = False) -> list[np.ndarray]:
    """`n_views` uint8 (H, W, 3) images of a float [H, W, C] stack in [0, 1] (`site_planes`, `views`; grey
    views replicated to 3 channels)."""
    made: dict[int, np.ndarray] = {}
    return [made.setdefault(id(v), _gray3(v)) for v in views(site_planes(stack, mode, clahe), mode, rng, n_views)]
