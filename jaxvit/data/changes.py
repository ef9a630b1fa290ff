"""What each split held when the run started, so that a resume on changed data is noticed.

<workdir>/data_splits.json: per split, the example count and, for file-based sources, the sorted (path relative to
data.data_dir, size) list and its sha256 (the fingerprint). A resume whose splits differ stops with one line naming
the counts and the first differing files; `data.allow_changed=True` accepts the new data (the file is rewritten and
the data order restarts at the resumed step: the batch at step t is a function of (seed, t) and the split).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FILE = "data_splits.json"


def describe(sources: dict[str, Any], data_dir: str) -> dict:
    """{split: {count[, fingerprint, files]}} of the sources (files: [relative path, size], sorted)."""
    out = {}
    for split, src in sources.items():
        entry: dict[str, Any] = {"count": len(src)}
        paths = getattr(src, "paths", None)
        if paths is not None:
            files = sorted([_relative(p, data_dir), _size(p)] for p in list(paths)[:len(src)])
            entry["fingerprint"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()
            entry["files"] = files
        out[split] = entry
    return out


def differences(old: dict, new: dict) -> list[str]:
    """One phrase per split that changed: counts and the first files removed, added or resized."""
    out = []
    for split in sorted(set(old) & set(new)):
        a, b = old[split], new[split]
        if a.get("count") == b.get("count") and a.get("fingerprint") == b.get("fingerprint"):
            continue
        what = [f"{a.get('count')} -> {b.get('count')} examples"]
        was, now = dict(map(tuple, a.get("files", []))), dict(map(tuple, b.get("files", [])))
        for label, names in (("removed", [p for p in was if p not in now]), ("added", [p for p in now if p not in was]),
                             ("resized", [p for p in was if p in now and was[p] != now[p]])):
            if names:
                more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
                what.append(f"{label} {', '.join(names[:3])}{more}")
        out.append(f"{split}: " + "; ".join(what))
    return out


def check(workdir: Path, current: dict, resumed_step: int | None, allow_changed: bool, write: bool) -> bool:
    """Compare with the stored description on resume; store `current` when there is none (or it changed and
    that is allowed). Returns whether the data changed. Raises a one-line DataError when it changed and is not
    allowed. `write`: this process writes the file (process 0)."""
    from jaxvit.errors import DataError
    path = Path(workdir) / FILE
    stored = json.loads(path.read_text()) if path.exists() else None
    changed = differences(stored, current) if stored is not None and resumed_step is not None else []
    if changed and not allow_changed:
        raise DataError(f"the data changed since this run started ({path}): {' | '.join(changed)}; to resume on the "
                        f"new data from step {resumed_step} (its order restarts there) set "
                        "--config.data.allow_changed=True, or restore the old files")
    if write and (stored is None or changed or resumed_step is None):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current))
        tmp.replace(path)
    return bool(changed)


def stamps(paths) -> list[list]:
    """[absolute path, size, modification time in ns] of each file: what a cache key of several files holds."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def _relative(path: str, data_dir: str) -> str:
    root, full = os.path.abspath(data_dir) if data_dir else "", os.path.abspath(path)
    return os.path.relpath(full, root) if root and full.startswith(root + os.sep) else str(path)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1
