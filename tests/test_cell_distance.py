"""The DINOCell distance-map task: decoder shapes, EDT targets against scipy, watershed post-processing, instance
metrics against a brute-force count, paired data on disk (alignment under augmentation, bad pairs), training."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from helpers.tiny import TINY_VIT
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import DataError
from jaxvit.models import get_config
from jaxvit.tasks.cell_distance import metrics
from jaxvit.tasks.cell_distance.data import CellExample, PairedSource
from jaxvit.tasks.cell_distance.model import CellDistanceModel, default_layers
from jaxvit.tasks.cell_distance.postprocess import instances
from jaxvit.tasks.cell_distance.targets import distance_map
from jaxvit.tasks.cell_distance.task import tile_starts


def disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def touching_pair(shape=(40, 60)):
    """Two discs of radius 10 whose centres are 18 px apart, split at column 29: they share a straight border."""
    xx = np.mgrid[:shape[0], :shape[1]][1]
    both = disc(shape, (20, 20), 10) | disc(shape, (20, 38), 10)
    return np.where(both, np.where(xx < 29, 1, 2), 0).astype(np.int32)


# ------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("patch,size,layers,channels", [
    (8, (32, 32), None, (32, 16, 16, 8)),
    (16, (64, 48), (0, 1), (16, 8)),
    (14, (56, 42), (1, 0, 1), (16, 8, 8)),
    (4, (24, 40), (1,), (8,)),
])
def test_decoder_output_is_the_input_size(patch, size, layers, channels):
    vit = get_config("dinov2_vits14", **{**TINY_VIT, "patch_size": patch})
    model = CellDistanceModel(vit, layers or default_layers(vit.depth), channels)
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: no compile
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (2, *size) and out.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"} and set(variables["params"]) == {"backbone", "head"}
    laterals = [variables["params"]["head"][f"lateral_{i}"]["kernel"].shape for i in range(len(channels))]
    assert laterals == [(1, 1, vit.hidden_size, c) for c in channels]


@pytest.mark.slow
def test_decoder_forward_is_a_trainable_sigmoid_map():
    vit = get_config("dinov2_vits14", **TINY_VIT)
    model = CellDistanceModel(vit, default_layers(vit.depth), (16, 8, 8, 8))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert out.shape == (2, 32, 32) and 0 < float(out.min()) < float(out.max()) < 1
    before = jax.tree_util.tree_leaves(variables["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(updates["batch_stats"])))


def test_default_layers_follow_dinocell():
    assert default_layers(12) == (2, 5, 8, 11) and default_layers(24) == (4, 11, 17, 23)
    assert default_layers(40) == (9, 19, 29, 39) and default_layers(2) == (0, 0, 0, 1)


# ------------------------------------------------------------------------------------------- targets

def test_distance_map_is_scipys_per_cell_transform_normalised_per_cell():
    labels = np.zeros((50, 70), np.int32)
    labels[:, :] = 0
    labels[5:20, 5:30] = 3  # a rectangle
    labels[5:20, 30:45] = 9  # touching it (ids need not be consecutive)
    labels[30:50, 50:70] = 4  # at the image corner
    labels[disc(labels.shape, (38, 20), 8)] = 7
    want = np.zeros(labels.shape)
    for cell in np.unique(labels)[1:]:
        d = ndimage.distance_transform_edt(labels == cell)  # whole image, one cell at a time
        want[labels == cell] = d[labels == cell] / d[labels == cell].max()
    got = distance_map(labels)
    assert got.dtype == np.float32 and got.shape == labels.shape
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[labels == 0].max() == 0 and all(got[labels == c].max() == 1 for c in (3, 9, 4, 7))
    assert got[12, 29] < 0.2 and got[12, 30] < 0.2  # the shared border is a valley


# ------------------------------------------------------------------------------------------- post-processing

def test_two_touching_cells_come_out_as_two_instances():
    labels = touching_pair()
    assert ndimage.label(labels > 0)[1] == 1  # one blob: thresholding alone would merge them
    cells = instances(distance_map(labels))
    assert cells.max() == 2
    iou = metrics.iou_matrix(labels, cells)
    assert iou.max(1).min() > 0.9  # each true cell has its own, well-fitting instance


def test_instances_of_an_empty_map_and_thresholds():
    assert instances(np.zeros((8, 8))).max() == 0
    m = distance_map(touching_pair())
    assert instances(m, peak_threshold=0.999).max() == 2  # the per-cell maxima are exactly 1
    assert (instances(m, fill_threshold=0.5) > 0).sum() < (instances(m) > 0).sum()


# ------------------------------------------------------------------------------------------- metrics

def brute_force_iou(true, pred):
    t_ids, p_ids = [i for i in np.unique(true) if i], [j for j in np.unique(pred) if j]
    out = np.zeros((len(t_ids), len(p_ids)))
    for a, i in enumerate(t_ids):
        for b, j in enumerate(p_ids):
            inter = np.sum((true == i) & (pred == j))
            out[a, b] = inter / np.sum((true == i) | (pred == j))
    return out


def test_iou_matrix_matches_brute_force_on_random_labels():
    rng = np.random.default_rng(0)
    true = rng.choice([0, 2, 5, 6], (30, 30))
    pred = rng.choice([0, 1, 3], (30, 30))
    np.testing.assert_allclose(metrics.iou_matrix(true, pred), brute_force_iou(true, pred))


def test_instance_metrics_on_hand_built_masks():
    true = np.zeros((60, 60), np.int32)
    pred = np.zeros_like(true)
    true[0:10, 0:10] = 1; pred[0:10, 2:12] = 1  # shifted by 2: IoU 80/120 = 2/3
    true[20:30, 0:10] = 2; pred[20:30, 0:10] = 2  # exact: IoU 1
    true[40:50, 0:20] = 3; pred[40:50, 0:10] = 3; pred[40:50, 10:20] = 4  # split in halves: IoU 1/2 and 1/2
    true[0:10, 40:50] = 5  # missed
    pred[20:30, 40:50] = 6  # false positive
    pred[50:60, 50:60] = 7  # false positive
    iou = brute_force_iou(true, pred)
    assert sorted(np.round(iou[iou > 0], 4)) == [0.5, 0.5, 0.6667, 1.0]
    counts = metrics.image_counts(true, pred)
    m = metrics.summarise(counts)
    # at 0.5 one of the halves (both at exactly 0.5) matches cell 3: TP 3 (IoUs 2/3, 1, 1/2) of 6 predicted, 4 true
    tp, fp, fn = 3, 6 - 3, 4 - 3
    assert m["ap50"] == pytest.approx(tp / (tp + fp + fn)) and m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["mean_iou"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    # IoU >= 0.55 .. 0.65: 2 pairs; 0.7 .. 0.95: only the exact one
    want = [tp / (tp + fp + fn)] + [2 / (2 + 4 + 2)] * 3 + [1 / (1 + 5 + 3)] * 6
    assert list(m["ap_per_threshold"].values()) == pytest.approx(want)
    assert m["ap"] == pytest.approx(np.mean(want)) and m["n_true"] == 4 and m["n_pred"] == 6
    # per-image count rows add up to the dataset's
    both = metrics.summarise(np.stack([counts, metrics.image_counts(true, true)]))
    assert both["ap50"] == pytest.approx(7 / (7 + 3 + 1)) and both["n_true"] == 8


# ------------------------------------------------------------------------------------------- data

def write_pair(root, name, labels, image=None, mask_suffix=".png", **tiff):
    """images/<name>.tif (default: the distance map x 60000 as uint16, so image and target must stay aligned) and
    masks/<name><mask_suffix>."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.rint(distance_map(labels) * 60000).astype(np.uint16)
    tifffile.imwrite(root / "images" / f"{name}.tif", image, **tiff)
    if mask_suffix == ".png":
        Image.fromarray(labels.astype(np.uint16)).save(root / "masks" / f"{name}.png")
    else:
        tifffile.imwrite(root / "masks" / f"{name}{mask_suffix}", labels)


