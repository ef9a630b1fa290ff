"""Image-folder data sources: locating splits, listing files, decoding to RGB, scanning.

Layout: `<data_dir>/<split_dir>/<class>/<image files>` where `<split_dir>` is `<split>` or any
single directory ending in `_<split>` (e.g. `gz2_5class_train`). Files below a class directory are
found recursively; hidden files and directories (leading '.') are ignored.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from jaxvit.errors import DataError, MissingDataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
_EXIF_ORIENTATION = 0x0112


class ImageLoadError(Exception):
    """An image file could not be opened, decoded or converted to 8-bit RGB."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # both in args so the error survives pickling
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image {self.path!r}: {self.reason}"


# ----------------------------------------------------------------------------- split discovery


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_split_dir(data_dir: str | os.PathLike, split: str) -> Path:
    """Returns `<data_dir>/<split>` or the single `<data_dir>/*_<split>` directory."""
    root = Path(data_dir)
    if not root.is_dir():
        raise MissingDataError(f"data.data_dir={str(root)!r} does not exist or is not a directory: "
                               "set --config.data.data_dir to your data")
    candidates = [d for d in _visible_dirs(root) if d.name == split or d.name.endswith(f"_{split}")]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        present = ", ".join(p.name for p in sorted(root.iterdir())) or "<empty>"
        raise MissingDataError(
            f"no directory for split {split!r} in {str(root)!r}: looked for '{split}/' or "
            f"'*_{split}/'; found: {present}"
        )
    names = ", ".join(d.name for d in candidates)
    raise DataError(f"ambiguous split {split!r} in {str(root)!r}: several candidates ({names})")


# ----------------------------------------------------------------------------- listing


def list_images(class_dir: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found)


class ImageFolder:
    """Random-access source over `<split_dir>/<class>/<images>` (grain RandomAccessDataSource).

    `classes` fixes the label order (label i = classes[i]); by default it is the sorted list of
    class directory names. Every given class must have a directory and no other directory may exist.
    """

    files = True  # examples are files (read by the pre-flight check)

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        classes: Sequence[str] | None = None,
    ):
        self.split = split
        self.split_dir = find_split_dir(data_dir, split)
        self.location = str(self.split_dir)
        found = [d.name for d in _visible_dirs(self.split_dir)]
        if classes is None:
            if not found:
                raise DataError(f"no class directories in {str(self.split_dir)!r}")
            self.classes = found
        else:
            self.classes = list(classes)
            missing = sorted(set(self.classes) - set(found))
            extra = sorted(set(found) - set(self.classes))
            if missing:
                raise DataError(f"class directories missing in {str(self.split_dir)!r}: {missing} "
                                "(every split needs the same classes)")
            if extra:
                raise DataError(
                    f"unexpected class directories in {str(self.split_dir)!r}: {extra} "
                    f"(expected only {self.classes}; every split needs the same classes)"
                )
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            files = list_images(self.split_dir / name)
            if not files:
                log.warning("class %r has no images in %s", name, self.split_dir)
            paths.extend(str(f) for f in files)
            labels.extend([label] * len(files))
        if not paths:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"no images ({exts}) found under {str(self.split_dir)!r}")
        self.paths: list[str] = paths
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"path": self.paths[index], "label": int(self.labels[index])}

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.split_dir)!r}, n={len(self)}, classes={self.classes})"


# ----------------------------------------------------------------------------- decoding


