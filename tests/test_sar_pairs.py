"""Paired S1/S2 tiles (jaxvit.tasks.sar_grounding.pairs) and the synthetic SAR/optical set, on real files on disk."""
from __future__ import annotations

import ast
import csv
import importlib.util
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from jaxvit.data import pipeline
from jaxvit.demos import sar as synthetic_sar
from jaxvit.tasks.sar_grounding import pairs as sar_pairs
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import DataError, MissingDataError

H = W = 24


def _stack(rng, bands, lo, hi, dtype=np.float32):
    return rng.uniform(lo, hi, (bands, H, W)).astype(dtype)


def _write(path: Path, chw: np.ndarray, layout: str = "chw") -> str:
    """A (C, H, W) stack as band-interleaved GeoTIFF ("chw"), pixel-interleaved GeoTIFF ("hwc"), or .npy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, chw if layout == "chw" else np.moveaxis(chw, 0, -1))
    elif layout == "chw":
        tifffile.imwrite(path, chw, photometric="minisblack", planarconfig="separate", metadata=None)
    else:
        tifffile.imwrite(path, np.moveaxis(chw, 0, -1), photometric="minisblack", planarconfig="contig",
                         metadata=None)
    return str(path)


def _table(root: Path, rows: list[tuple], header=("s1_path", "s2_path", "split")) -> Path:
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return root / "pairs.csv"


def _cfg(root: Path, **kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"data_dir": str(root), "image_size": 16, **sar_pairs.CONFIG_DEFAULTS})
    c.aug = ml_collections.ConfigDict({"hflip": True, "vflip": True, "rot90": True})
    c.update(kw)
    return c


@pytest.fixture
def pair_dir(tmp_path):
    """Two pairs (one train, one val): S1 dB as float32 GeoTIFF / .npy, S2 L2A uint16 GeoTIFF / (H, W, C) .npy."""
    rng = np.random.default_rng(0)
    s1 = [_stack(rng, 2, -25, -5) for _ in range(2)]
    s2 = [_stack(rng, 12, 100, 5000).astype(np.uint16) for _ in range(2)]
    _write(tmp_path / "s1/a.tif", s1[0])
    _write(tmp_path / "s2/a.tif", s2[0])
    _write(tmp_path / "s1/b.npy", s1[1])
    _write(tmp_path / "s2/b.npy", s2[1], "hwc")
    _table(tmp_path, [("s1/a.tif", "s2/a.tif", "train"), ("s1/b.npy", "s2/b.npy", "val")])
    return tmp_path, s1, s2


def test_stats_are_terratorchs():
    """STATS equal terratorch's v1 pre-training values, band by band (read from its source, not imported)."""
    spec = importlib.util.find_spec("terratorch")
    if spec is None:
        pytest.skip("terratorch not installed (pip install --no-deps terratorch)")
    path = Path(spec.submodule_search_locations[0]) / "models/backbones/terramind/model/terramind_register.py"
    literals = {t.id: ast.literal_eval(node.value) for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
                and t.id in ("PRETRAINED_BANDS", "v1_pretraining_mean", "v1_pretraining_std")}
    names = {"B01": "COASTAL_AEROSOL", "B02": "BLUE", "B03": "GREEN", "B04": "RED", "B05": "RED_EDGE_1",
             "B06": "RED_EDGE_2", "B07": "RED_EDGE_3", "B08": "NIR_BROAD", "B8A": "NIR_NARROW", "B09": "WATER_VAPOR",
             "B10": "CIRRUS", "B11": "SWIR_1", "B12": "SWIR_2", "R": "RED", "G": "GREEN", "B": "BLUE"}
    keys = {"S2L2A": "sen2l2a", "S2L1C": "sen2l1c", "RGB": "sen2rgb", "S1GRD": "sen1grd", "S1RTC": "sen1rtc",
            "DEM": "dem"}
    for modality, stats in sar_pairs.STATS.items():
        key = f"untok_{keys[modality]}@224"
        assert [names.get(b, b) for b in stats.bands] == literals["PRETRAINED_BANDS"][key], modality
        assert stats.mean == tuple(literals["v1_pretraining_mean"][key]), modality
        assert stats.std == tuple(literals["v1_pretraining_std"][key]), modality


