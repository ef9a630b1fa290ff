"""JUMP data as the Cell Painting Gallery publishes them: per-plate gzipped load-data tables whose PathName_* are S3
prefixes (mapped to a local mirror), treatments in the batch's platemaps, no split column (wells held out)."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jaxvit.data import holdout, jump
from jaxvit.demos import cells as syn
from jaxvit.errors import ConfigError, DataError, MissingDataError

BATCH = "2020_11_04_CPJUMP1"
S3 = "s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The synthetic set rewritten in the published layout; returns (root, {(plate, well): treatment})."""
    local = syn.write_dataset(tmp_path_factory.mktemp("mirror"), seed=3, n_plates=2, wells_per_treatment=3,
                              sites_per_well=2, image_size=32)
    root = tmp_path_factory.mktemp("cpjump1")
    rows = list(csv.DictReader(open(local / syn.TABLE_NAME)))
    truth = {(r["Metadata_Plate"], r["Metadata_Well"]): r["Metadata_Treatment"] for r in rows}
    kept = [c for c in rows[0] if c not in ("Metadata_Treatment", "Metadata_Split")]
    for plate in sorted({r["Metadata_Plate"] for r in rows}):
        table = root / "load_data_csv" / BATCH / plate / "load_data_with_illum.csv.gz"
        table.parent.mkdir(parents=True)
        with gzip.open(table, "wt", newline="") as f:
            w = csv.DictWriter(f, fieldnames=kept, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                if r["Metadata_Plate"] == plate:
                    w.writerow({k: f"{S3}/{BATCH}/images/{r[k]}" if k.startswith("PathName_") else r[k] for k in kept})
    maps = root / "metadata" / "platemaps" / BATCH
    (maps / "platemap").mkdir(parents=True)
    with open(maps / "barcode_platemap.csv", "w", newline="") as f:
        f.write("Assay_Plate_Barcode,Plate_Map_Name\n")
        for k, plate in enumerate(sorted({p for p, _ in truth})):
            f.write(f"{plate},JUMP-Target-1_compound_platemap_{k}\n")
    for k, plate in enumerate(sorted({p for p, _ in truth})):
        with open(maps / "platemap" / f"JUMP-Target-1_compound_platemap_{k}.txt", "w") as f:
            f.write("plate_map_name\twell_position\tbroad_sample\tsolvent\n")
            for (p, well), treatment in sorted(truth.items()):
                if p == plate:
                    f.write(f"JUMP-Target-1_compound_platemap_{k}\t{well}\t{treatment}\tDMSO\n")
    return root, local, truth


def _cfg(root, local, **kw):
    return ml_collections.ConfigDict({
        "data_dir": str(root), "load_data": f"load_data_csv/{BATCH}/*/load_data_with_illum.csv.gz",
        "path_map": (f"{S3}/{BATCH}/images={local}",), "platemap_dir": f"metadata/platemaps/{BATCH}",
        "label_column": "broad_sample", "val_fraction": 0.3, "holdout_by": "well", **kw})


def test_per_plate_tables_platemaps_and_held_out_wells(published):
    root, local, truth = published
    train = jump.open_split(_cfg(root, local), "train")
    val = jump.open_split(_cfg(root, local), "val", train.classes)
    assert len(train) + len(val) == 2 * len(truth) and len(val) > 0 and len(train) > 0
    wells = lambda s: {(p, w) for p, w in zip(s.plates, s.wells)}  # noqa: E731
    assert not wells(train) & wells(val)  # whole wells held out
    for src in (train, val):
        for i in range(len(src)):
            assert src.classes[src.labels[i]] == truth[(src.plates[i], src.wells[i])]
        example = src[0]
        assert example["files"][0].startswith(str(local)) and Path(example["files"][0]).is_file()
        assert src.load_stack(example).shape == (32, 32, 5)
    plates = sorted({p for p, _ in truth})
    held = {p for p, h in zip(plates, holdout.held_out(plates, 0.6)) if h}
    by_plate = {s: jump.open_split(_cfg(root, local, holdout_by="plate", val_fraction=0.6), s) for s in ("train", "val")}
    assert set(by_plate["val"].plates.tolist()) == held and set(by_plate["train"].plates.tolist()) == set(plates) - held


def test_clahe_views_equalise_each_view(published):
    root, local, _ = published
    src = jump.open_split(_cfg(root, local, clahe=True), "train")
    stack = src.load_stack(src[0])
    plain = jump.to_rgb(stack, "average")[0]
    equalised = jump.to_rgb(stack, "average", clahe=src.clahe)[0]
    assert equalised.shape == plain.shape and equalised.std() > plain.std()


def test_published_layout_mistakes_are_named(published, tmp_path):
    root, local, _ = published
    with pytest.raises(DataError, match="PathName_OrigDNA is a URL .*ssl.jump.path_map"):
        jump.open_split(_cfg(root, local, path_map=()), "train")
    with pytest.raises(ConfigError, match="ssl.jump.path_map entry 'nonsense' is not PREFIX=LOCAL_DIR"):
        jump.open_split(_cfg(root, local, path_map=("nonsense",)), "train")
    with pytest.raises(MissingDataError, match="no table matches"):
        jump.open_split(_cfg(root, local, load_data="load_data_csv/*/*/load_data.csv.gz"), "train")
    with pytest.raises(MissingDataError, match="barcode_platemap.csv' not found"):
        jump.open_split(_cfg(root, local, platemap_dir="metadata/platemaps/other"), "train")
    bad = root / "metadata" / "platemaps" / "missing_plate"
    (bad / "platemap").mkdir(parents=True)
    (bad / "barcode_platemap.csv").write_text("Assay_Plate_Barcode,Plate_Map_Name\nSYN00001,pm\n")
    (bad / "platemap" / "pm.txt").write_text("well_position\tbroad_sample\nA01\tx\n")
    with pytest.raises(DataError, match="plate 'SYN00001' .*|well '.*' of plate 'SYN00001' is not in platemap pm.txt"):
        jump.open_split(_cfg(root, local, platemap_dir="metadata/platemaps/missing_plate"), "train")