def random_cells(rng, shape, n):
    """Touching cells: a Voronoi split of the pixels near random centres."""
    centres = rng.uniform(0, 1, (n, 2)) * shape
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d = np.hypot(yy[None] - centres[:, :1, None], xx[None] - centres[:, 1:, None])
    return np.where(d.min(0) < 9, d.argmin(0) + 1, 0).astype(np.int32)


def transform(**kw):
    return CellExample(**{"image_size": 32, "canvas": 48, "in_channels": 3, "mean": (0.0,), "std": (1.0,), **kw})


def test_augmentation_keeps_image_and_target_aligned(tmp_path):
    rng = np.random.default_rng(0)
    for i, (shape, n) in enumerate([((70, 50), 8), ((24, 40), 1)]):  # larger and smaller than the 32 px crop
        write_pair(tmp_path / "train", f"img{i}", random_cells(rng, shape, n))
    src = PairedSource(tmp_path, "train")
    t = transform(scale_range=(0.7, 1.3))
    for i in range(2):
        for seed in range(6):
            out = t(src[i], np.random.default_rng(seed))
            assert out["image"].shape == (32, 32, 3) and out["target"].shape == (32, 32)
            img, target = out["image"][:, :, 0], out["target"]
            assert (target > 0).sum() > 20
            # the image is the target up to the percentile stretch: the same zero set (background and padding
            # at the median, 0 here) and proportional values (up to a clipped brightest pixel)
            np.testing.assert_array_equal(img > 0, target > 0)
            assert np.corrcoef(img.ravel(), target.ravel())[0, 1] > 0.999
    again = t(src[0], np.random.default_rng(3))["image"]
    np.testing.assert_array_equal(again, t(src[0], np.random.default_rng(3))["image"])  # deterministic in the rng



