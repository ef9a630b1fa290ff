"""Pre-flight check of a file list before training, with a manifest that caches the result.

Modes: "full" decodes every file; "sample" opens the header of every file and decodes a seeded
random sample (so a file whose header parses but whose pixel data is broken, e.g. a truncated
PNG, is only found if it is in the sample); "auto" is "full" up to `full_limit` files, else
"sample"; "off" checks nothing.

The manifest (JSON) stores a fingerprint of the file list (sorted path, size, mtime_ns) with the
mode and result; a later call with the same fingerprint and a request no more thorough than the
stored one ("full" covers "sample"; a sample covers a request for at most as many decodes) returns
the stored result without reading any file.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from jaxvit.data.decode import TIFF_EXTENSIONS
from jaxvit.data.sources import ImageLoadError
from jaxvit.files import atomic_write_text

log = logging.getLogger(__name__)

MODES = ("auto", "full", "sample", "off")
_MANIFEST_VERSION = 1


@dataclasses.dataclass
class PreflightReport:
    mode: str  # mode used: "full", "sample" or "off"
    unreadable: list[tuple[str, str]]  # (path, reason), in input order
    checked: int  # files opened (header or full decode)
    decoded: int  # files fully decoded
    seconds: float  # time this call took
    cached: bool = False  # result read from the manifest, no file opened

    @property
    def ok(self) -> bool:
        return not self.unreadable

    def summary(self, max_listed: int = 20) -> str:
        source = " (from manifest)" if self.cached else ""
        lines = [f"preflight {self.mode}{source}: {self.checked} files checked, {self.decoded} "
                 f"decoded, {len(self.unreadable)} unreadable, {self.seconds:.1f}s"]
        lines += [f"  UNREADABLE {p}: {r}" for p, r in self.unreadable[:max_listed]]
        if len(self.unreadable) > max_listed:
            lines.append(f"  ... and {len(self.unreadable) - max_listed} more")
        return "\n".join(lines)


def open_header(path: str) -> None:
    """Parses a file's header without decoding pixels; raises if that fails."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TIFF_EXTENSIONS:
        with tifffile.TiffFile(path) as tif:
            if not len(tif.pages):  # tifffile only warns about a bad first-page offset
                raise ValueError("TIFF has no readable page")
    elif suffix == ".npy":
        np.load(path, mmap_mode="r", allow_pickle=False)  # also fails if the data is short
    else:
        with Image.open(path):
            pass


def _reason(fn: Callable[[str], Any], path: str) -> str | None:
    """None if fn(path) succeeds, else why it failed."""
    try:
        fn(path)
    except ImageLoadError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001 - anything raised means "unreadable"
        return f"{type(e).__name__}: {e}"
    return None


def fingerprint(paths: Sequence[str]) -> str:
    """sha256 over sorted (path, size, mtime_ns); a missing file hashes as size -1."""
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            st = os.stat(p)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{p}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable preflight manifest %s: %s", path, e)
        return None
    return data if data.get("version") == _MANIFEST_VERSION else None


def _write_manifest(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))  # readers see the old or the new manifest, never part


def check_files(
    paths: Sequence[str],
    mode: str,
    decode: Callable[[str], Any],
    manifest: Path | None = None,
    sample: int = 1000,
    full_limit: int = 50_000,
    seed: int = 0,
    workers: int = 2,
) -> PreflightReport:
    """Checks that `paths` can be read (see module docstring); `decode` loads one file."""
    if mode not in MODES:
        raise ValueError(f"preflight mode must be one of {MODES}, got {mode!r}")
    start = time.perf_counter()
    paths = [str(p) for p in paths]
    n = len(paths)
    if mode == "auto":
        mode = "full" if n <= full_limit else "sample"
    if mode == "off":
        return PreflightReport("off", [], 0, 0, time.perf_counter() - start)
    wanted = n if mode == "full" else min(sample, n)

    manifest = Path(manifest) if manifest is not None else None
    key = fingerprint(paths) if manifest is not None else ""
    stored = _read_manifest(manifest) if manifest is not None else None
    if stored and stored.get("fingerprint") == key and stored.get("sampled", -1) >= wanted:
        return PreflightReport(
            mode=stored["mode"],
            unreadable=[(p, r) for p, r in stored["unreadable"]],
            checked=stored["checked"],
            decoded=stored["decoded"],
            seconds=time.perf_counter() - start,
            cached=True,
        )

    reasons: dict[int, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        if mode == "full":
            to_decode = list(range(n))
        else:
            for i, r in enumerate(pool.map(lambda p: _reason(open_header, p), paths)):
                if r is not None:
                    reasons[i] = r
            picked = np.random.default_rng(seed).choice(n, size=wanted, replace=False)
            to_decode = sorted(int(i) for i in picked if i not in reasons)
        for i, r in zip(to_decode, pool.map(lambda i: _reason(decode, paths[i]), to_decode)):
            if r is not None:
                reasons[i] = r
    report = PreflightReport(
        mode=mode,
        unreadable=[(paths[i], reasons[i]) for i in sorted(reasons)],
        checked=n,
        decoded=len(to_decode),
        seconds=time.perf_counter() - start,
    )
    log.info("%s", report.summary(max_listed=5))
    if manifest is not None:
        _write_manifest(manifest, {
            "version": _MANIFEST_VERSION,
            "fingerprint": key,
            "n_files": n,
            "sampled": wanted,  # files picked for decoding (header failures among them skipped)
            **{k: v for k, v in dataclasses.asdict(report).items() if k != "cached"},
        })
    return report