def test_layouts_read_alike(tmp_path):
    rng = np.random.default_rng(1)
    x = _stack(rng, 12, 0, 9000).astype(np.uint16)
    files = [_write(tmp_path / "a.tif", x), _write(tmp_path / "b.tif", x, "hwc"),
             _write(tmp_path / "c.npy", x), _write(tmp_path / "d.npy", x, "hwc")]
    for f in files:
        np.testing.assert_array_equal(sar_pairs.read_bands(f, 12), np.moveaxis(x, 0, -1).astype(np.float32))


def test_normalisation_is_the_formula(pair_dir):
    root, s1, s2 = pair_dir
    src = sar_pairs.open_split(_cfg(root), "train")
    assert len(src) == 1 and src[0]["id"] == "a"
    out = sar_pairs.PairFormat(s2_offset=1000.0).load(src[0])
    st1, st2 = sar_pairs.STATS["S1GRD"], sar_pairs.STATS["S2L2A"]
    want1 = (np.moveaxis(s1[0], 0, -1) - np.array(st1.mean)) / np.array(st1.std)
    want2 = (np.moveaxis(s2[0], 0, -1) - (np.array(st2.mean) + 1000.0)) / np.array(st2.std)
    np.testing.assert_allclose(out["s1"], want1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["s2"], want2, rtol=1e-5, atol=1e-5)
    assert out["valid"].min() == 1.0
    np.testing.assert_allclose(sar_pairs.denormalize(out["s2"], "S2L2A", 1000.0), np.moveaxis(s2[0], 0, -1),
                               rtol=1e-5)
    want_rgb = np.clip((np.moveaxis(s2[0][[3, 2, 1]], 0, -1) - 1000.0) / 3000.0, 0, 1) * 255  # B04 B03 B02
    np.testing.assert_allclose(sar_pairs.rgb_composite(out["s2"]), want_rgb, atol=0.51)
    # linear sigma0 is converted to dB before normalising
    lin = _write(root / "s1/lin.tif", (10.0 ** (s1[0] / 10.0)).astype(np.float32))
    got = sar_pairs.PairFormat(s1_scale="linear").load({"s1": lin, "s2": src[0]["s2"]})["s1"]
    np.testing.assert_allclose(got, want1, atol=1e-4)


def test_augmentation_moves_both_tiles_alike(tmp_path):
    """A marker pixel lands at the same place in S1, S2 and the valid mask; a window is an exact pixel copy."""
    s1 = np.full((2, H, W), -15.0, np.float32)
    s2 = np.full((12, H, W), 1000, np.uint16)
    s1[:, 5, 17], s2[:, 5, 17] = 0.0, 9000  # the marker
    s2[:, 20, 3] = 0  # an S2 nodata pixel
    _write(tmp_path / "s1/m.tif", s1), _write(tmp_path / "s2/m.tif", s2)
    _table(tmp_path, [("s1/m.tif", "s2/m.tif", "train")])
    cfg = _cfg(tmp_path)
    t = sar_pairs.pair_transform(cfg)
    ex = sar_pairs.open_split(cfg, "train")[0]
    seen = set()
    for seed in range(40):
        out = t.train(ex, np.random.default_rng(seed))
        assert out["s1"].shape == (16, 16, 2) and out["s2"].shape == (16, 16, 12) and out["valid"].shape == (16, 16)
        m1 = np.argwhere(out["s1"][..., 0] > 1.0)
        m2 = np.argwhere(out["s2"][..., 0] > 1.0)
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(np.argwhere(out["valid"] == 0), np.argwhere(np.all(out["s2"] == 0, -1)))
        if len(m1):
            seen.add(tuple(m1[0]))
        again = t.train(ex, np.random.default_rng(seed))
        assert all(np.array_equal(out[k], again[k]) for k in out)  # deterministic in the rng
    assert len(seen) > 5  # the marker did move around
    full = sar_pairs.PairFormat().load(ex)
    centre = t.eval(ex)
    np.testing.assert_array_equal(centre["s2"], full["s2"][4:20, 4:20])
    np.testing.assert_array_equal(centre["s1"], full["s1"][4:20, 4:20])


