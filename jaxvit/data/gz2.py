"""Build the five-class Galaxy Zoo 2 folders from the public release (`jaxvit data gz2`, or
`python -m jaxvit.data.gz2`).

Inputs, as published:
  --hart_csv     gz2_hart16.csv(.gz): Hart et al. (2016) debiased vote fractions, one row per galaxy (`dr7objid`)
  --mapping_csv  gz2_filename_mapping.csv: `objid, sample, asset_id` (the image of objid is <asset_id>.jpg)
  --images_dir   images_gz2/images/ with the 424 x 424 JPEGs
Output (the layout of the Galaxy Zoo 2 DINOv3 project, read by configs/gz2_lora.py):
  <out>/gz2_5class_{train,val,test}/<class>/<asset_id>.jpg and <out>/gz2_5class_metadata.csv

A galaxy's class, from the debiased fractions (each rule a flag; a galaxy meeting none is left out):
  smooth   = t01_smooth_or_features_a01_smooth_debiased > --smooth (0.5), then by t07 (how rounded):
             completely_round_smooth: a16_completely_round > --round (0.5); in_between_smooth: a17_in_between >
             --round; cigar_shaped_smooth: a18_cigar_shaped > --round
  disk     = t01_smooth_or_features_a02_features_or_disk_debiased > --disk (0.5), then
             edge_on: t02_edgeon_a04_yes > --edge_on (0.5); spiral: t02_edgeon_a05_no > --edge_on and
             t04_spiral_a08_spiral > --spiral (0.5)
Each class is sampled to the same size per split (seeded): 19,995 / 2,500 / 2,500 by default, the project's split.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from jaxvit.errors import DataError, MissingDataError, exit_on_user_error

log = logging.getLogger(__name__)
CLASSES: tuple[str, ...] = ("completely_round_smooth", "in_between_smooth", "cigar_shaped_smooth", "edge_on",
                          "spiral")  # the five classes of the GZ2 DINOv3 project, in its label order
METADATA_NAME = "gz2_5class_metadata.csv"
SPLITS = {"train": 19995, "val": 2500, "test": 2500}
Q = "t01_smooth_or_features_a0{}_debiased"
COLUMNS = {  # the vote fractions the rules read
    "smooth": Q.format("1_smooth"), "disk": Q.format("2_features_or_disk"),
    "round": "t07_rounded_a16_completely_round_debiased", "in_between": "t07_rounded_a17_in_between_debiased",
    "cigar": "t07_rounded_a18_cigar_shaped_debiased", "edge_on": "t02_edgeon_a04_yes_debiased",
    "not_edge_on": "t02_edgeon_a05_no_debiased", "spiral": "t04_spiral_a08_spiral_debiased",
}


def _open_text(path: Path):
    if not path.is_file():
        raise MissingDataError(f"{str(path)!r} not found")
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else path.open(newline="")


def read_table(path: Path, needed: tuple[str, ...]) -> list[dict]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{str(path)!r} has no column(s) {missing}: is it the right table? "
                            f"(found {(reader.fieldnames or [])[:8]}...)")
        return list(reader)


def classify(row: dict, t: argparse.Namespace, where: str) -> str | None:
    """The class of one Hart et al. row by the module's rules, or None."""
    try:
        v = {k: float(row[c]) if row[c] not in ("", "nan", "NaN") else float("nan") for k, c in COLUMNS.items()}
    except ValueError as e:
        raise DataError(f"{where}: a vote fraction is not a number ({e})") from e
    if v["smooth"] > t.smooth:
        for name, key in (("completely_round_smooth", "round"), ("in_between_smooth", "in_between"),
                          ("cigar_shaped_smooth", "cigar")):
            if v[key] > t.round:
                return name
    elif v["disk"] > t.disk:
        if v["edge_on"] > t.edge_on:
            return "edge_on"
        if v["not_edge_on"] > t.edge_on and v["spiral"] > t.spiral:
            return "spiral"
    return None


