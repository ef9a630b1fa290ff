"""A disk cache of arrays computed from image files: decoded, normalised microscopy sites, so that later epochs
skip the decode and the float work on the whole site.

An entry is `<cache_dir>/<key[:2]>/<key>.npy`; the key is the sha256 of the source files (absolute path, size,
modification time) and the settings that made the array, so a changed file or setting never serves a stale array:
it makes a new entry (old ones stay until the folder is deleted). Entries are written atomically (a complete file
or none), so grain workers and hosts sharing the folder may fill it at once: the same key means the same array.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxvit.files import atomic_write

log = logging.getLogger(__name__)
_warned: set[str] = set()  # cache folders this process has warned about (once each)
VERSION = 1  # bumped when the arrays a setting makes change


def key(files: Sequence[str], settings: dict) -> str:
    """The entry's name: sha256 of the files' (absolute path, size, mtime in ns) and `settings` (JSON-able)."""
    stats = []
    for f in files:
        st = os.stat(f)  # a missing file raises here, as reading it would
        stats.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps([VERSION, stats, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_or_make(cache_dir: str, files: Sequence[str], settings: dict, make: Callable[[], np.ndarray]) -> np.ndarray:
    """The cached array of (files, settings), else `make()`, stored for next time."""
    try:
        path = Path(cache_dir) / (k := key(files, settings))[:2] / f"{k}.npy"
    except OSError:
        return make()  # the reader raises the proper error
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:  # e.g. a disk that filled up under another writer
            log.warning("site cache entry %s unreadable (%s): made again", path, e)
    array = make()
    try:
        atomic_write(path, lambda tmp: np.save(tmp, array, allow_pickle=False))
    except OSError as e:
        if cache_dir not in _warned:
            _warned.add(cache_dir)
            log.warning("site cache %s not written (%s): arrays are made again each time; fix the folder or set "
                        "the cache folder to 'none'", path, e)
    return array