def test_clahe_equalises_each_channel_of_the_stretched_stack(tmp_path):
    from jaxvit.data.photo_aug import clahe_channel
    from jaxvit.tasks.cell_distance.data import scale_percentiles
    labels = random_cells(np.random.default_rng(1), (40, 30), 5)
    image = np.random.default_rng(2).integers(0, 4000, (3, 40, 30)).astype(np.uint16)
    write_pair(tmp_path / "val", "a", labels, image, photometric="minisblack", metadata={"axes": "CYX"})
    out = transform(channel_mode="first3", clahe=True)(PairedSource(tmp_path, "val")[0])["image"][:40, :30]
    u8 = np.rint(scale_percentiles(image.transpose(1, 2, 0)) * 255).astype(np.uint8)
    for c in range(3):
        np.testing.assert_allclose(out[:, :, c], clahe_channel(u8[:, :, c]) / 255, atol=1e-6)
def test_training_target_of_the_window_cells_is_the_full_maps(tmp_path, monkeypatch):
    """The train transform computes the distance map only for cells meeting the crop window (and the resize's
    reach): its output is identical to the old path's, the whole mask's map cropped the same way."""
    from jaxvit.tasks.cell_distance import data as cell_data
    rng = np.random.default_rng(4)
    for i, (shape, n) in enumerate([((200, 160), 40), ((24, 40), 2)]):  # many cells outside the crop; padding
        write_pair(tmp_path / "train", f"img{i}", random_cells(rng, shape, n))
    src = PairedSource(tmp_path, "train")
    t = transform(scale_range=(0.6, 1.4), hflip=True, rot90=True)
    new = [t(src[i], np.random.default_rng(seed)) for i in range(2) for seed in range(8)]
    monkeypatch.setattr(cell_data, "distance_map", lambda labels, window=None: distance_map(labels))
    old = [t(src[i], np.random.default_rng(seed)) for i in range(2) for seed in range(8)]
    for a, b in zip(new, old):
        np.testing.assert_array_equal(a["target"], b["target"])
        np.testing.assert_array_equal(a["image"], b["image"])
    labels = random_cells(rng, (120, 120), 30)
    window = (30, 70, 50, 90)
    part, full = distance_map(labels, window), distance_map(labels)
    np.testing.assert_array_equal(part[30:70, 50:90], full[30:70, 50:90])
    assert (part == 0).sum() > (full == 0).sum()  # cells elsewhere were skipped


def test_cached_images_and_maps_give_the_same_training_examples_until_a_file_changes(tmp_path):
    """cell_distance.cache_dir: the scaled image and whole distance map, computed once per image, give the examples
    of the uncached path exactly; a changed mask is computed again."""
    rng = np.random.default_rng(5)
    for i, (shape, n) in enumerate([((90, 70), 20), ((24, 40), 2)]):  # cells outside the crop; padding
        write_pair(tmp_path / "train", f"img{i}", random_cells(rng, shape, n))
    src, cache = PairedSource(tmp_path, "train"), tmp_path / "cache"
    kw = dict(scale_range=(0.6, 1.4), brightness=0.1, invert_prob=0.5, clahe=True)
    plain, cached = transform(**kw), transform(**kw, cache_dir=str(cache))
    for _ in range(2):  # made and stored, then read back
        for i in range(2):
            for seed in range(3):
                a, b = cached(src[i], np.random.default_rng(seed)), plain(src[i], np.random.default_rng(seed))
                np.testing.assert_array_equal(a["target"], b["target"])
                np.testing.assert_array_equal(a["image"], b["image"])
    assert len(list(cache.rglob("*.npy"))) == 2 and not list(cache.rglob("*.tmp*"))
    mask = Path(src[0]["mask"])
    Image.fromarray(random_cells(rng, (90, 70), 20).astype(np.uint16)).save(mask)
    os.utime(mask, ns=(1, 1))
    a, b = cached(src[0], np.random.default_rng(0)), plain(src[0], np.random.default_rng(0))
    np.testing.assert_array_equal(a["target"], b["target"])
    assert len(list(cache.rglob("*.npy"))) == 3


