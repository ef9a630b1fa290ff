"""Arrays computed once per file and kept on disk (`data.cache_dir`), so that later epochs skip the work (the biomass
task: each photo decoded and resized to its views once).

An entry is <cache_dir>/<kind>/<key[:2]>/<key>.npy, key = sha256 of the file's absolute path, size and modification
time (ns), the settings that shape the array, and Pillow's and numpy's versions: a changed file or setting gets a
new key, so nothing stale is served (old entries stay: delete the folder to reclaim the space). Entries are written
to a temporary file and renamed (`files.atomic_write`): grain workers and hosts sharing the folder may compute the
same entry at once, the last rename wins with the same content, and a reader sees a whole file or none. A folder
that cannot be written (full, read-only) is warned about once per process; the arrays are then computed each time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL

from jaxvit.data.changes import stamps
from jaxvit.files import atomic_write

log = logging.getLogger("jaxvit")
_unwritable: set[Path] = set()  # folders already warned about, in this process


class ArrayCache:
    """`get(path, settings, make)`: the array `make()` computed from the file at `path` with `settings`, from the
    cache when present. Picklable (a folder name), for grain workers."""

    def __init__(self, root: str | os.PathLike, kind: str):
        self.root = Path(os.path.expanduser(os.fspath(root))) / kind

    def entry(self, path: str | os.PathLike, settings: dict[str, Any]) -> Path:
        ident = [*stamps([path])[0], settings, PIL.__version__, np.__version__]
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def get(self, path: str | os.PathLike, settings: dict[str, Any], make: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            entry = self.entry(path, settings)
        except OSError:  # an unreadable file: make() raises its own, clearer error
            return make()
        try:
            return np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # absent (or, from a foreign writer, damaged): compute it
            pass
        x = make()
        try:
            atomic_write(entry, lambda tmp: np.save(tmp, x, allow_pickle=False))
        except OSError as e:  # a full or read-only disk: go on without the cache
            if self.root not in _unwritable:
                log.warning("data.cache_dir: cannot write %s (%s); computing each array anew", entry, e)
                _unwritable.add(self.root)
        return x
