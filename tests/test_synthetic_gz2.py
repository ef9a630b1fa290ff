"""Tests for the synthetic Galaxy Zoo 2 renderer and on-disk dataset writer."""

from __future__ import annotations

import csv
import gzip
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxvit.demos import gz2 as syn

SMALL = {"train": 3, "val": 1, "test": 2}


def test_class_names_and_order() -> None:
    assert syn.CLASSES == (
        "completely_round_smooth",
        "in_between_smooth",
        "cigar_shaped_smooth",
        "edge_on",
        "spiral",
    )


@pytest.mark.parametrize("cls", syn.CLASSES)
@pytest.mark.parametrize("size", [64, 48])
def test_render_shape_dtype_and_content(cls: str, size: int) -> None:
    img = syn.render_galaxy(cls, np.random.default_rng(0), size=size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    # The galaxy is centred: the middle is much brighter than the frame's edge.
    c, f = size // 2, img.astype(float)
    centre = f[c - 3 : c + 3, c - 3 : c + 3].mean()
    border = np.median(np.concatenate([f[:3].ravel(), f[-3:].ravel(), f[:, :3].ravel(), f[:, -3:].ravel()]))
    assert centre > 50 and centre > 3 * border


def test_render_is_deterministic_per_seed() -> None:
    a = syn.render_galaxy("spiral", np.random.default_rng(7))
    b = syn.render_galaxy("spiral", np.random.default_rng(7))
    c = syn.render_galaxy("spiral", np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_with_params_matches_and_records_class_params() -> None:
    img, p = syn.render_galaxy_with_params("spiral", np.random.default_rng(3))
    np.testing.assert_array_equal(img, syn.render_galaxy("spiral", np.random.default_rng(3)))
    assert p["n_arms"] in (2, 3, 4) and 0 <= p["angle_deg"] < 360
    _, p = syn.render_galaxy_with_params("cigar_shaped_smooth", np.random.default_rng(3))
    assert 0.1 < p["axis_ratio"] < 0.45


def test_unknown_class_raises() -> None:
    with pytest.raises(ValueError):
        syn.render_galaxy("barred_spiral", np.random.default_rng(0))


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(root.glob("gz2_5class_*/*/*.png"))


def test_write_dataset_layout_and_metadata(tmp_path: pathlib.Path) -> None:
    root = syn.write_dataset(tmp_path / "gz2", per_class=SMALL, size=32, seed=1)
    files = _files(root)
    assert len(files) == sum(SMALL.values()) * len(syn.CLASSES)
    for split, n in SMALL.items():
        for cls in syn.CLASSES:
            pngs = list((root / f"gz2_5class_{split}" / cls).glob("*.png"))
            assert len(pngs) == n
    assert Image.open(files[0]).size == (32, 32)

    with open(root / "gz2_5class_metadata.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(files)
    assert {"split", "class", "filename", "axis_ratio", "angle_deg", "radius_px",
            "brightness", "n_arms"} <= set(rows[0])
    for r in rows:
        assert (root / f"gz2_5class_{r['split']}" / r["class"] / r["filename"]).exists()
    assert json.loads((root / ".synthetic_gz2.json").read_text())["params"]["seed"] == 1


def test_write_dataset_is_idempotent(tmp_path: pathlib.Path) -> None:
    root = syn.write_dataset(tmp_path, per_class=SMALL, size=32)
    before = {f: f.stat().st_mtime_ns for f in _files(root)}
    meta = (root / "gz2_5class_metadata.csv").stat().st_mtime_ns
    syn.write_dataset(tmp_path, per_class=SMALL, size=32)
    assert {f: f.stat().st_mtime_ns for f in _files(root)} == before
    assert (root / "gz2_5class_metadata.csv").stat().st_mtime_ns == meta


def test_write_dataset_redoes_incomplete_or_changed(tmp_path: pathlib.Path) -> None:
    root = syn.write_dataset(tmp_path, per_class=SMALL, size=32)
    victim = _files(root)[0]
    victim.unlink()  # simulate an interrupted / damaged run
    syn.write_dataset(tmp_path, per_class=SMALL, size=32)
    assert victim.exists()
    # Changed parameters rewrite everything, leaving no stale files behind.
    syn.write_dataset(tmp_path, per_class={"train": 1, "test": 1}, size=32)
    assert len(_files(root)) == 2 * len(syn.CLASSES)
    assert not (root / "gz2_5class_val").exists()


def test_write_dataset_refuses_foreign_data(tmp_path: pathlib.Path) -> None:
    real = tmp_path / "gz2_5class_train" / "spiral"
    real.mkdir(parents=True)
    (real / "587722.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        syn.write_dataset(tmp_path, per_class=SMALL, size=32)
    assert (real / "587722.png").exists()


def test_splits_are_independent_and_seeded(tmp_path: pathlib.Path) -> None:
    per = {"train": 2, "val": 2, "test": 2}
    root = syn.write_dataset(tmp_path / "a", per_class=per, size=32, seed=0)
    load = lambda split, r=root: np.asarray(
        Image.open(r / f"gz2_5class_{split}" / "spiral" / f"{split}_4_00000.png"))
    assert not np.array_equal(load("train"), load("val"))
    assert not np.array_equal(load("train"), load("test"))
    assert not np.array_equal(load("val"), load("test"))
    # Same seed reproduces; a different seed does not.
    again = syn.write_dataset(tmp_path / "b", per_class=per, size=32, seed=0)
    other = syn.write_dataset(tmp_path / "c", per_class=per, size=32, seed=1)
    np.testing.assert_array_equal(load("train"), load("train", again))
    assert not np.array_equal(load("train"), load("train", other))


def test_the_demo_is_the_public_release_built_into_balanced_class_folders(tmp_path: pathlib.Path) -> None:
    """data.demo="gz2": a Hart et al. style table (gzipped), the filename mapping and images_gz2/images/*.jpg; the
    builder (jaxvit.data.gz2) puts each galaxy in the class its votes give, the same number per class and split;
    the undecided galaxies are left out. A second call reuses the files."""
    from jaxvit.data import gz2 as builder
    from jaxvit.data.sources import ImageFolder
    syn.main([f"--root={tmp_path}", "--train=4", "--val=1", "--test=2", "--size=32"])  # the CLI writes the demo
    with gzip.open(tmp_path / syn.HART_NAME, "rt") as f:
        hart = {r["dr7objid"]: r for r in csv.DictReader(f)}
    mapping = {r["asset_id"]: r["objid"] for r in csv.DictReader((tmp_path / syn.MAPPING_NAME).open())}
    assert set(builder.COLUMNS.values()) <= set(next(iter(hart.values())))
    assert len(hart) == len(mapping) == round(1.1 * 7 * 5) == len(list((tmp_path / syn.IMAGES_DIR).glob("*.jpg")))
    built = set()
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        folder = ImageFolder(tmp_path, split, syn.CLASSES)
        assert np.bincount(folder.labels, minlength=5).tolist() == [n] * 5
        for path, label in zip(folder.paths, folder.labels):
            row = hart[mapping[pathlib.Path(path).stem]]
            assert row["gz2_class"] == syn.GZ2_CLASS[syn.CLASSES[label]]
            assert Image.open(path).size == (32, 32)
            built.add(path)
    undecided = [r for r in hart.values() if r["gz2_class"] == "S"]
    assert len(undecided) == 4 and all(float(r[builder.COLUMNS["smooth"]]) < 0.5 for r in undecided)
    stamp = {p: pathlib.Path(p).stat().st_mtime_ns for p in built}
    syn.write_demo(tmp_path, per_class={"train": 4, "val": 1, "test": 2}, size=32)
    assert {p: pathlib.Path(p).stat().st_mtime_ns for p in built} == stamp
