"""Demo data sets written into `data.data_dir` before a run (`data.demo`), so demos need no download:

  gz2      synthetic galaxies in the Galaxy Zoo 2 release's layout (Hart et al. 2016 table, filename mapping,
           images_gz2/images/), built into the five-class folders by jaxvit.data.gz2 (jaxvit.demos.gz2)
  digits   scikit-learn's 1,797 handwritten digits (8x8, 10 classes), real data shipped inside the package,
           as <data_dir>/{train,val,test}.npz (60/20/20, stratified) for data.source="npz"
  pasture  synthetic top-down pasture photos with five dry masses, in the CSIRO Image2Biomass long-CSV layout
           (jaxvit.demos.pasture)
  cells    synthetic multi-channel Cell Painting sites (4 treatments, 3 plates, instance masks) in the JUMP
           load-data layout (jaxvit.demos.cells; data.source="jump"); for the cell_distance task (DINOCell) in
           LIVECell's layout (images + COCO polygon annotations)
  sar      synthetic paired Sentinel-1 / Sentinel-2 L2A tiles (64 px GeoTIFFs) with a pairs.csv
           (jaxvit.demos.sar; the TerraMind stage-3 task)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from jaxvit.errors import UserError
from jaxvit.files import atomic_write_text

DEMO_SETS = ("", "gz2", "digits", "pasture", "cells", "sar")


def write(name: str, data_dir: str | os.PathLike, seed: int = 0) -> None:
    """Write demo set `name` into `data_dir` unless it is there already."""
    if name == "gz2":
        from jaxvit.demos.gz2 import write_demo
        write_demo(data_dir, seed=seed)
    elif name == "digits":
        write_digits(data_dir, seed)
    elif name == "pasture":
        from jaxvit.demos.pasture import KAGGLE_PER_SPLIT, write_dataset as write_pasture
        write_pasture(data_dir, per_split=KAGGLE_PER_SPLIT, seed=seed, hidden_test=True)  # the Kaggle layout
    elif name == "cells":
        from jaxvit.demos.cells import write_dataset as write_cells
        write_cells(data_dir, seed=seed)
    elif name == "sar":
        from jaxvit.demos.sar import write_dataset as write_sar
        write_sar(data_dir, seed=seed)


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


def write_digits(data_dir: str | os.PathLike, seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)) -> Path:
    """scikit-learn's digits as uint8 images (0..16 scaled to 0..255) in train/val/test npz files."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("data.demo='digits' needs scikit-learn: pip install scikit-learn") from e

    def write(out: Path) -> None:
        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        rng = np.random.default_rng(seed)
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(digits.target == c))
            a, b = round(len(idx) * fractions[0]), round(len(idx) * sum(fractions))
            parts["train"].append(idx[:a]), parts["val"].append(idx[a:b]), parts["test"].append(idx[b:])
        for split, chunks in parts.items():
            idx = rng.permutation(np.concatenate(chunks))
            np.savez(out / f"{split}.npz", images=images[idx], labels=digits.target[idx].astype(np.int32),
                     class_names=np.array([str(c) for c in range(10)]))

    return write_once(data_dir, "digits", {"seed": seed, "fractions": list(fractions)}, write,
                      ("train.npz", "val.npz", "test.npz"))
