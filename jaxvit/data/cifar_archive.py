"""CIFAR-10 / CIFAR-100 as downloaded (`data.source=cifar_python`): `<data_dir>/cifar-10-python.tar.gz` (or
`cifar-100-python.tar.gz`), or the folder it unpacks to (`cifar-10-batches-py/`, `cifar-100-python/`).

Splits: `train` (data_batch_1..5, or `train`) and `test` (test_batch, or `test`), with slices (`test[:5000]`); a
validation split comes from `data.val_fraction`. CIFAR-100 uses the fine labels.
"""
from __future__ import annotations

import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxvit.data.hf_source import parse_split, slice_rows
from jaxvit.data.labels import InMemoryImages, resolve_labels
from jaxvit.errors import DataError, MissingDataError

# member names inside the archive (and the unpacked folder): (folder, train batches, test batch, meta, names, labels)
LAYOUTS = {
    "cifar-10-python.tar.gz": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                               "batches.meta", b"label_names", b"labels"),
    "cifar-100-python.tar.gz": ("cifar-100-python", ["train"], "test", "meta", b"fine_label_names",
                                b"fine_labels"),
}


def _find(data_dir: Path) -> tuple[Path, tuple]:
    for archive, layout in LAYOUTS.items():
        for candidate in (data_dir / layout[0], data_dir / archive):
            if candidate.exists():
                return candidate, layout
    raise MissingDataError(f"data.source='cifar_python': no {' / '.join(LAYOUTS)} (or the folder it unpacks to) in "
                           f"{str(data_dir)!r}; download it from the CIFAR page into data.data_dir")


def _read_members(location: Path, folder: str, names: list[str]) -> dict[str, dict]:
    out = {}
    if location.is_dir():
        for name in names:
            path = location / name
            if not path.is_file():
                raise MissingDataError(f"{str(path)!r} is missing from the unpacked CIFAR folder")
            out[name] = pickle.loads(path.read_bytes(), encoding="bytes")
        return out
    with tarfile.open(location, "r:gz") as tar:
        for name in names:
            try:
                member = tar.extractfile(f"{folder}/{name}")
            except KeyError as e:
                raise DataError(f"{str(location)!r} has no member {folder}/{name}: not an original CIFAR archive "
                                "(re-download it)") from e
            out[name] = pickle.loads(member.read(), encoding="bytes")
    return out


def load(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(uint8 images [N, 32, 32, 3], labels [N], class names, location) of `split` ("train" | "test", sliced)."""
    location, (folder, train, test, meta, names_key, labels_key) = _find(Path(data_dir))
    base, _, _ = parse_split(split)
    if base not in ("train", "test"):
        raise MissingDataError(f"CIFAR has splits 'train' and 'test', not {base!r}; for validation set "
                               "data.val_fraction (held out of train)")
    batches = train if base == "train" else [test]
    members = _read_members(location, folder, batches + [meta])
    names = [n.decode() for n in members[meta][names_key]]
    images = np.concatenate([members[b][b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(members[b][labels_key]) for b in batches])
    rows = slice_rows(split, len(labels))
    return np.ascontiguousarray(images[rows.start:rows.stop]), labels[rows.start:rows.stop], names, str(location)


class CifarSource(InMemoryImages):
    """A CIFAR split -> examples {"image": uint8 (32, 32, 3), "label"}; the arrays (150 MB for train) are read again
    in each grain worker rather than pickled into it."""

    files = False

    def __init__(self, data_dir: str | Path, split: str, classes: Sequence[str] | None = None):
        self.data_dir, self.split = str(data_dir), split
        images, labels, names, where = load(data_dir, split)
        self.location = f"{where}[{split}]"
        self.labels, self.classes = resolve_labels(labels.tolist(), classes or names, self.location)
        self._images = images
        self.paths = [f"{self.location}#{i}" for i in range(len(labels))]

    def _load_images(self) -> np.ndarray:
        return load(self.data_dir, self.split)[0]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(i), "label": int(self.labels[i])}