def test_eval_transform_pads_to_the_canvas(tmp_path):
    labels = random_cells(np.random.default_rng(1), (40, 30), 5)
    image = np.random.default_rng(2).integers(0, 4000, (3, 40, 30)).astype(np.uint16)  # a CYX stack
    write_pair(tmp_path / "val", "a", labels, image, photometric="minisblack", metadata={"axes": "CYX"})
    out = transform(channel_mode="first3")(PairedSource(tmp_path, "val")[0])
    assert out["image"].shape == (48, 48, 3)
    assert np.isnan(out["image"][40:]).all() and np.isnan(out["image"][:, 30:]).all()
    assert not np.isnan(out["image"][:40, :30]).any()
    np.testing.assert_array_equal(out["labels"][:40, :30], labels)
    assert out["labels"][40:].max() == 0 and out["target"][:, 30:].max() == 0
    with pytest.raises(ImageLoadError, match="cell_distance.eval_size to at least 40"):
        transform(canvas=32)(PairedSource(tmp_path, "val")[0])


def test_bad_pairs_are_named(tmp_path):
    labels = touching_pair((32, 32))
    write_pair(tmp_path / "train", "ok", labels)
    write_pair(tmp_path / "train", "float", labels.astype(np.float32) + 0.5, np.zeros((32, 32), np.uint16),
               mask_suffix=".tif")
    write_pair(tmp_path / "train", "small", labels, image=np.zeros((30, 32), np.uint16))
    src = PairedSource(tmp_path, "train")
    t = transform()
    by_name = {p.split("/")[-1]: i for i, p in enumerate(src.paths)}
    with pytest.raises(ImageLoadError, match="non-integer value 0.5"):
        t(src[by_name["float.tif"]], np.random.default_rng(0))
    with pytest.raises(ImageLoadError, match=r"mask size 32x32 \(WxH\) differs from its image's 32x30"):
        t(src[by_name["small.tif"]], np.random.default_rng(0))
    from jaxvit import tasks
    c = tiny_cell_config(tmp_path)
    c.data.skip_bad_images = False
    bad = "2 unreadable files.*float.tif: its mask .*masks/float.tif: non-integer value.*small.tif"
    with pytest.raises(DataError, match=bad):
        tasks.create(c).preflight(("train",), tmp_path / "preflight.json")
    (tmp_path / "train" / "masks" / "ok.png").unlink()
    with pytest.raises(DataError, match="1 of 3 images .* have no mask .* e.g. ok"):
        PairedSource(tmp_path, "train")


# ------------------------------------------------------------------------------------------- task

def tiny_cell_config(data_dir, **train):
    from helpers.tiny import tiny_config
    c = tiny_config(data_dir, "cell_distance", **train)
    c.model.overrides.update(num_registers=0)
    c.cell_distance.decoder_channels = (16, 8, 8, 8)
    c.cell_distance.eval_size, c.cell_distance.tile_overlap = 48, 16
    c.data.demo = "cells"
    c.eval.at_start = True
    c.eval.batch_size = 8
    return c


def test_tile_starts_cover_the_canvas():
    assert tile_starts(32, 32, 8) == [0]
    for length, tile, overlap in [(48, 32, 16), (100, 32, 8), (257, 64, 32)]:
        s = tile_starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))


def test_config_mistakes_are_named(tmp_path):
    from jaxvit import tasks
    from jaxvit.errors import ConfigError
    c = tiny_cell_config(tmp_path)
    c.eval.tta = ("hflip",)
    with pytest.raises(ConfigError, match="eval.tta"):
        tasks.create(c)
    c = tiny_cell_config(tmp_path)
    c.cell_distance.layers = (0, 1)  # two blocks, four decoder widths
    with pytest.raises(ConfigError, match="cell_distance.layers=\\(0, 1\\)"):
        tasks.create(c).build(jax.random.key(0))