def select(by_class: dict[str, list[str]], sizes: dict[str, int], seed: int, allow_fewer: bool) -> dict:
    """{split: {class: [ids]}}: each class shuffled (seeded), then cut into the per-class share of every split."""
    rng = np.random.default_rng(seed)
    per_class = {s: n // len(CLASSES) for s, n in sizes.items()}
    need = sum(per_class.values())
    short = {c: len(ids) for c, ids in by_class.items() if len(ids) < need}
    if short and not allow_fewer:
        raise DataError(f"too few galaxies for {need} per class ({per_class}): {short}; lower the thresholds, the "
                        "split sizes (--train/--val/--test), or pass --allow_fewer (train takes what is left)")
    out = {s: {} for s in sizes}
    for c in CLASSES:
        ids = list(np.asarray(by_class[c], dtype=object)[rng.permutation(len(by_class[c]))])
        start = 0
        for s in ("val", "test", "train"):  # val and test full first; train takes what remains
            out[s][c] = ids[start:start + per_class[s]]
            start += per_class[s]
    return out


def build(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    hart = read_table(Path(args.hart_csv), ("dr7objid", *COLUMNS.values()))
    mapping = read_table(Path(args.mapping_csv), ("objid", "asset_id"))
    asset = {r["objid"]: r["asset_id"] for r in mapping}
    by_class: dict[str, list[str]] = {c: [] for c in CLASSES}
    fractions = {}
    for i, row in enumerate(hart, start=2):
        name = classify(row, args, f"{args.hart_csv} line {i}")
        if name is not None and row["dr7objid"] in asset:
            by_class[name].append(row["dr7objid"])
            fractions[row["dr7objid"]] = row
    log.info("galaxies per class (with an image id): %s", {c: len(v) for c, v in by_class.items()})
    chosen = select(by_class, {"train": args.train, "val": args.val, "test": args.test}, args.seed,
                    args.allow_fewer)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for split, classes in chosen.items():
        for c, ids in classes.items():
            folder = tmp / f"gz2_5class_{split}" / c
            folder.mkdir(parents=True, exist_ok=True)
            for objid in ids:
                src = Path(args.images_dir) / f"{asset[objid]}.jpg"
                if not src.is_file():
                    raise MissingDataError(f"image of dr7objid {objid} (asset_id {asset[objid]}) not found: "
                                           f"{str(src)!r}; --images_dir must hold images_gz2/images/*.jpg")
                _place(src, folder / src.name, args.link)
                rows.append({"dr7objid": objid, "asset_id": asset[objid], "split": split, "class": c,
                             "path": f"gz2_5class_{split}/{c}/{src.name}",
                             **{col: fractions[objid][col] for col in COLUMNS.values()}})
    with (tmp / METADATA_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if out.exists():
        raise DataError(f"{str(out)!r} exists: remove it or choose another --out")
    os.replace(tmp, out)
    return {s: {c: len(ids) for c, ids in classes.items()} for s, classes in chosen.items()}


def _place(src: Path, dst: Path, how: str) -> None:
    if how == "symlink":
        dst.symlink_to(src.resolve())
    elif how == "hardlink":
        os.link(src, dst)
    else:
        shutil.copyfile(src, dst)


def parser(prog: str = "python -m jaxvit.data.gz2") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hart_csv", required=True, help="gz2_hart16.csv or gz2_hart16.csv.gz")
    p.add_argument("--mapping_csv", required=True, help="gz2_filename_mapping.csv (objid, sample, asset_id)")
    p.add_argument("--images_dir", required=True, help="the folder of <asset_id>.jpg (images_gz2/images)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    for name, default in (("smooth", 0.5), ("disk", 0.5), ("round", 0.5), ("edge_on", 0.5), ("spiral", 0.5)):
        p.add_argument(f"--{name}", type=float, default=default, help=f"threshold of the {name} rule ({default})")
    for split, n in SPLITS.items():
        p.add_argument(f"--{split}", type=int, default=n, help=f"{split} images, split evenly over the classes")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--allow_fewer", action="store_true", help="a class short of galaxies: train takes what is left")
    p.add_argument("--link", choices=("copy", "hardlink", "symlink"), default="copy", help="how images are placed")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m jaxvit.data.gz2") -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = exit_on_user_error(build, parser(prog).parse_args(argv))
    for split, classes in counts.items():
        log.info("%-5s %s (total %d)", split, classes, sum(classes.values()))


if __name__ == "__main__":
    main()