def test_pipeline_batches_are_deterministic(pair_dir):
    root = pair_dir[0]
    cfg = _cfg(root, num_workers=0, prefetch=0)
    src = sar_pairs.open_split(cfg, None)
    t = sar_pairs.pair_transform(cfg)
    batches = []
    for _ in range(2):
        it = pipeline.train_iterator(src, t.train, cfg, global_batch=2, seed=3, process_index=0, process_count=1)
        batches.append([next(it) for _ in range(2)])
        it.close()
    assert batches[0][0]["s2"].shape == (2, 16, 16, 12) and batches[0][0]["s1"].shape == (2, 16, 16, 2)
    for a, b in zip(*batches):
        assert all(np.array_equal(a[k], b[k]) for k in ("s1", "s2", "valid"))


def test_errors_name_the_file(pair_dir):
    root, s1, s2 = pair_dir
    fmt = sar_pairs.PairFormat()
    three = _write(root / "s1/three.tif", np.zeros((3, H, W), np.float32))
    small = _write(root / "s1/small.tif", s1[0][:, :20])
    holes = s1[0].copy()
    holes[0, 2, 2] = np.nan
    nan = _write(root / "s1/nan.npy", holes)
    cases = {three: {"s1": three, "s2": str(root / "s2/a.tif")},  # 3 bands for S1
             str(root / "s2/b.npy"): {"s1": str(root / "s1/a.tif"), "s2": str(root / "s2/b.npy")},  # fine
             str(root / "missing.tif"): {"s1": str(root / "missing.tif"), "s2": str(root / "s2/a.tif")},
             small: {"s1": small, "s2": str(root / "s2/a.tif")}}
    for path, ex in cases.items():
        if path.endswith("b.npy"):
            fmt.load(ex)
            continue
        with pytest.raises(ImageLoadError) as e:
            fmt.load(ex)
        assert e.value.path == path and path in str(e.value), str(e.value)
    assert "expected 2 bands" in str(pytest.raises(ImageLoadError, fmt.load, cases[three]).value)
    assert "s2/a.tif" in pytest.raises(ImageLoadError, fmt.load, cases[small]).value.reason  # names both files
    # S2 with 13 bands where L2A has 12
    l1c = _write(root / "s2/l1c.tif", np.ones((13, H, W), np.uint16))
    err = pytest.raises(ImageLoadError, fmt.load, {"s1": str(root / "s1/a.tif"), "s2": l1c}).value
    assert err.path == l1c and "expected 12 bands" in err.reason
    # nodata: error mode names the file, zero mode zeroes the pixel and clears `valid`
    ex = {"s1": nan, "s2": str(root / "s2/a.tif")}
    err = pytest.raises(ImageLoadError, sar_pairs.PairFormat(nodata="error").load, ex).value
    assert err.path == nan and "1 nodata" in err.reason
    out = fmt.load(ex)
    assert out["s1"][2, 2, 0] == 0.0 and out["valid"][2, 2] == 0.0 and out["valid"].sum() == H * W - 1
    # a tile smaller than the crop
    with pytest.raises(ImageLoadError, match="smaller than data.image_size=32"):
        sar_pairs.pair_transform(_cfg(root, image_size=32)).eval(cases[str(root / "s2/b.npy")])


def test_table_and_unit_errors(pair_dir):
    root, s1, s2 = pair_dir
    with pytest.raises(MissingDataError, match="nope.csv"):
        sar_pairs.open_split(_cfg(root, pairs="nope.csv"), "train")
    _table(root, [("s1/a.tif", "train")], header=("s1_path", "split"))
    with pytest.raises(DataError, match=r"\['s2_path'\] not found"):
        sar_pairs.open_split(_cfg(root), "train")
    _table(root, [("s1/a.tif", "s2/a.tif", "train")])
    with pytest.raises(DataError, match=r"split == 'test'.*\['train'\]"):
        sar_pairs.open_split(_cfg(root), "test")
    _table(root, [("s1/x.tif", "s2/x.tif", "train")])
    with pytest.raises(MissingDataError, match="s1/x.tif"):
        sar_pairs.open_split(_cfg(root), "train")
    _table(root, [("s1/three.tif", "s2/a.tif", "train")])
    _write(root / "s1/three.tif", np.zeros((3, H, W), np.float32))
    with pytest.raises(DataError, match="three.tif.*expected 2 bands"):
        sar_pairs.open_split(_cfg(root), "train")
    # S1 stored linear but read as dB; S2 reflectance in 0..1
    _write(root / "s1/lin.tif", (10.0 ** (s1[0] / 10.0)).astype(np.float32))
    _table(root, [("s1/lin.tif", "s2/a.tif", "train")])
    with pytest.raises(DataError, match="lin.tif.*s1_scale='linear'"):
        sar_pairs.open_split(_cfg(root), "train")
    assert len(sar_pairs.open_split(_cfg(root, s1_scale="linear"), "train")) == 1
    _write(root / "s2/refl.tif", s2[0].astype(np.float32) / 10000.0)
    _table(root, [("s1/a.tif", "s2/refl.tif", "train")])
    with pytest.raises(DataError, match="refl.tif.*multiply the tiles by 10000"):
        sar_pairs.open_split(_cfg(root), "train")