@pytest.fixture(scope="module")
def cell_run(tmp_path_factory):
    """A tiny run on a small demo set (32 train / 8 val / 8 test sites of 48 px): 6 epochs of 4 steps, evaluated
    at the start, after 3 and 6 epochs, tested at the end. Returns (workdir, data_dir, config)."""
    from jaxvit.demos.cells import write_livecell
    from jaxvit.train import Trainer
    root = tmp_path_factory.mktemp("cell_run")
    write_livecell(root / "data", counts=(32, 8, 8), size=48)  # the demo set, smaller
    c = tiny_cell_config(root / "data", epochs=6)
    c.data.demo = ""
    c.eval.every_steps = 12  # at the start, half-way and at the end
    c.optim.lr = 1e-2
    Trainer(c, root / "run").run()
    return root / "run", root / "data", c


@pytest.mark.slow  # a Trainer run (~20 s of compilation): the fast tier keeps the maths, data and decoder shapes
def test_short_training_run_lowers_the_loss(cell_run):
    workdir, _, _ = cell_run
    with open(workdir / "training_history.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < 0.6 * float(rows[1]["train_loss"])  # last epoch vs first
    assert float(rows[-1]["val_loss"]) < 0.7 * float(rows[0]["val_loss"])  # vs the untrained model
    result = json.loads((workdir / "eval_test" / "test_results.json").read_text())
    assert {"ap50", "ap", "f1", "mean_iou", "mse"} <= set(result) and result["n_true"] > 0
    with open(workdir / "eval_test" / "test_per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


@pytest.mark.slow
def test_evaluate_and_predict(cell_run, tmp_path):
    from jaxvit import evaluate, run_io
    from jaxvit.predict import Predictor
    workdir, data_dir, _ = cell_run
    again = evaluate.main(["--workdir", str(workdir), "--split", "test", "--output_dir", str(tmp_path / "ev")])
    first = json.loads((workdir / "eval_test" / "test_results.json").read_text())
    assert again["ap50"] == pytest.approx(first["ap50"]) and again["mse"] == pytest.approx(first["mse"], rel=1e-5)

    run = run_io.load_run(workdir)
    fn = jax.jit(run.task.predict_fn(run.model))
    direct = lambda p: np.asarray(fn(run.variables, run.task.eval_transform()({"path": str(p)})["image"][None]))[0]
    # predict_files (jaxvit.predict's path for this task): multi-channel demo sites, a smaller grey image, a bad file
    src = PairedSource(data_dir, "test")
    inputs = tmp_path / "in"
    inputs.mkdir()
    grey = np.full((40, 44), 30, np.uint8)
    grey[5:20, 5:20] = 200
    Image.fromarray(grey).save(inputs / "grey.png")
    (inputs / "broken.png").write_bytes(b"not a png")
    paths = [src.paths[0], src.paths[1], inputs / "grey.png", inputs / "broken.png"]
    records = run.task.predict_files(run.model, run.variables, paths, tmp_path / "pred", batch_size=3)
    assert "error" in records[3] and all("error" not in r for r in records[:3])
    for p, r in zip(paths[:3], records):
        dist = np.asarray(Image.open(r["distance_map"])) / 65535
        labels = np.asarray(Image.open(r["labels"]))
        want = direct(p)
        assert dist.shape == labels.shape == want[want[:, 0] >= 0][:, want[0] >= 0].shape
        np.testing.assert_allclose(dist, want[:dist.shape[0], :dist.shape[1]], atol=1e-4)  # a 16-bit PNG
        assert labels.max() == r["cells"] and r["cells"] == run.task.segment(want).max()
    with open(tmp_path / "pred" / "predictions.csv") as f:
        assert [row["path"] for row in csv.DictReader(f)] == [str(p) for p in paths]

    # the Predictor API (8-bit RGB decoding): grey images give the same maps as the task's own decoding
    predictor = Predictor(run.model, run.variables, run.task, run.cfg.data, batch_size=2)
    result = predictor.predict(inputs / "grey.png")
    assert result["cells"] == run.task.segment(direct(inputs / "grey.png")).max() and result["height"] == 40
    outputs = np.stack(predictor.raw_outputs([inputs / "grey.png"]))
    run.task.write_predictions(tmp_path / "p.csv", [str(inputs / "grey.png")], outputs)
    saved = np.asarray(Image.open(tmp_path / "p_maps" / "grey_distance.png")) / 65535
    np.testing.assert_allclose(saved, direct(inputs / "grey.png")[:40, :44], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_frozen_and_lora_backbones_stay_put(cell_run, tmp_path, mode):
    from jaxvit import run_io, tasks
    from jaxvit.train import Trainer
    _, data_dir, base = cell_run
    c = base.copy_and_resolve_references()
    c.train.epochs, c.eval.every_steps, c.eval.at_start, c.eval.test_split = 1, 0, False, ""
    c.eval.test_checkpoint = "final"
    if mode == "frozen":
        c.train.freeze_backbone = True
    else:
        c.lora.enabled, c.lora.rank = True, 2
    Trainer(c, tmp_path / mode).run()
    _, init = tasks.create(c).build(jax.random.key(c.seed))
    trained = run_io.load_run(tmp_path / mode, "final").variables
    same = jax.tree_util.tree_map(np.array_equal, init["params"]["backbone"], trained["params"]["backbone"])
    assert all(jax.tree_util.tree_leaves(same))
    assert not np.allclose(init["params"]["head"]["out"]["kernel"], trained["params"]["head"]["out"]["kernel"])
    if mode == "lora":
        assert any(np.abs(b).max() > 0 for b in jax.tree_util.tree_leaves(trained["lora"]) if b.shape[0] == 2)


@pytest.mark.slow
def test_training_on_the_demo_renderer_beats_the_untrained_ap(tmp_path):
    """A small ViT from random init on 96 rendered 64 px sites with touching cells: AP@0.5 on whole validation
    images rises far above the untrained model's (measured 0.0 -> ~0.7 after 60 steps on an AMD EPYC machine,
    0.0 -> 0.36-0.38 on an Intel Xeon one, also from the unchanged main branch: to be looked into)."""
    from jaxvit.demos.cells import write_livecell
    from jaxvit.train import Trainer
    write_livecell(tmp_path / "data", counts=(96, 16, 8), size=64)
    c = tiny_cell_config(tmp_path / "data", epochs=12)
    c.data.demo, c.data.image_size, c.cell_distance.eval_size = "", 64, 64
    c.train.batch_size, c.eval.batch_size, c.eval.every_steps = 16, 16, 72
    c.model.overrides.update(hidden_size=64, depth=4, num_heads=4, mlp_hidden=128)
    c.cell_distance.decoder_channels = (32, 16, 16, 8)
    c.optim.lr = 1e-2
    Trainer(c, tmp_path / "run").run()
    with open(tmp_path / "run" / "training_history.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["val_ap50"]) < 0.05 and float(rows[-1]["val_ap50"]) > 0.3


@pytest.mark.slow
def test_an_ensemble_segments_the_mean_map_of_its_members(cell_run, tmp_path):
    """Dense outputs are reduced per batch (per-image counts), so an ensemble averages the members' maps inside each
    batch: the counts equal those of the mean map computed by hand; `evaluate` of a run with itself changes nothing."""
    from jaxvit import evaluate, inference, run_io
    workdir, _, _ = cell_run
    half, final = run_io.load_run(workdir, 12), run_io.load_run(workdir, "final")  # two different sets of weights
    task, src = final.task, final.task.source("test")
    mesh = inference.run_mesh(final.cfg)
    members = [(r.task, r.model, inference.place(r.variables, mesh, r.cfg)) for r in (half, final)]
    counts, ok = task.ensemble_outputs(members, src, mesh)
    assert ok.all()
    fn = jax.jit(task.predict_fn(final.model))
    for i in range(len(src)):
        ex = task.eval_transform()(src[i])
        maps = [np.asarray(fn(r.variables, ex["image"][None]))[0] for r in (half, final)]
        assert not np.allclose(maps[0], maps[1])
        np.testing.assert_allclose(counts[i], task.image_counts((maps[0] + maps[1]) / 2, ex["labels"], ex["target"]),
                                   rtol=1e-4, atol=1e-6)
    single = evaluate.evaluate_runs([workdir], "test", output_dir=tmp_path / "one")
    twice = evaluate.evaluate_runs([workdir, workdir], "test", output_dir=tmp_path / "two")
    for key in ("ap50", "ap", "f1", "mean_iou"):
        assert twice[key] == pytest.approx(single[key])
    assert len(twice["models"]) == 2 and (tmp_path / "two" / "test_per_image.csv").exists()