def _scale_to_uint8(x: np.ndarray, is_float: bool) -> np.ndarray:
    """Maps a high-bit-depth or float array to uint8.

    Integers: values already in [0, 255] are kept; values in [0, 65535] (16-bit data) are divided
    by 257, which maps the full 16-bit range onto 8 bits and keeps brightness comparable between
    images (unlike per-image stretching); anything else (negative or > 16 bit) is min-max scaled.
    Floats: [0, 1] is multiplied by 255, [0, 255] is kept, anything else is min-max scaled.
    NaN/inf become 0.
    """
    x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1 and is_float:
        x = x * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535 and not is_float:
        x = x / 257.0
    else:  # min-max stretch; a constant image becomes black
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    """Converts a loaded PIL image of any common mode to uint8 (H, W, 3)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _to_rgb8(img)
    if mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode == "L":
        gray = np.asarray(img)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on black: colour * alpha.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255
        return rgb.astype(np.uint8)
    if mode.startswith("I") or mode == "F":
        x = _scale_to_uint8(np.asarray(img), is_float=(mode == "F"))
        return np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x[:, :, :3]
    # CMYK, YCbCr, HSV, ... : let PIL convert.
    return np.asarray(img.convert("RGB"))


def load_image(path: str | os.PathLike, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decodes an image file to uint8 RGB (H, W, 3).

    Grayscale is replicated to 3 channels, palettes expanded, alpha composited on black, CMYK and
    other colour spaces converted by PIL, 16-bit/32-bit/float data scaled as in `_scale_to_uint8`,
    EXIF orientation applied, and multi-frame files (TIFF stacks, animations) use frame 0.
    `min_size` (width, height) after orientation: a JPEG is decoded at the smallest of its 1/1, 1/2, 1/4, 1/8
    scales that keeps at least that size (PIL draft mode: the scaling happens in the DCT, far cheaper than a
    full decode; the pixels differ slightly from a full decode then resized). Other formats ignore it.
    Raises `ImageLoadError(path, reason)` on any failure.
    """
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if min_size is not None and img.format == "JPEG":
                w, h = min_size
                transposed = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                img.draft("RGB", (h, w) if transposed else (w, h))
            img.load()
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            arr = _to_rgb8(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageLoadError(str(path), f"{type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ImageLoadError(str(path), f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------- scanning


@dataclasses.dataclass
class ScanReport:
    """Result of `scan`: file counts per split/class and the files that failed to load."""

    data_dir: str
    classes: list[str]
    split_dirs: dict[str, str]
    counts: dict[str, dict[str, int]]  # split -> class -> number of image files
    unreadable: list[tuple[str, str]]  # (path, reason)
    decoded: bool

    @property
    def ok(self) -> bool:
        return not self.unreadable

    def total(self, split: str) -> int:
        return sum(self.counts[split].values())

    def summary(self, max_listed: int = 20) -> str:
        splits = list(self.counts)
        width = max([len("class"), len("unreadable")] + [len(c) for c in self.classes])
        cols = [max(len(s), 8) for s in splits]
        head = "class".ljust(width) + "".join(f"  {s:>{w}}" for s, w in zip(splits, cols))
        lines = [f"data_dir: {self.data_dir}", head, "-" * len(head)]
        for c in self.classes:
            lines.append(c.ljust(width) + "".join(
                f"  {self.counts[s][c]:>{w}}" for s, w in zip(splits, cols)))
        lines.append("-" * len(head))
        lines.append("total".ljust(width) + "".join(
            f"  {self.total(s):>{w}}" for s, w in zip(splits, cols)))
        if self.decoded:
            bad_per_split = {s: 0 for s in splits}
            for path, _ in self.unreadable:
                for s in splits:
                    if Path(path).is_relative_to(self.split_dirs[s]):
                        bad_per_split[s] += 1
            lines.append("unreadable".ljust(width) + "".join(
                f"  {bad_per_split[s]:>{w}}" for s, w in zip(splits, cols)))
        else:
            lines.append("(files only opened, not decoded)")
        for path, reason in self.unreadable[:max_listed]:
            lines.append(f"  UNREADABLE {path}: {reason}")
        if len(self.unreadable) > max_listed:
            lines.append(f"  ... and {len(self.unreadable) - max_listed} more")
        return "\n".join(lines)


def _check_file(path: str, decode: bool) -> str | None:
    """Returns None if the file is usable, else the reason."""
    try:
        if decode:
            load_image(path)
        else:
            with Image.open(path):
                pass
    except ImageLoadError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - anything from PIL means "unreadable"
        return f"{type(e).__name__}: {e}"
    return None


def scan(
    data_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    decode: bool = True,
    workers: int = 2,
) -> ScanReport:
    """Counts images per split and class and finds unreadable files by opening each one.

    `decode=True` fully decodes and converts every file (as training would); `decode=False` only
    parses headers. Raises if a split directory is missing or empty, or the class sets differ.
    """
    folders = {s: ImageFolder(data_dir, s) for s in splits}
    class_sets = {s: f.classes for s, f in folders.items()}
    reference = class_sets[splits[0]]
    for s, classes in class_sets.items():
        if classes != reference:
            raise DataError(
                f"class directories differ between splits {splits[0]!r} and {s!r}: "
                f"only in {splits[0]!r}: {sorted(set(reference) - set(classes))}, "
                f"only in {s!r}: {sorted(set(classes) - set(reference))}"
            )
    counts = {
        s: dict(zip(f.classes, (int(c) for c in f.class_counts()))) for s, f in folders.items()
    }
    all_paths = [p for f in folders.values() for p in f.paths]
    unreadable: list[tuple[str, str]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # PIL releases the GIL while decoding, so threads scale.
        for i, (path, reason) in enumerate(
            zip(all_paths, pool.map(lambda p: _check_file(p, decode), all_paths))
        ):
            if reason is not None:
                unreadable.append((path, reason))
            if (i + 1) % 20000 == 0:
                log.info("scanned %d / %d files", i + 1, len(all_paths))
    return ScanReport(
        data_dir=str(data_dir),
        classes=list(reference),
        split_dirs={s: str(f.split_dir) for s, f in folders.items()},
        counts=counts,
        unreadable=unreadable,
        decoded=decode,
    )


# ----------------------------------------------------------------------------- CSV source


class CsvSourceError(DataError):
    """A CSV data file is malformed or refers to images that do not exist (a ValueError)."""


class CsvSource:
    """Random-access source over a CSV with one row per image (grain RandomAccessDataSource).

    `image_column` holds image paths, absolute or relative to `root` (default: the CSV's
    directory); `target_columns` are read as float32 targets [N, T] and `label_column`, if given,
    as int32 labels, `text_columns` as stripped strings (`text[column]`). Every image file must exist.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        image_column: str = "image_path",
        target_columns: Sequence[str] = (),
        root: str | os.PathLike | None = None,
        label_column: str | None = None,
        text_columns: Sequence[str] = (),
    ):
        self.csv_path = Path(csv_path)
        self.root = Path(root) if root is not None else self.csv_path.parent
        self.image_column = image_column
        self.target_columns = list(target_columns)
        self.label_column = label_column
        where = str(self.csv_path)
        with open(self.csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise CsvSourceError(f"{where} is empty: expected a header row naming the "
                                     f"columns ({image_column!r}, ...) and one row per image")
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
            wanted = [image_column, *self.target_columns, *text_columns] + ([label_column] if label_column else [])
            missing = [c for c in wanted if c not in reader.fieldnames]
            if missing:
                raise CsvSourceError(f"{where}: column(s) {missing} not found; columns present: "
                                     f"{reader.fieldnames}; pass the right column names")
            paths, targets, labels = [], [], []
            self.text: dict[str, list[str]] = {c: [] for c in text_columns}
            for row in reader:
                line = reader.line_num
                paths.append(self._image_path(row, where, line))
                targets.append([self._number(row, c, float, where, line)
                                for c in self.target_columns])
                if label_column:
                    labels.append(self._number(row, label_column, int, where, line))
                for c in text_columns:
                    self.text[c].append((row[c] or "").strip())
        if not paths:
            raise CsvSourceError(f"{where} has a header but no rows: add one row per image")
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise CsvSourceError(
                f"{where}: {len(absent)} of {len(paths)} image files do not exist, e.g. "
                f"{absent[:3]}; relative paths in column {image_column!r} are resolved against "
                f"root {str(self.root)!r}: fix the paths or pass root=")
        self.paths: list[str] = paths
        self.targets: np.ndarray = np.asarray(targets, np.float32).reshape(len(paths), -1)
        self.labels: np.ndarray | None = np.asarray(labels, np.int32) if label_column else None

    def _image_path(self, row: dict, where: str, line: int) -> str:
        value = (row[self.image_column] or "").strip()
        if not value:
            raise CsvSourceError(f"{where}: line {line}: column {self.image_column!r} is empty; "
                                 f"every row needs an image path")
        return str(self.root / value)  # an absolute value replaces root

    @staticmethod
    def _number(row: dict, column: str, kind: type, where: str, line: int) -> float | int:
        value = (row[column] or "").strip()
        try:
            x = kind(value)
        except ValueError:
            x = None
        if x is None or not np.isfinite(x):
            what = "an integer" if kind is int else "a finite number"
            raise CsvSourceError(f"{where}: line {line}: column {column!r} has value {value!r}, "
                                 f"expected {what}; fix or drop that row")
        return x

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        item = {"path": self.paths[index], "targets": self.targets[index]}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item

    def __repr__(self) -> str:
        return (f"CsvSource({str(self.csv_path)!r}, n={len(self)}, "
                f"targets={self.target_columns}, label={self.label_column!r})")
