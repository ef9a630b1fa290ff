"""Labelled image sources for classification, chosen by `data.source`:

  folder      <data_dir>/<split>/<class>/<images>  (ImageFolder, the default)
  csv         <data_dir>/<split>.csv with columns `path` (relative to the CSV or absolute) and `label`
              (a class name, or a 0-based class index)
  npz         <data_dir>/<split>.npz with `images` uint8 [N, H, W] or [N, H, W, 1 | 3], `labels` int [N] and
              optionally `class_names` [K]
  tfds:NAME   the tensorflow-datasets builder NAME prepared in data.tfds_data_dir (jaxvit.data.tfds_source)
  hf:NAME[:CONFIG]  a Hugging Face `datasets` image data set: hub id, save_to_disk folder or parquet files
              (jaxvit.data.hf_source)
  cifar_python  cifar-10-python.tar.gz / cifar-100-python.tar.gz as downloaded, or their unpacked folder

`data.val_fraction` > 0: the split "val" is that fraction of `data.train_split`, held out by example
(jaxvit.data.holdout), and the train split is the rest.

Each source has `split`, `classes`, `labels` (int32 [N]), `paths` (a file, or `<file>#<index>` naming an in-memory
example in reports), `location` (named in messages), `files` (whether `paths` are files the pre-flight check
reads), `class_counts()`, `__len__` and `__getitem__(i) -> {"path" | "image", "label"}`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.data import holdout
from jaxvit.data.cifar_archive import CifarSource
from jaxvit.data.hf_source import HfSource
from jaxvit.data.labels import InMemoryImages, class_counts, resolve_labels
from jaxvit.data.sources import CsvSource, ImageFolder
from jaxvit.errors import ConfigError, DataError, MissingDataError

SOURCES = ("folder", "csv", "npz", "tfds:NAME", "hf:NAME[:CONFIG]", "cifar_python")


def open_split(data_cfg: Any, split: str, classes: Sequence[str] | None = None):
    """The split `split` of the source `data_cfg.source`; `classes` fixes the label order (None: the split's own)."""
    fraction = data_cfg.get("val_fraction", 0.0)
    if fraction and split in ("val", data_cfg.train_split):
        return holdout.split_off(_open(data_cfg, data_cfg.train_split, classes), fraction, split)
    return _open(data_cfg, split, classes)


def _open(data_cfg: Any, split: str, classes: Sequence[str] | None):
    kind = data_cfg.source
    if kind.startswith("hf:") and kind[3:]:
        return HfSource(kind[3:], split, classes, data_cfg.get("hf_image_column", ""),
                        data_cfg.get("hf_label_column", ""))
    if kind == "cifar_python":
        return CifarSource(data_cfg.data_dir, split, classes)
    if kind == "folder":
        return ImageFolder(data_cfg.data_dir, split, classes)
    if kind == "csv":
        return LabelledCsv(Path(data_cfg.data_dir) / f"{split}.csv", split, classes)
    if kind == "npz":
        return NpzSource(Path(data_cfg.data_dir) / f"{split}.npz", split, classes)
    if kind.startswith("tfds:") and kind[5:]:
        from jaxvit.data.tfds_source import TfdsSource
        return TfdsSource(kind[5:], split, data_cfg.tfds_data_dir, classes)
    raise ConfigError(f"data.source={kind!r} is not a source; use one of {', '.join(SOURCES)}")


class LabelledCsv:
    """`<split>.csv` rows of (path, label) -> examples {"path", "label"}."""

    files = True

    def __init__(self, csv_path: Path, split: str, classes: Sequence[str] | None = None):
        if not Path(csv_path).is_file():
            raise MissingDataError(f"{str(csv_path)!r} not found: data.source='csv' reads <data_dir>/<split>.csv "
                                   "with columns path, label")
        rows = CsvSource(csv_path, image_column="path", text_columns=("label",))
        self.split, self.location, self.paths = split, str(csv_path), rows.paths
        self.labels, self.classes = resolve_labels(rows.text["label"], classes, str(csv_path))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"path": self.paths[i], "label": int(self.labels[i])}

    def class_counts(self) -> np.ndarray:
        return class_counts(self.labels, self.classes)


class NpzSource(InMemoryImages):
    """`<split>.npz` arrays -> examples {"image": uint8 (H, W, 3), "label"}. The images are read again in each
    grain worker rather than pickled into it."""

    files = False

    def __init__(self, npz_path: Path, split: str, classes: Sequence[str] | None = None):
        self.npz_path, self.split, self.location = Path(npz_path), split, str(npz_path)
        if not self.npz_path.is_file():
            raise MissingDataError(f"{self.location!r} not found: data.source='npz' reads <data_dir>/<split>.npz "
                                   "with arrays images (uint8 [N, H, W(, 3)]) and labels (int [N])")
        with np.load(self.npz_path, allow_pickle=False) as z:
            missing = sorted({"images", "labels"} - set(z.files))
            if missing:
                raise DataError(f"{self.location}: arrays {missing} missing (found {z.files}); save with "
                                "np.savez(path, images=uint8 [N, H, W(, 3)], labels=int [N][, class_names=[K]])")
            labels, names = z["labels"], [str(c) for c in z["class_names"]] if "class_names" in z.files else None
            self._images = self._check(z["images"], len(labels))
        if classes is None and names is not None:
            classes = names
        self.labels, self.classes = resolve_labels(labels.tolist(), classes, self.location)
        self.paths = [f"{self.location}#{i}" for i in range(len(self.labels))]

    def _check(self, images: np.ndarray, n: int) -> np.ndarray:
        if images.dtype != np.uint8:
            raise DataError(f"{self.location}: images are {images.dtype}; store uint8 (e.g. "
                            "np.clip(x * 255, 0, 255).round().astype(np.uint8) for floats in [0, 1])")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3) or len(images) != n:
            raise DataError(f"{self.location}: images have shape {images.shape}; need [N, H, W] or [N, H, W, 3] "
                            f"with N = {n} (the number of labels)")
        return images

    def _load_images(self) -> np.ndarray:
        with np.load(self.npz_path, allow_pickle=False) as z:
            return self._check(z["images"], len(self.labels))

    def __getitem__(self, i: int) -> dict:
        image = self.image(i)
        return {"image": np.repeat(image[:, :, None], 3, 2) if image.ndim == 2 else image,
                "label": int(self.labels[i])}

    def class_counts(self) -> np.ndarray:
        return class_counts(self.labels, self.classes)