def _edges(x: np.ndarray) -> np.ndarray:
    g = x.mean(-1)
    return np.hypot(ndimage.sobel(g, 0, mode="reflect"), ndimage.sobel(g, 1, mode="reflect"))


def test_synthetic_set(tmp_path):
    """Written once (marker), deterministic in the seed, readable by the source, SAR/optical edges aligned."""
    root = synthetic_sar.write_dataset(tmp_path / "a", scenes={"train": 2, "val": 1}, seed=5)
    other = synthetic_sar.write_dataset(tmp_path / "b", scenes={"train": 2, "val": 1}, seed=5, fmt="npy")
    csv_file = root / "pairs.csv"
    stamp = csv_file.stat().st_mtime_ns
    synthetic_sar.write_dataset(root, scenes={"train": 2, "val": 1}, seed=5)
    assert csv_file.stat().st_mtime_ns == stamp and not list(root.glob(".synthetic_sar.partial*"))
    cfg = _cfg(root, image_size=64)
    train, val = sar_pairs.open_split(cfg, "train"), sar_pairs.open_split(cfg, "val")
    assert (len(train), len(val)) == (32, 16)
    with tifffile.TiffFile(train[0]["s2"]) as tif:
        assert tif.is_geotiff and tif.series[0].shape == (12, 64, 64) and tif.series[0].dtype == np.uint16
    t = sar_pairs.pair_transform(cfg)
    tiles = [t.eval(train[i]) for i in range(len(train))]
    npy = sar_pairs.open_split(_cfg(other, image_size=64), "train")
    np.testing.assert_array_equal(t.eval(npy[3])["s2"], tiles[3]["s2"])  # same seed, same pixels
    corr = lambda a, b: np.corrcoef(_edges(a).ravel(), _edges(b).ravel())[0, 1]  # noqa: E731
    paired = np.mean([corr(x["s2"], x["s1"]) for x in tiles])
    shuffled = np.mean([corr(x["s2"], tiles[(i + 7) % len(tiles)]["s1"]) for i, x in enumerate(tiles)])
    assert paired > 0.5 and abs(shuffled) < 0.15, (paired, shuffled)
    # water is dark in both sensors, urban bright in SAR
    cls, s2, s1 = synthetic_sar.render_scene(np.random.default_rng(0))
    water, urban = cls == synthetic_sar.WATER, cls == synthetic_sar.URBAN
    assert s1[water, 0].mean() < s1[~water, 0].mean() - 5 and s1[urban, 0].mean() > s1[~urban, 0].mean() + 5
    assert s2[water, 7].mean() < 500 < s2[~water, 7].mean()  # B08 (NIR)


def test_synthetic_set_in_whole_scene_tiles(tmp_path):
    """tile=256: one TerraMind-size tile per scene, the same pixels as the scene's 64 px tiles put together."""
    small = synthetic_sar.write_dataset(tmp_path / "a", scenes={"train": 1}, seed=3, fmt="npy")
    whole = synthetic_sar.write_dataset(tmp_path / "b", scenes={"train": 1}, seed=3, fmt="npy", tile=256)
    (big,) = sorted((whole / "s2").glob("*.npy"))
    big = np.load(big)
    assert big.shape == (12, 256, 256)
    np.testing.assert_array_equal(np.load(small / "s2" / "scene000_r1c2.npy"), big[:, 64:128, 128:192])
    with pytest.raises(ValueError, match="tile must divide"):
        synthetic_sar.write_dataset(tmp_path / "c", scenes={"train": 1}, tile=100)
