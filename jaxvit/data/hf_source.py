"""Hugging Face `datasets` image data (`data.source=hf:NAME[:CONFIG]`).

NAME is a hub id (`uoft-cs/cifar10`: downloaded when online; offline read from the datasets cache, or else from the
hub cache's snapshot of the repo that `hf download` / huggingface_hub left), a directory
written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a directory of parquet files in the hub's layout
(`<config>/<split>-00000-of-00001.parquet` or `<split>-*.parquet`). Splits take slices: `test[:5000]`,
`train[10%:]`. The image column is the first `Image` feature (or `data.hf_image_column`), the label column the
first `ClassLabel` feature (or `data.hf_label_column`); class names come from the ClassLabel.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxvit.data.labels import class_counts, resolve_labels
from jaxvit.errors import ConfigError, DataError, MissingDataError, UserError

_SLICE = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """"test[:5000]" -> ("test", None, "5000"); a bare name -> (name, None, None)."""
    m = _SLICE.match(spec.replace(" ", ""))
    if not m:
        raise ConfigError(f"split {spec!r} is not NAME or NAME[start:stop] (e.g. 'test[:5000]', 'train[10%:]')")
    return m["name"], m["start"], m["stop"]


def _bound(value: str | None, n: int, default: int) -> int:
    if value is None:
        return default
    k = round(n * int(value[:-1]) / 100) if value.endswith("%") else int(value)
    return max(0, min(n, k + n if k < 0 else k))


def slice_rows(spec: str, n: int) -> range:
    _, start, stop = parse_split(spec)
    return range(_bound(start, n, 0), _bound(stop, n, n))


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise UserError("data.source='hf:...' needs the datasets package: pip install 'jaxvit[hf]'") from e
    return datasets


def load_split(name: str, split: str):
    """The `datasets.Dataset` of split `split` (slice applied) of `hf:` source `name` ("NAME" or "NAME:CONFIG")."""
    datasets = _datasets()
    repo, _, config = name.partition(":")
    base, _, _ = parse_split(split)
    path = Path(repo).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if base not in saved:
                raise MissingDataError(f"{str(path)!r} (save_to_disk) has no split {base!r}; it has "
                                       f"{sorted(saved)}: set data.train_split / eval.val_split / eval.test_split")
            saved = saved[base]
        rows = slice_rows(split, len(saved))
        return saved.select(rows) if len(rows) != len(saved) else saved
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else repo, config or None, split=split)
    except ValueError as e:  # unknown split
        raise MissingDataError(f"data.source='hf:{name}': {e}") from e
    except Exception as e:  # noqa: BLE001 - offline without a cache, unknown id, gated repository, ...
        snapshot = None if path.is_dir() else _hub_snapshot(repo)
        if snapshot is not None:  # offline, downloaded by huggingface_hub but never loaded by datasets
            return load_split(f"{snapshot}:{config}" if config else str(snapshot), split)
        if path.is_dir():
            raise DataError(f"data.source='hf:{name}': cannot read {str(path)!r} as a data set ({e}); it needs "
                            "parquet files named <split>-*.parquet (optionally under <config>/) or a "
                            "save_to_disk directory") from e
        raise MissingDataError(
            f"data.source='hf:{name}': cannot load split {split!r} ({type(e).__name__}: {e}). Online: check the id "
            "(and set HF_TOKEN for a gated data set); offline (HF_HUB_OFFLINE=1): download it once where there is "
            f"internet (python -c \"import datasets; datasets.load_dataset('{repo}')\", or hf download {repo} "
            "--repo-type dataset) so the cache holds it, or "
            "point data.source at a save_to_disk directory (hf:/path/to/dir)") from e


def _hub_snapshot(repo: str) -> Path | None:
    """The hub cache's snapshot folder of data set `repo` (refs/main), as a download left it; None if absent.
    Offline, datasets reads only its own Arrow cache, not files that `hf download` (huggingface_hub) fetched."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache, or not a repo id
        return None


def _pick(features, wanted: str, kind: str, key: str, location: str) -> str:
    if wanted:
        if wanted not in features:
            raise ConfigError(f"{key}={wanted!r} is not a column of {location}; columns: {list(features)}")
        return wanted
    found = [c for c, f in features.items() if type(f).__name__ == kind]
    if not found:
        raise DataError(f"{location}: no {kind} column among {dict((c, type(f).__name__) for c, f in features.items())}"
                        f"; set {key}")
    return found[0]


class HfSource:
    """A split of an `hf:` data set -> examples {"image": uint8 (H, W, 3), "label"}."""

    files = False

    def __init__(self, name: str, split: str, classes: Sequence[str] | None = None,
                 image_column: str = "", label_column: str = ""):
        datasets = _datasets()
        self.split, self.location = split, f"hf:{name}[{split}]"
        ds = load_split(name, split)
        self.image_column = _pick(ds.features, image_column, "Image", "data.hf_image_column", self.location)
        self.label_column = _pick(ds.features, label_column, "ClassLabel", "data.hf_label_column", self.location)
        label_feature = ds.features[self.label_column]
        names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
        self.labels, self.classes = resolve_labels(ds[self.label_column], classes or names, self.location)
        # Undecoded images: each worker decodes the bytes itself (PIL in grain workers, never pickled arrays).
        self._ds = ds.select_columns([self.image_column]).cast_column(self.image_column,
                                                                      datasets.Image(decode=False))
        self.paths = [f"{self.location}#{i}" for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        cell = self._ds[int(i)][self.image_column]
        try:
            data = cell["bytes"] if cell.get("bytes") else Path(cell["path"]).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                image = np.asarray(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.location} row {i}: cannot decode column {self.image_column!r} ({e})") from e
        return {"image": image, "label": int(self.labels[i])}

    def class_counts(self) -> np.ndarray:
        return class_counts(self.labels, self.classes)
