"""Write a demo set into a folder once: a set that is complete there (same parameters, same file count) is reused."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from jaxvit.files import atomic_write_text


def write_once(root: str | os.PathLike, name: str, params: dict, write: Callable[[Path], object],
               entries: tuple[str, ...] = ()) -> Path:
    """Write the demo set `name` into `root` unless the set of these `params` is complete there; returns root.

    `write(tmp)` fills a fresh folder `root/.NAME.partial` (paths inside relative to it); its top-level entries
    then replace those of an earlier set in `root`, and the marker `root/.NAME.json` (params, entries, file count)
    is written last, so a set that was interrupted or lost a file is written again. An entry of `root` this demo
    did not write is never replaced: FileExistsError (for the expected `entries` before writing, for all after)."""
    root = Path(root)
    marker, tmp = root / f".{name}.json", root / f".{name}.partial"
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        old = {}
    owned = list(old.get("entries", entries)) if old else []  # an older jaxvit's marker owned the expected entries
    if tmp.is_file():  # an older jaxvit's mark of an interrupted write
        owned, old = list(entries), {}
        tmp.unlink()
    if old.get("params") == params and _count_files(root, owned) == old.get("files"):
        return root

    def refuse_foreign(entries):
        for e in entries:
            path = root / e
            if e not in owned and path.exists() and not (path.is_dir() and not any(path.iterdir())):
                raise FileExistsError(f"{path} exists and was not written by {name}; choose an empty folder "
                                      "(data.data_dir) for the demo set")

    refuse_foreign(entries)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        entries = tuple(sorted(p.name for p in tmp.iterdir()))
        refuse_foreign(entries)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # From here an interruption leaves a marker without params that owns old and new entries: redone next time.
    atomic_write_text(marker, json.dumps({"params": None, "entries": sorted(set(owned) | set(entries))}))
    for e in sorted(set(owned) | set(entries)):
        path = root / e
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for e in entries:
        os.replace(tmp / e, root / e)
    tmp.rmdir()
    atomic_write_text(marker, json.dumps({"params": params, "entries": list(entries),
                                          "files": _count_files(root, entries)}, indent=1))
    return root


def _count_files(root: Path, entries: list[str]) -> int:
    """Files in `entries` of root (0 for one that is gone)."""
    return sum(1 if (root / e).is_file() else sum(len(files) for _, _, files in os.walk(root / e)) for e in entries)
