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

import os
from pathlib import Path

import numpy as np

from jaxvit.errors import UserError
from jaxvit.demos.once import write_once

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
