"""Synthetic pasture-biomass images in the CSIRO Image2Biomass competition's layout.

Each image is a top-down photo of a small pasture quadrat: a brown soil
background with a grain of clods and stones, covered by straight green grass
blades, yellow-brown dead (senescent) blades and clover trefoils (three round,
darker blue-green leaflets with a pale mark each). Per image the renderer draws
the latent dry masses ``green_g`` (0-150 g), ``dead_g`` (0-80 g) and ``clover_g``
(0-60 g; dead and clover are often zero, as in the real data), renders a
Poisson number of elements proportional to each mass (a fixed expected number
per gram, all types drawn in one shuffled order so they occlude each other
alike), and reports as targets the masses the drawn counts imply times a small
log-normal "leaf density" noise. The competition's identities hold exactly (at
the 4 decimals written)::

    GDM_g = Dry_Green_g + Dry_Clover_g
    Dry_Total_g = GDM_g + Dry_Dead_g

The tabular columns are auxiliary and correlated with the composition:
``Height_Ave_cm`` grows with the green (and some of the dead) mass,
``Pre_GSHH_NDVI`` with the green share and the cover, ``Species`` names clover
when there is some, ``State`` and ``Sampling_Date`` lean towards dry states and
summer months when much of the pasture is dead.

``write_dataset`` lays the files out like the competition::

    root/train.csv            long format, one row per (image, target)
    root/val.csv, test.csv    the same columns (see below)
    root/{train,val,test}/ID<10 digits>.jpg

with the columns ``sample_id,image_path,Sampling_Date,State,Species,
Pre_GSHH_NDVI,Height_Ave_cm,target_name,target``; ``sample_id`` is
``<image id>__<target_name>`` and ``image_path`` is relative to ``root``. The
real competition's ``test.csv`` only has ``sample_id,image_path,target_name``
(its labels are hidden): with ``hidden_test=True`` (the demo) the test split is
written that way, its labels going to ``test_solution.csv`` (sample_id, target)
so that a submission can be scored; otherwise every split is labelled.

The default set (240/80/80 images of 128 x 64 px) is written in a few seconds.
Run ``python -m jaxvit.demos.pasture --root=DIR`` to write it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from jaxvit.demos.once import write_once
from jaxvit.files import write_csv
from jaxvit.tasks.biomass.maths import TARGETS

COLUMNS: tuple[str, ...] = (
    "sample_id", "image_path", "Sampling_Date", "State", "Species",
    "Pre_GSHH_NDVI", "Height_Ave_cm", "target_name", "target",
)
STATES: tuple[str, ...] = ("Tas", "Vic", "NSW", "WA")
SPECIES: tuple[str, ...] = ("Ryegrass_Clover", "Ryegrass", "Phalaris", "Fescue", "Clover")
DEFAULT_PER_SPLIT: dict[str, int] = {"train": 240, "val": 80, "test": 80}
KAGGLE_PER_SPLIT: dict[str, int] = {"train": 320, "test": 80}  # the demo: train.csv (folds) + unlabelled test.csv
HIDDEN_COLUMNS = ("sample_id", "image_path", "target_name")  # the competition's test.csv
SOLUTION_NAME = "test_solution.csv"  # hidden_test: the test labels (sample_id, target)
DEFAULT_SIZE: tuple[int, int] = (128, 64)  # width x height, landscape 2:1 like the real photos
DEMO_NAME = "synthetic_pasture"  # its marker: <root>/.synthetic_pasture.json
JPEG_QUALITY = 90
_VERSION = 1  # bump when the renderer changes so cached datasets are redone

# Mass ranges (g) and expected elements per gram in the quadrat (at any resolution).
_MAX_G = {"green": 150.0, "dead": 80.0, "clover": 60.0}
_PER_G = {"green": 1.8, "dead": 1.8, "clover": 1.4}
_REF_AREA = 128 * 64
_SS = 2  # supersampling factor of the drawing canvas (box-filtered down)
_DENSITY_NOISE = 0.05  # sigma of the log-normal noise between visible and reported mass


def _latent_masses(rng: np.random.Generator) -> dict[str, float]:
    """Dry masses (g) of one quadrat; dead and clover are frequently absent."""
    green = _MAX_G["green"] * rng.beta(1.2, 2.2)
    dead = 0.0 if rng.random() < 0.35 else _MAX_G["dead"] * rng.beta(1.1, 2.5)
    clover = 0.0 if rng.random() < 0.5 else _MAX_G["clover"] * rng.beta(1.0, 2.5)
    return {"green": green, "dead": dead, "clover": clover}


def _soil(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Brown soil with low-frequency patches and fine grain, float (h, w, 3) in 0..255."""
    base = np.array([118.0, 88.0, 62.0]) * rng.uniform(0.8, 1.15) + rng.normal(0.0, 6.0, 3)
    # Low-frequency patches: a coarse random grid upsampled bilinearly by PIL.
    coarse = rng.normal(0.0, 1.0, (max(h // 16, 2), max(w // 16, 2))).astype(np.float32)
    patches = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    grain = rng.normal(0.0, 1.0, (h, w))
    shade = 1.0 + 0.08 * patches[..., None] + 0.06 * grain[..., None]
    return np.clip(base[None, None] * shade, 0.0, 255.0)


def _colour(rng: np.random.Generator, base: tuple[float, float, float], jitter: float) -> tuple[int, int, int]:
    c = np.asarray(base) * rng.uniform(1.0 - jitter, 1.0 + jitter) + rng.normal(0.0, 5.0, 3)
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


_GREEN = (70.0, 150.0, 45.0)  # ryegrass blades
_DEAD = (196.0, 170.0, 110.0)  # straw
_CLOVER = (45.0, 112.0, 70.0)  # darker, bluer green leaflets
_CLOVER_MARK = (185.0, 215.0, 185.0)  # the pale chevron on each leaflet


def render_pasture(
    rng: np.random.Generator,
    masses: dict[str, float],
    size: tuple[int, int] = DEFAULT_SIZE,
    *,
    green_tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, dict[str, int]]:
    """Render one quadrat as uint8 (height, width, 3) and the element counts drawn.

    `masses` maps "green", "dead", "clover" to grams; each element count is a
    Poisson draw with mean mass x elements-per-gram, whatever the resolution.
    """
    w, h = size
    # The photo always shows the same quadrat: element counts do not depend on the
    # resolution, lengths scale with it (tuned on 128 x 64 px).
    s = np.sqrt(w * h / _REF_AREA)
    counts = {k: int(rng.poisson(max(masses[k], 0.0) * _PER_G[k])) for k in ("green", "dead", "clover")}

    W, H, ss = w * _SS, h * _SS, _SS * s
    canvas = Image.fromarray(np.round(_soil(rng, W, H)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    kinds = np.array([0] * counts["dead"] + [1] * counts["green"] + [2] * counts["clover"], dtype=np.int8)
    rng.shuffle(kinds)
    n = kinds.size
    # Element positions, orientations and sizes, drawn for all at once.
    xy = rng.uniform(0.0, 1.0, (n, 2)) * np.array([W, H])
    # Grass leans a little towards a per-image wind direction.
    theta = rng.uniform(0.0, np.pi) + rng.normal(0.0, 0.5, n)
    length = rng.uniform(7.0, 12.0, n) * ss
    width = np.maximum(1, np.round(rng.uniform(1.2, 1.9, n) * ss)).astype(int)
    radius = rng.uniform(1.5, 2.0, n) * ss  # clover leaflet radius
    green = tuple(g * t for g, t in zip(_GREEN, green_tint))
    for i in range(n):
        x, y = xy[i]
        if kinds[i] == 2:  # clover trefoil: three leaflets 120 degrees apart, pale mark on each
            col, mark, r = _colour(rng, _CLOVER, 0.1), _colour(rng, _CLOVER_MARK, 0.05), radius[i]
            for a in theta[i] + np.array([0.0, 2.0944, 4.1888]):
                cx, cy = x + 1.05 * r * np.cos(a), y + 1.05 * r * np.sin(a)
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col)
                m = 0.35 * r
                draw.ellipse((cx - m, cy - m, cx + m, cy + m), fill=mark)
        else:  # a straight blade, slightly darker at its base
            base = _DEAD if kinds[i] == 0 else green
            col = _colour(rng, base, 0.12)
            dx, dy = 0.5 * length[i] * np.cos(theta[i]), 0.5 * length[i] * np.sin(theta[i])
            draw.line((x - dx, y - dy, x + dx, y + dy), fill=col, width=int(width[i]))
    img = canvas.resize((w, h), Image.BOX)
    arr = np.asarray(img).astype(np.float64) * rng.uniform(0.92, 1.08)  # illumination
    return np.clip(np.round(arr), 0, 255).astype(np.uint8), counts


def _image_id(seed: int, split: str, i: int, taken: set[str]) -> str:
    d = hashlib.blake2b(f"{seed}:{split}:{i}".encode(), digest_size=8).digest()
    v = 1_000_000_000 + int.from_bytes(d, "little") % 9_000_000_000
    while f"ID{v}" in taken:  # vanishingly rare; resolved the same way every time
        v = 1_000_000_000 + (v - 999_999_999) % 9_000_000_000
    taken.add(f"ID{v}")
    return f"ID{v}"


def _split_rng(seed: int, split: str) -> np.random.Generator:
    # Keyed by split *name* so each split has its own stream.
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def _sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """One quadrat: image, the five targets (in units of 1e-4 g) and its metadata."""
    m = _latent_masses(rng)
    total = m["green"] + m["dead"] + m["clover"]
    dead_share = m["dead"] / max(total, 1e-6)
    clover_share = m["clover"] / max(total, 1e-6)
    # Species: clover-containing pastures name clover; the grass species slightly tint the blades.
    if m["clover"] > 0:
        species = "Clover" if m["clover"] > m["green"] else "Ryegrass_Clover"
    else:
        species = str(rng.choice(["Ryegrass", "Phalaris", "Fescue"], p=[0.5, 0.25, 0.25]))
    tint = {"Phalaris": (1.0, 1.03, 1.15), "Fescue": (0.92, 0.92, 0.95)}.get(species, (1.0, 1.0, 1.0))
    # State and month lean towards dry states / summer when much of it is dead.
    p_state = np.array([0.3, 0.3, 0.2, 0.2]) + dead_share * np.array([-0.2, -0.1, 0.15, 0.15])
    state = str(rng.choice(STATES, p=p_state / p_state.sum()))
    summer = rng.random() < 0.2 + 0.6 * dead_share
    month = int(rng.choice([1, 2, 3, 11, 12])) if summer else int(rng.integers(4, 11))
    day = int(rng.integers(1, 29))
    img, counts = render_pasture(rng, m, size, green_tint=tint)

    # Reported masses: what the drawn counts imply, times a small density noise.
    noise = np.exp(rng.normal(0.0, _DENSITY_NOISE, 3))
    g, d, c = (int(round(1e4 * counts[k] / _PER_G[k] * z))
               for k, z in zip(("green", "dead", "clover"), noise))
    targets = {"Dry_Green_g": g, "Dry_Dead_g": d, "Dry_Clover_g": c, "GDM_g": g + c, "Dry_Total_g": g + c + d}
    gt, tt = (g + c) / 1e4, (g + c + d) / 1e4
    height = np.clip(1.0 + 0.13 * gt + 0.05 * d / 1e4 + rng.normal(0.0, 1.2), 1.0, 30.0)
    ndvi = np.clip(0.22 + 0.45 * gt / (tt + 5.0) + 0.25 * (1.0 - np.exp(-tt / 60.0))
                   + rng.normal(0.0, 0.03), 0.2, 0.9)
    meta = {"Sampling_Date": f"2015/{month}/{day}", "State": state, "Species": species,
            "Pre_GSHH_NDVI": f"{ndvi:.2f}", "Height_Ave_cm": f"{height:.4f}",
            "clover_share": clover_share}
    return img, {"targets": targets, "meta": meta}


def write_dataset(
    root: str | os.PathLike,
    *,
    per_split: dict[str, int] | None = None,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    hidden_test: bool = False,
) -> pathlib.Path:
    """Write the synthetic pasture set under `root` once (`jaxvit.demos.write_once`: redone when incomplete or
    the parameters change; files it did not write are never replaced).

    `per_split` maps split name -> number of images; `size` is (width, height); `hidden_test`: test.csv in the
    competition's unlabelled form, its labels in test_solution.csv.
    """
    per_split = dict(DEFAULT_PER_SPLIT if per_split is None else per_split)
    size = (int(size[0]), int(size[1]))
    params = {"version": _VERSION, "targets": list(TARGETS), "per_split": per_split,
              "size": list(size), "seed": seed, "hidden_test": hidden_test}

    def write(out: pathlib.Path) -> None:
        taken: set[str] = set()
        for split, n in per_split.items():
            (out / split).mkdir()
            rng = _split_rng(seed, split)
            rows: list[dict[str, str]] = []
            for i in range(n):
                img, s = _sample(rng, size)
                image_id = _image_id(seed, split, i, taken)
                rel = f"{split}/{image_id}.jpg"
                Image.fromarray(img).save(out / rel, quality=JPEG_QUALITY, subsampling=0)
                meta = {k: v for k, v in s["meta"].items() if k in COLUMNS}
                for name in TARGETS:
                    rows.append({"sample_id": f"{image_id}__{name}", "image_path": rel, **meta,
                                 "target_name": name, "target": f"{s['targets'][name] / 1e4:.4f}"})
            tables = {f"{split}.csv": (COLUMNS, rows)}
            if hidden_test and split == "test":
                tables = {f"{split}.csv": (HIDDEN_COLUMNS, rows), SOLUTION_NAME: (("sample_id", "target"), rows)}
            for name, (columns, table_rows) in tables.items():
                write_csv(out / name, list(columns), table_rows)

    entries = (*per_split, *(f"{split}.csv" for split in per_split))
    return write_once(root, DEMO_NAME, params, write, entries)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="output directory")
    ap.add_argument("--width", type=int, default=DEFAULT_SIZE[0])
    ap.add_argument("--height", type=int, default=DEFAULT_SIZE[1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=DEFAULT_PER_SPLIT["train"], help="images in train")
    ap.add_argument("--val", type=int, default=DEFAULT_PER_SPLIT["val"])
    ap.add_argument("--test", type=int, default=DEFAULT_PER_SPLIT["test"])
    a = ap.parse_args(argv)
    root = write_dataset(a.root, per_split={"train": a.train, "val": a.val, "test": a.test},
                         size=(a.width, a.height), seed=a.seed)
    print(f"synthetic pasture biomass dataset at {root}")


if __name__ == "__main__":
    main()
