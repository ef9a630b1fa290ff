"""A validation split held out of the train split (`data.val_fraction`), for data published without one.

The choice is by example, not by position: example i goes to validation when a hash of its identity (its path, or
`<source>#<index>` for in-memory data) falls below the fraction, so it stays the same when files are added or the
listing order changes, and never depends on the seed or the number of processes.
"""
from __future__ import annotations

import hashlib

import numpy as np


def held_out(identities: list[str], fraction: float) -> np.ndarray:
    """bool [N]: which examples are validation."""
    cut = int(fraction * 2**32)
    return np.asarray([int.from_bytes(hashlib.sha1(s.encode()).digest()[:4], "big") < cut for s in identities],
                      bool)


PER_EXAMPLE = ("paths", "labels", "mask_paths")  # a source's per-example lists, cut with its rows


class Subset:
    """The rows `rows` of a source: its per-example lists cut, every other attribute the source's."""

    def __init__(self, source, rows: np.ndarray, split: str):
        self._source, self._rows, self.split = source, rows, split
        for name in PER_EXAMPLE:
            if hasattr(source, name):
                values = getattr(source, name)
                setattr(self, name, values[rows] if isinstance(values, np.ndarray) else [values[i] for i in rows])
        self.location = f"{source.location} ({len(rows)} held out by data.val_fraction)" if split == "val" \
            else source.location

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_source":
            raise AttributeError(name)
        return getattr(self._source, name)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        return self._source[int(self._rows[i])]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


def split_off(source, fraction: float, split: str) -> Subset:
    """`split` == "val": the held-out examples of the train source; else the rest."""
    is_val = held_out(source.paths, fraction)
    return Subset(source, np.flatnonzero(is_val if split == "val" else ~is_val), split)
