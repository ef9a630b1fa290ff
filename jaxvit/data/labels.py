"""Class labels of the labelled sources (`jaxvit.data.labelled`, `tfds_source`, `jump`): names or indices ->
int32 labels, and the per-class counts."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxvit.errors import DataError


def class_counts(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    return np.bincount(labels, minlength=len(classes))


def resolve_labels(values: Sequence, classes: Sequence[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """(int32 labels, class names) from class names or 0-based indices. Without `classes`: names sorted, or for
    indices "0".."max"; with them, names must be among them and indices below their number."""
    values = [v.strip() if isinstance(v, str) else v for v in values]
    as_int = [_int(v) for v in values]
    if all(i is not None for i in as_int):
        labels = np.asarray(as_int, np.int64)
        names = list(classes) if classes is not None else [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.size:
            raise DataError(f"{where}: label {int(bad[0])} is not a class index in [0, {len(names)}) "
                            f"(classes: {names}); fix the labels or set data.classes")
        return labels.astype(np.int32), names
    names = list(classes) if classes is not None else sorted({str(v) for v in values})
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataError(f"{where}: labels {unknown[:10]} are not among the classes {names} (taken from "
                        f"data.classes or the train split); every split needs the same classes")
    return np.asarray([index[str(v)] for v in values], np.int32), names


def _int(v) -> int | None:
    try:
        return int(v) if not isinstance(v, float) or float(v).is_integer() else None
    except (TypeError, ValueError):
        return None


class InMemoryImages:
    """A labelled source whose images live in one array: dropped when pickled into a grain worker and read again
    there by `_load_images()` on first use. Subclasses set `labels`, `classes` and `_images`."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_images"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _images=None)

    def __len__(self) -> int:
        return len(self.labels)

    def _load_images(self) -> np.ndarray:
        raise NotImplementedError

    def image(self, i: int) -> np.ndarray:
        if self._images is None:
            self._images = self._load_images()
        return self._images[i]

    def class_counts(self) -> np.ndarray:
        return class_counts(self.labels, self.classes)
