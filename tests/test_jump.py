"""JUMP-style Cell Painting data: the synthetic set (jaxvit.demos.cells) written to disk and read back
through the load-data source (jaxvit.data.jump): splits, labels, intensity normalisation, RGB views, masks, the
messages for bad tables and files, and a raw-pixel k-NN showing that the treatments are visible."""
from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile
from PIL import Image

from jaxvit.data import jump
from jaxvit.demos import cells as syn
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import ConfigError, DataError, MissingDataError

SMALL = dict(n_plates=2, wells_per_treatment=5, sites_per_well=2, image_size=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return syn.write_dataset(tmp_path_factory.mktemp("cells_small"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    return syn.write_dataset(tmp_path_factory.mktemp("cells_default"))


def _cfg(data_dir, **kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data_dir": str(data_dir), **kw})


def _rows(table: Path) -> list[dict[str, str]]:
    with open(table, newline="") as f:
        return list(csv.DictReader(f))


def _write_table(path: Path, rows: list[dict], columns=None) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _absolute(rows: list[dict], root: Path) -> list[dict]:
    """The rows with PathName_* made absolute, so that a table elsewhere reads the same files."""
    return [{k: str(root / v) if k.startswith("PathName_") else v for k, v in r.items()} for r in rows]


# ------------------------------------------------------------------------------------------- the synthetic set

def test_layout_columns_and_split_by_well(small):
    rows = _rows(small / syn.TABLE_NAME)
    assert list(rows[0]) == list(syn.COLUMNS)
    n_wells = SMALL["n_plates"] * 4 * SMALL["wells_per_treatment"]
    assert len(rows) == n_wells * SMALL["sites_per_well"]
    per_well: dict[tuple, set] = {}
    for r in rows:
        per_well.setdefault((r["Metadata_Plate"], r["Metadata_Well"]), set()).add(
            (r["Metadata_Split"], r["Metadata_Treatment"]))
        assert r["FileName_OrigDNA"].endswith("-ch1sk1fk1fl1.tiff") and r["PathName_OrigDNA"].startswith("images/")
        assert (small / r["PathName_CellMask"] / r["FileName_CellMask"]).is_file()
    assert len(per_well) == n_wells and all(len(v) == 1 for v in per_well.values())  # no well straddles splits
    wells = [next(iter(v)) for v in per_well.values()]
    for split, n in (("train", 3), ("val", 1), ("test", 1)):  # 60/20/20 of 5 wells per plate and treatment
        assert sum(s == split for s, _ in wells) == n * 4 * SMALL["n_plates"]
    dna = tifffile.imread(small / rows[0]["PathName_OrigDNA"] / rows[0]["FileName_OrigDNA"])
    assert dna.dtype == np.uint16 and dna.shape == (64, 64) and dna.max() > 4 * np.median(dna)


def test_write_is_idempotent_and_guards_foreign_folders(small, tmp_path):
    table = small / syn.TABLE_NAME
    before = table.stat().st_mtime_ns
    assert syn.write_dataset(small, seed=3, **SMALL) == small and table.stat().st_mtime_ns == before
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "r01c01f01p01-ch1sk1fk1fl1.tiff").write_bytes(b"a user's image")
    with pytest.raises(FileExistsError, match="not written by synthetic_cells"):
        syn.write_dataset(tmp_path, **SMALL)
    assert (tmp_path / "images" / "r01c01f01p01-ch1sk1fk1fl1.tiff").read_bytes() == b"a user's image"


def test_default_set_has_600_sites_in_three_splits(default_set):
    rows = _rows(default_set / syn.TABLE_NAME)
    assert len(rows) == 600 and {r["Metadata_Split"] for r in rows} == {"train", "val", "test"}


# ------------------------------------------------------------------------------------------- the source

def test_open_split_counts_labels_and_examples(small):
    train = jump.open_split(_cfg(small), "train")
    assert train.classes == list(syn.TREATMENTS) and train.class_counts().tolist() == [12, 12, 12, 12]
    val = jump.open_split(_cfg(small), "val", train.classes)
    test = jump.open_split(_cfg(small), "test", train.classes)
    assert len(train) + len(val) + len(test) == 80 and len(val) == len(test) == 16
    wells = [{(s.plates[i], s.wells[i]) for i in range(len(s))} for s in (train, val, test)]
    assert not (wells[0] & wells[1] or wells[0] & wells[2] or wells[1] & wells[2])
    ex = train[5]
    assert set(ex) == {"files", "plate", "well", "site", "label", "path", "mask"}
    assert len(ex["files"]) == 5 and ex["path"] == ex["files"][0] == train.paths[5] and os.path.isfile(ex["path"])
    assert "-ch1" in ex["files"][0] and "-ch5" in ex["files"][4] and train.files is True
    rows = {(r["Metadata_Plate"], r["Metadata_Well"]): r["Metadata_Treatment"] for r in _rows(small / syn.TABLE_NAME)}
    assert all(train.classes[train.labels[i]] == rows[(train.plates[i], train.wells[i])] for i in range(len(train)))
    two = jump.open_split(_cfg(small, channels="OrigDNA, OrigBrightfield"), "val")
    assert [Path(f).name.split("-")[1] for f in two[0]["files"]] == ["ch1sk1fk1fl1.tiff", "ch6sk1fk1fl1.tiff"]


def test_table_without_split_or_label_columns_and_parquet(small, tmp_path):
    rows = _absolute(_rows(small / syn.TABLE_NAME), small)
    keep = [c for c in rows[0] if c not in ("Metadata_Split", "Metadata_Treatment")]
    _write_table(tmp_path / "plain.csv", rows, keep)
    for split in ("train", "anything"):
        src = jump.JumpSource(tmp_path / "plain.csv", split)
        assert len(src) == 80 and src.classes == ["unlabelled"] and not src.labels.any()
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    columns["Metadata_Site"] = [int(v) for v in columns["Metadata_Site"]]
    pq.write_table(pa.table(columns), tmp_path / "load_data.parquet")
    from_parquet = jump.open_split(_cfg(tmp_path, load_data="load_data.parquet"), "val")
    from_csv = jump.open_split(_cfg(small), "val")
    assert [from_parquet[i] for i in range(16)] == [from_csv[i] for i in range(16)]


def test_stack_shape_range_and_both_intensity_modes(small):
    src = jump.open_split(_cfg(small, intensity="plate"), "train")
    ex = src[0]
    for mode in ("image", "plate", None):
        x = src.load_stack(ex, mode)
        assert x.shape == (64, 64, 5) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0 and (x.max(axis=(0, 1)) > 0.5).all()
    per_image = src.load_stack(ex, "image")
    for end in (0.0, 1.0):  # about 0.1 % of each channel's pixels are clipped at either end
        assert ((per_image == end).mean(axis=(0, 1)) <= 0.002).all() and (per_image == end).any(axis=(0, 1)).all()
    lo, hi = src.plate_stats(ex["plate"])
    assert lo.shape == hi.shape == (5,) and (hi > lo).all() and ex["plate"] in src._plate_stats
    raw = np.stack([tifffile.imread(f).astype(np.float32) for f in ex["files"]], axis=-1)
    np.testing.assert_array_equal(src.load_stack(ex, "plate"), np.clip((raw - lo) / (hi - lo), 0, 1))  # the formula
    with pytest.raises(ConfigError, match="ssl.jump.intensity='site'"):
        src.load_stack(ex, "site")


def _texture(rng, size=48) -> np.ndarray:
    return np.maximum(rng.gamma(2.0, 1.0, (size, size)), 0) * 1000 + 200


def test_plate_mode_uses_plate_statistics(tmp_path):
    """Plate P2 is plate P1 seen with 3x the gain and a higher offset; on each plate site 1 is site 0 at half
    brightness. Plate percentiles undo the gain and keep site 1 dimmer; per-image percentiles stretch it."""
    rng = np.random.default_rng(0)
    base = [[_texture(rng) for _ in range(2)] for _ in range(3)]  # 3 wells x 2 channels
    rows = []
    for plate, (gain, offset) in {"P1": (1.0, 100), "P2": (3.0, 500)}.items():
        (tmp_path / plate).mkdir()
        for w, chans in enumerate(base):
            for site, dim in ((0, 1.0), (1, 0.5)):
                row = {"Metadata_Plate": plate, "Metadata_Well": f"A0{w + 1}", "Metadata_Site": site}
                for c, img in zip(("DNA", "RNA"), chans):
                    name = f"w{w}s{site}{c}.tif"
                    tifffile.imwrite(tmp_path / plate / name, np.rint(img * dim * gain + offset).astype(np.uint16))
                    row.update({f"FileName_{c}": name, f"PathName_{c}": plate})
                rows.append(row)
    src = jump.JumpSource(_write_table(tmp_path / "t.csv", rows), "train", ("DNA", "RNA"), intensity="plate")
    p1, p2 = src.load_stack(src[0]), src.load_stack(src[6])
    assert src[6]["plate"] == "P2" and np.abs(p1 - p2).max() < 0.01
    bright, dim = src.load_stack(src[0]), src.load_stack(src[1])
    assert dim.mean() < 0.7 * bright.mean()
    assert abs(src.load_stack(src[1], "image").mean() - src.load_stack(src[0], "image").mean()) < 0.05


def test_plate_mode_removes_synthetic_plate_gains(default_set):
    src = jump.open_split(_cfg(default_set), "train", None)
    dmso = [i for i in range(len(src)) if src.labels[i] == 0]
    by_plate: dict[str, list] = {}
    for i in dmso:
        by_plate.setdefault(src.plates[i], []).append(i)
    raw = {p: np.mean([jump.read_channels(src[i]["files"])[..., 2].mean() for i in ix]) for p, ix in by_plate.items()}
    norm = {p: np.mean([src.load_stack(src[i], "plate")[..., 2].mean() for i in ix]) for p, ix in by_plate.items()}
    assert max(raw.values()) > 1.8 * min(raw.values())  # RNA gains differ ~2.5x between plates
    assert max(norm.values()) < 1.3 * min(norm.values())


def test_to_rgb_modes(small):
    src = jump.open_split(_cfg(small), "train")
    x = src.load_stack(src[0])
    views = jump.to_rgb(x, "average", n_views=2)
    assert len(views) == 2 and views[0].shape == (64, 64, 3) and views[0].dtype == np.uint8
    np.testing.assert_array_equal(views[0][..., 1], np.rint(x.mean(-1) * 255).astype(np.uint8))
    per = jump.to_rgb(x, "per_channel", np.random.default_rng(7), n_views=6)
    again = jump.to_rgb(x, "per_channel", np.random.default_rng(7), n_views=6)
    channels = [np.repeat(np.rint(x[..., k:k + 1] * 255).astype(np.uint8), 3, 2) for k in range(5)]
    picked = []
    for v, w in zip(per, again):
        np.testing.assert_array_equal(v, w)  # the same rng seed, the same views
        picked.append(next(k for k, c in enumerate(channels) if np.array_equal(v, c)))  # one channel as grey
    assert len(set(picked)) > 1
    rgb = jump.to_rgb(x, "first3")[0]
    np.testing.assert_array_equal(rgb, np.rint(x[..., :3] * 255).astype(np.uint8))
    with pytest.raises(ConfigError, match="needs at least 3 channels"):
        jump.to_rgb(x[..., :2], "first3")
    with pytest.raises(ConfigError, match="channel_mode='rgb'"):
        jump.to_rgb(x, "rgb")


def test_clahe_views_are_the_equalised_rgb_views(small):
    from jaxvit.data import photo_aug
    x = jump.open_split(_cfg(small), "train").load_stack(jump.open_split(_cfg(small), "train")[0])
    for mode in ("average", "first3", "per_channel"):
        rng = np.random.default_rng(1)
        plain = jump.to_rgb(x, mode, np.random.default_rng(1), n_views=3)
        equalised = jump.to_rgb(x, mode, rng, n_views=3, clahe=True)
        for p, e in zip(plain, equalised):
            np.testing.assert_array_equal(e, photo_aug.clahe(p))  # CLAHE on each RGB view, as before the planes


def test_count_lookup_planes_equal_the_float_stack_planes():
    """Plate intensity: 8/16-bit counts through per-channel lookup tables give the float path's planes exactly
    (random sizes, channel counts, percentiles inside and outside the data, a constant channel)."""
    rng = np.random.default_rng(0)
    for trial in range(24):
        c, h, w = int(rng.integers(1, 7)), int(rng.integers(1, 40)), int(rng.integers(1, 40))
        dtype = np.uint16 if trial % 3 else np.uint8
        counts = [rng.integers(0, np.iinfo(dtype).max + 1, (h, w)).astype(dtype) for _ in range(c)]
        x = np.stack([p.astype(np.float32) for p in counts], -1)
        if trial % 2:
            lo, hi = np.percentile(x, jump.PERCENTILES, axis=(0, 1)).astype(np.float32)
        else:
            lo = rng.uniform(0, 20000, c).astype(np.float32)
            hi = (lo + rng.uniform(0, 30000, c)).astype(np.float32)
        hi[0] = lo[0] if trial % 4 == 0 else hi[0]  # a constant channel: 0
        stack = np.clip((x - lo) / np.where(hi > lo, hi - lo, np.inf), 0.0, 1.0).astype(np.float32)
        for mode in jump.CHANNEL_MODES[:2] + (jump.CHANNEL_MODES[2:] if c >= 3 else ()):
            np.testing.assert_array_equal(jump._count_planes(counts, lo, hi, mode), jump.site_planes(stack, mode))


@pytest.mark.parametrize("intensity", ["plate", "image"])
def test_site_cache_serves_the_decoded_planes_until_a_file_or_setting_changes(small, tmp_path, intensity):
    cache = tmp_path / "cache"
    rows = _absolute(_rows(small / syn.TABLE_NAME), small)
    for r in rows:  # a private copy of the first site's DNA channel, to change it later
        if r is rows[0]:
            dna = tmp_path / r["FileName_OrigDNA"]
            dna.write_bytes((Path(r["PathName_OrigDNA"]) / r["FileName_OrigDNA"]).read_bytes())
            r["PathName_OrigDNA"] = str(tmp_path)
    table = _write_table(tmp_path / "t.csv", rows)
    cached = jump.JumpSource(table, "train", intensity=intensity, cache_dir=str(cache))
    plain = jump.JumpSource(table, "train", intensity=intensity)
    k = next(i for i in range(len(plain)) if plain[i]["files"][0] == str(dna))
    for mode in jump.CHANNEL_MODES:
        want = jump.site_planes(plain.load_stack(plain[k]), mode)
        np.testing.assert_array_equal(cached.planes(cached[k], mode), want)  # made and stored
        np.testing.assert_array_equal(cached.planes(cached[k], mode), want)  # read back
        np.testing.assert_array_equal(plain.planes(plain[k], mode), want)  # no cache
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 3 and not list(cache.rglob("*.tmp*"))
    assert np.load(entries[0]).dtype == np.uint8
    # a setting changed: a new entry
    clahe = jump.JumpSource(table, "train", intensity=intensity, cache_dir=str(cache), clahe=True)
    np.testing.assert_array_equal(clahe.planes(clahe[k]), jump.site_planes(plain.load_stack(plain[k]), clahe=True))
    assert len(list(cache.rglob("*.npy"))) == 4
    # the file changed (new pixels, new modification time): decoded again, not served stale
    before = cached.planes(cached[k])
    tifffile.imwrite(dna, tifffile.imread(dna) // 3)
    os.utime(dna, ns=(1, 1))
    fresh, plain = (jump.JumpSource(table, "train", intensity=intensity, cache_dir=d) for d in (str(cache), ""))
    want = jump.site_planes(plain.load_stack(plain[k]))
    assert not np.array_equal(want, before)
    np.testing.assert_array_equal(fresh.planes(fresh[k]), want)
    assert len(list(cache.rglob("*.npy"))) == 5


def test_source_pickles_cheaply_with_its_plate_statistics(small):
    src = jump.open_split(_cfg(small, intensity="plate"), "train")
    src.plate_stats(src[0]["plate"])
    assert len(src.paths) == len(src)
    blob = pickle.dumps(src)
    clone = pickle.loads(blob)
    assert blob.count(str(small).encode()) <= 2 + 2 * SMALL["n_plates"]  # each directory once, not each file
    assert clone[3] == src[3] and clone._plate_stats.keys() == src._plate_stats.keys() and clone.paths == src.paths
    np.testing.assert_array_equal(clone.load_stack(clone[3]), src.load_stack(src[3]))


# ------------------------------------------------------------------------------------------- errors

def test_errors_name_what_to_fix(small, tmp_path):
    rows = _absolute(_rows(small / syn.TABLE_NAME), small)
    with pytest.raises(DataError, match=r"channels \['OrigFoo'\].*channels in the table: \['OrigDNA', "
                                        r"'OrigER', 'OrigRNA', 'OrigAGP', 'OrigMito', 'OrigBrightfield'"):
        jump.open_split(_cfg(small, channels=("OrigDNA", "OrigFoo")), "train")
    with pytest.raises(DataError, match=r"no sites with Metadata_Split == 'holdout'.*\['test', 'train', 'val'\]"):
        jump.open_split(_cfg(small), "holdout")
    with pytest.raises(MissingDataError, match="ssl.jump.load_data='nope.csv': no table matches"):
        jump.open_split(_cfg(small, load_data="nope.csv"), "train")
    with pytest.raises(ConfigError, match="ssl.jump.channel_mode='rgb'"):
        jump.open_split(_cfg(small, channel_mode="rgb"), "train")
    with pytest.raises(DataError, match=r"columns \['Metadata_Site'\] not found"):
        jump.JumpSource(_write_table(tmp_path / "a.csv", rows, [c for c in rows[0] if c != "Metadata_Site"]), "val")
    bad = [dict(r, PathName_OrigER="s3://cellpainting-gallery/x") for r in rows]
    with pytest.raises(DataError, match="PathName_OrigER is a URL"):
        jump.JumpSource(_write_table(tmp_path / "b.csv", bad), "val")
    moved = _write_table(tmp_path / "c.csv", _rows(small / syn.TABLE_NAME))  # relative paths, wrong folder
    with pytest.raises(MissingDataError, match="image files not found.*relative to the table's folder"):
        jump.JumpSource(moved, "val")


def test_unreadable_or_mismatched_files_raise_image_load_error(small, tmp_path):
    rows = [r for r in _absolute(_rows(small / syn.TABLE_NAME), small) if r["Metadata_Split"] == "train"]
    rows[-1]["FileName_OrigRNA"] = "missing.tiff"
    (tmp_path / "odd").mkdir()
    tifffile.imwrite(tmp_path / "odd" / "small.tiff", np.zeros((32, 40), np.uint16))
    rows[-2].update(FileName_OrigMito="small.tiff", PathName_OrigMito=str(tmp_path / "odd"))
    (tmp_path / "odd" / "broken.tiff").write_bytes(b"II*\x00 not a tiff")
    rows[-3].update(FileName_OrigER="broken.tiff", PathName_OrigER=str(tmp_path / "odd"))
    src = jump.JumpSource(_write_table(tmp_path / "t.csv", rows), "train")
    with pytest.raises(ImageLoadError, match="missing.tiff"):
        src.load_stack(src[len(src) - 1])
    with pytest.raises(ImageLoadError, match="broken.tiff"):
        src.load_stack(src[len(src) - 3])
    with pytest.raises(ImageLoadError) as e:
        src.load_stack(src[len(src) - 2])
    assert "small.tiff" in str(e.value) and "40x32" in str(e.value) and src[len(src) - 2]["files"][0] in str(e.value)


# ------------------------------------------------------------------------------------------- masks, k-NN

def test_masks_label_whole_cells_over_nuclei(small):
    src = jump.open_split(_cfg(small), "train")
    for i in range(0, len(src), 7):
        ex = src[i]
        mask, dna = src.load_mask(ex), src.load_stack(ex, "image")[..., 0]
        assert mask.shape == dna.shape
        ids, counts = np.unique(mask, return_counts=True)
        assert ids[0] == 0 and ids[1:].tolist() == list(range(1, len(ids)))  # consecutive, none empty
        assert (counts[1:] > 20).all()
        assert (mask[dna > 0.5] > 0).mean() > 0.97  # bright nuclei lie inside cells
        background = dna[mask == 0].mean()
        for k in ids[1:]:
            assert dna[mask == k].max() > background + 0.3  # every cell has a bright nucleus


def _features(src: jump.JumpSource, size: int = 4) -> np.ndarray:
    out = []
    for i in range(len(src)):
        grey = jump.to_rgb(src.load_stack(src[i]), "average")[0][..., 0]
        out.append(np.asarray(Image.fromarray(grey).resize((size, size), Image.BOX), np.float32).ravel())
    return np.stack(out)


def test_raw_pixel_knn_sees_the_treatments(default_set):
    from sklearn.neighbors import KNeighborsClassifier
    train = jump.open_split(_cfg(default_set, intensity="plate"), "train")
    val = jump.open_split(_cfg(default_set, intensity="plate"), "val", train.classes)
    knn = KNeighborsClassifier(5).fit(_features(train), train.labels)
    accuracy = knn.score(_features(val), val.labels)
    print(f"raw-pixel 5-NN accuracy on val: {accuracy:.3f} (chance 0.25)")
    assert 0.37 < accuracy < 0.9


def test_the_old_data_keys_name_their_new_place():
    from jaxvit.config import base_config, problems, unknown_overrides
    c = base_config("ssl")
    assert c.ssl.jump.channel_mode == "average" and "channel_mode" not in c.data
    assert unknown_overrides(c, ["data.channel_mode"]) == [
        "config key 'data.channel_mode' is now 'ssl.jump.channel_mode' (JUMP's keys belong to the ssl task): "
        "pass --config.ssl.jump.channel_mode=..."]
    c.data.load_data = "old.csv"  # a config file still setting the old key
    assert "data.load_data: the key is now ssl.jump.load_data (JUMP's keys belong to the ssl task)" in problems(c)
