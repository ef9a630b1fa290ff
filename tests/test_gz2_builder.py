"""The five-class GZ2 folders built from files in the public release's layout (Hart et al. 2016 table, gzipped;
the filename mapping; images_gz2/images/<asset_id>.jpg)."""
from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvit import cli
from jaxvit.data import gz2
from jaxvit.data.sources import ImageFolder
from jaxvit.demos.gz2 import CLASSES, METADATA_NAME
from jaxvit.errors import DataError, MissingDataError

ROOT = Path(__file__).resolve().parents[1]
# vote fractions that make each class (smooth, disk, round, in_between, cigar, edge_on, not_edge_on, spiral)
VOTES = {
    "completely_round_smooth": (0.9, 0.1, 0.8, 0.2, 0.0, 0.1, 0.9, 0.1),
    "in_between_smooth": (0.8, 0.2, 0.3, 0.6, 0.1, 0.0, 1.0, 0.2),
    "cigar_shaped_smooth": (0.7, 0.3, 0.0, 0.3, 0.7, 0.2, 0.8, 0.0),
    "edge_on": (0.2, 0.8, 0.5, 0.5, 0.0, 0.9, 0.1, 0.0),
    "spiral": (0.1, 0.9, 0.4, 0.4, 0.2, 0.1, 0.9, 0.8),
    None: (0.45, 0.45, 0.3, 0.3, 0.4, 0.3, 0.7, 0.3),  # neither smooth nor disk: left out
}


def _release(tmp_path: Path, per_class: int) -> dict:
    hart = ["dr7objid", "ra", "dec", "sample", "gz2_class", "total_classifications",
            "t01_smooth_or_features_a01_smooth_count", *gz2.COLUMNS.values()]
    rows, mapping, truth = [], [], {}
    images = tmp_path / "images_gz2" / "images"
    images.mkdir(parents=True)
    for k, (name, votes) in enumerate(VOTES.items()):
        for j in range(per_class):
            objid, asset = str(587722981736000000 + 100 * k + j), str(1000 + 100 * k + j)
            row = {c: "0" for c in hart} | dict(zip(gz2.COLUMNS.values(), map(str, votes)))
            rows.append(row | {"dr7objid": objid, "sample": "original", "gz2_class": "Ei"})
            mapping.append({"objid": objid, "sample": "original", "asset_id": asset})
            Image.fromarray(np.full((8, 8, 3), 10 * k + j, np.uint8)).save(images / f"{asset}.jpg")
            truth[asset] = name
    with gzip.open(tmp_path / "gz2_hart16.csv.gz", "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=hart)
        writer.writeheader()
        writer.writerows(rows)
    with (tmp_path / "gz2_filename_mapping.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["objid", "sample", "asset_id"])
        writer.writeheader()
        writer.writerows(mapping)
    return truth


def _args(tmp_path, *extra):
    return ["--hart_csv", str(tmp_path / "gz2_hart16.csv.gz"), "--mapping_csv",
            str(tmp_path / "gz2_filename_mapping.csv"), "--images_dir", str(tmp_path / "images_gz2" / "images"),
            "--out", str(tmp_path / "gz2"), *extra]


def test_builds_balanced_class_folders_with_metadata(tmp_path):
    truth = _release(tmp_path, per_class=9)
    counts = gz2.build(gz2.parser().parse_args(_args(tmp_path, "--train", "20", "--val", "10", "--test", "10")))
    assert counts == {s: {c: n for c in CLASSES} for s, n in (("train", 4), ("val", 2), ("test", 2))}
    seen = set()
    for split in ("train", "val", "test"):
        folder = ImageFolder(tmp_path / "gz2", split, CLASSES)  # the layout configs/gz2_lora.py reads
        for path, label in zip(folder.paths, folder.labels):
            asset = Path(path).stem
            assert truth[asset] == CLASSES[label] and asset not in seen
            seen.add(asset)
    meta = list(csv.DictReader((tmp_path / "gz2" / METADATA_NAME).open()))
    assert len(meta) == 40 and {r["split"] for r in meta} == {"train", "val", "test"}
    assert all((tmp_path / "gz2" / r["path"]).is_file() and truth[r["asset_id"]] == r["class"] for r in meta)


def test_short_classes_and_bad_tables_are_one_line(tmp_path):
    _release(tmp_path, per_class=3)
    proc = subprocess.run([sys.executable, "-m", "jaxvit.data.gz2", *_args(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and last.startswith("error: too few galaxies")
    counts = gz2.build(gz2.parser().parse_args(_args(tmp_path, "--train", "50", "--val", "5", "--test", "5",
                                                     "--allow_fewer")))
    assert counts["val"]["spiral"] == 1 and counts["train"]["spiral"] == 1  # 3 spirals: val, test, then train
    with pytest.raises(DataError, match="exists"):
        gz2.build(gz2.parser().parse_args(_args(tmp_path, "--train", "5", "--val", "5", "--test", "5")))
    (tmp_path / "bad.csv").write_text("objid,asset_id\n1,2\n")
    with pytest.raises(DataError, match=r"bad.csv' has no column\(s\) \['dr7objid'"):
        gz2.read_table(tmp_path / "bad.csv", ("dr7objid", *gz2.COLUMNS.values()))
    for image in (tmp_path / "images_gz2" / "images").glob("14*.jpg"):  # the spirals' images are missing
        image.unlink()
    with pytest.raises(MissingDataError, match="image of dr7objid .*asset_id 14"):
        gz2.build(gz2.parser().parse_args(_args(tmp_path, "--out", str(tmp_path / "gz2b"), "--train", "5",
                                                "--val", "5", "--test", "5")))


def test_the_jaxvit_data_gz2_command(tmp_path, capsys):
    _release(tmp_path, per_class=4)
    with pytest.raises(SystemExit) as done:
        cli.main(["data", "gz2", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and text.startswith("usage: jaxvit data gz2") and "--hart_csv" in text
    cli.main(["data", "gz2", *_args(tmp_path, "--train", "10", "--val", "5", "--test", "5")])
    assert [len(ImageFolder(tmp_path / "gz2", s, CLASSES)) for s in ("train", "val", "test")] == [10, 5, 5]
    with pytest.raises(SystemExit) as done:
        cli.main(["data", "gz3"])
    assert done.value.code == 2 and "invalid choice: 'gz3' (choose from 'gz2')" in capsys.readouterr().err
