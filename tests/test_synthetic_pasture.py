"""Tests for the synthetic pasture-biomass set (CSIRO Image2Biomass layout)."""

from __future__ import annotations

import csv
import pathlib
import re
from decimal import Decimal

import numpy as np
import pytest
from PIL import Image

from jaxvit.tasks.biomass import maths
from jaxvit.demos import pasture as syn

SMALL = {"train": 4, "val": 2, "test": 2}


def _rows(root: pathlib.Path, split: str) -> list[dict[str, str]]:
    with open(root / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


def _images(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(root.glob("*/*.jpg"))


def test_long_csv_layout_and_identities(tmp_path: pathlib.Path) -> None:
    root = syn.write_dataset(tmp_path, per_split=SMALL, size=(64, 32), seed=1)
    assert syn.TARGETS == ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
    for split, n in SMALL.items():
        with open(root / f"{split}.csv", newline="") as f:
            assert next(csv.reader(f)) == list(syn.COLUMNS)
        rows = _rows(root, split)
        assert len(rows) == 5 * n
        by_image: dict[str, dict[str, Decimal]] = {}
        for r in rows:
            image_id, name = r["sample_id"].split("__")
            assert re.fullmatch(r"ID\d{10}", image_id) and name == r["target_name"] in syn.TARGETS
            assert r["image_path"] == f"{split}/{image_id}.jpg"
            assert re.fullmatch(r"2015/\d{1,2}/\d{1,2}", r["Sampling_Date"])
            assert r["State"] in syn.STATES and r["Species"] in syn.SPECIES
            assert 0.2 <= float(r["Pre_GSHH_NDVI"]) <= 0.9 and 1.0 <= float(r["Height_Ave_cm"]) <= 30.0
            by_image.setdefault(image_id, {})[name] = Decimal(r["target"])
        assert len(by_image) == n
        for t in by_image.values():
            assert sorted(t) == sorted(syn.TARGETS)
            assert all(v >= 0 for v in t.values())
            assert t["GDM_g"] == t["Dry_Green_g"] + t["Dry_Clover_g"]
            assert t["Dry_Total_g"] == t["GDM_g"] + t["Dry_Dead_g"]
    ids = [r["sample_id"] for s in SMALL for r in _rows(root, s)]
    assert len(set(ids)) == len(ids)  # image ids are unique across splits

    images = _images(root)
    assert len(images) == sum(SMALL.values())
    for p in images:
        with Image.open(p) as im:
            assert im.size == (64, 32) and im.mode == "RGB"
    records = maths.read_long_csv(root / "train.csv")
    y = np.stack([r["targets"] for r in records.values()])
    assert y.shape == (SMALL["train"], 5) and all((root / p).exists() for p in records)


def test_masses_follow_what_is_drawn() -> None:
    rng = np.random.default_rng(0)
    empty, c0 = syn.render_pasture(rng, {"green": 0.0, "dead": 0.0, "clover": 0.0})
    full, c1 = syn.render_pasture(rng, {"green": 120.0, "dead": 0.0, "clover": 0.0})
    assert empty.shape == full.shape == (64, 128, 3) and full.dtype == np.uint8
    assert c0 == {"green": 0, "dead": 0, "clover": 0} and c1["green"] > 100
    # Green cover: a dense sward is much greener than bare soil.
    greenness = lambda a: (a[..., 1].astype(int) - a[..., 0]).mean()
    assert greenness(full) > greenness(empty) + 20


def test_write_is_skipped_when_complete_and_redone_when_not(tmp_path: pathlib.Path) -> None:
    root = syn.write_dataset(tmp_path, per_split=SMALL, size=(32, 16))
    files = _images(root) + [root / f"{s}.csv" for s in SMALL]
    before = {f: f.stat().st_mtime_ns for f in files}
    syn.write_dataset(tmp_path, per_split=SMALL, size=(32, 16))
    assert {f: f.stat().st_mtime_ns for f in files} == before
    victim = _images(root)[0]
    victim.unlink()  # an interrupted / damaged run is redone
    syn.write_dataset(tmp_path, per_split=SMALL, size=(32, 16))
    assert victim.exists()
    # Changed parameters rewrite everything and leave no stale splits behind.
    syn.write_dataset(tmp_path, per_split={"train": 1, "test": 1}, size=(32, 16))
    assert len(_images(root)) == 2
    assert not (root / "val").exists() and not (root / "val.csv").exists()


def test_refuses_foreign_data(tmp_path: pathlib.Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "ID1011485656.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        syn.write_dataset(tmp_path, per_split=SMALL, size=(32, 16))
    assert (tmp_path / "train" / "ID1011485656.jpg").read_bytes() == b"not ours"


def test_deterministic_per_seed(tmp_path: pathlib.Path) -> None:
    per = {"train": 2, "val": 1}
    a = syn.write_dataset(tmp_path / "a", per_split=per, size=(32, 16), seed=0)
    b = syn.write_dataset(tmp_path / "b", per_split=per, size=(32, 16), seed=0)
    c = syn.write_dataset(tmp_path / "c", per_split=per, size=(32, 16), seed=1)
    first = _rows(a, "train")[0]["image_path"]
    assert (a / first).read_bytes() == (b / first).read_bytes()
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    other = _rows(c, "train")[0]["image_path"]
    assert other != first and (c / other).read_bytes() != (a / first).read_bytes()
    assert [r["target"] for r in _rows(c, "train")] != [r["target"] for r in _rows(a, "train")]


def test_weighted_r2() -> None:
    y = np.array([[10.0, 0.0, 5.0, 15.0, 15.0], [30.0, 20.0, 0.0, 30.0, 50.0]])
    assert maths.weighted_r2(y, y) == 1.0
    w = np.array([0.1, 0.1, 0.1, 0.2, 0.5])
    mean = (w * y).sum() / (2 * w.sum())
    assert maths.weighted_r2(y, np.full_like(y, mean)) == pytest.approx(0.0)


def test_cli(tmp_path: pathlib.Path) -> None:
    syn.main([f"--root={tmp_path}", "--train=1", "--val=1", "--test=1", "--width=32", "--height=16"])
    assert len(_images(tmp_path)) == 3
    assert all((tmp_path / f"{s}.csv").exists() for s in ("train", "val", "test"))
