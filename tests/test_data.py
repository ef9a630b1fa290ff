"""Data sources, transforms and grain pipelines on real image files written to tmp_path."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvit.data import pipeline, sources, transforms
from jaxvit.data.sources import ImageFolder, ImageLoadError, load_image
from jaxvit.errors import DataError, MissingDataError

MEAN, STD = np.array(transforms.IMAGENET_MEAN), np.array(transforms.IMAGENET_STD)
COUNTS = {"edge_on": 4, "elliptical": 24, "spiral": 8}  # deliberately imbalanced, n = 36


# ----------------------------------------------------------------------------- fixtures


def _write_id_image(path: Path, uid: int, size: int) -> None:
    """Constant-colour image whose red channel encodes `uid` (4 * uid)."""
    arr = np.empty((size, size, 3), np.uint8)
    arr[...] = (4 * uid, 255 - 4 * uid, 128)
    Image.fromarray(arr).save(path)


def make_id_dataset(root: Path, splits=("train",), prefix="gz2_5class_") -> Path:
    """Square constant-colour PNGs (16-40 px); file name `<uid>.png`, uid unique per split."""
    for split in splits:
        uid = 0
        for cls, n in COUNTS.items():
            d = root / f"{prefix}{split}" / cls
            d.mkdir(parents=True)
            for _ in range(n):
                _write_id_image(d / f"{uid:03d}.png", uid, 16 + (uid % 4) * 8)
                uid += 1
    return root


def write_corrupt(path: Path) -> None:
    """A PNG truncated to half its bytes."""
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def plain_cfg(image_size: int = 16, **overrides):
    """Config with all augmentation off, so images keep their identifying colour."""
    cfg = pipeline.default_data_config()
    cfg.image_size = image_size
    cfg.num_workers = 0
    cfg.prefetch = 1
    cfg.aug.crop_scale = (1.0, 1.0)
    cfg.aug.crop_ratio = (1.0, 1.0)
    cfg.aug.hflip = cfg.aug.vflip = cfg.aug.rot90 = False
    cfg.aug.rotate_degrees = 0.0
    cfg.aug.color_jitter = (0.0, 0.0, 0.0, 0.0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def rgb(cfg) -> transforms.RGBExample:
    """The decoding transform of a data config (what the classification task hands the pipeline)."""
    return transforms.RGBExample(transforms.TransformConfig.from_config(cfg))


def decode_ids(images: np.ndarray) -> np.ndarray:
    red = images[..., 0].mean(axis=(1, 2)) * STD[0] + MEAN[0]
    return np.rint(red * 255 / 4).astype(int)


def uid_to_index(src: ImageFolder) -> dict[int, int]:
    return {int(Path(p).stem): i for i, p in enumerate(src.paths)}


def take(it, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture
def id_root(tmp_path: Path) -> Path:
    return make_id_dataset(tmp_path / "data")


# ----------------------------------------------------------------------------- sources


def test_find_split_dir_layouts(tmp_path: Path):
    (tmp_path / "a" / "gz2_5class_train").mkdir(parents=True)
    (tmp_path / "b" / "val").mkdir(parents=True)
    assert sources.find_split_dir(tmp_path / "a", "train").name == "gz2_5class_train"
    assert sources.find_split_dir(tmp_path / "b", "val").name == "val"
    with pytest.raises(MissingDataError, match=r"'test'.*gz2_5class_train"):
        sources.find_split_dir(tmp_path / "a", "test")
    with pytest.raises(MissingDataError, match="does not exist"):
        sources.find_split_dir(tmp_path / "missing", "train")


def test_image_folder_listing(tmp_path: Path):
    root = tmp_path / "d"
    for cls in ("b_cls", "a_cls"):
        (root / "train" / cls / "nested").mkdir(parents=True)
    img = Image.new("RGB", (8, 8))
    img.save(root / "train" / "a_cls" / "x.PNG")
    img.save(root / "train" / "a_cls" / "nested" / "y.JpEg", format="JPEG")
    img.save(root / "train" / "b_cls" / "z.webp")
    (root / "train" / "b_cls" / "notes.txt").write_text("not an image")
    (root / "train" / ".cache").mkdir()  # hidden: ignored
    src = ImageFolder(root, "train")
    assert src.classes == ["a_cls", "b_cls"]
    assert len(src) == 3 and src.labels.dtype == np.int32
    assert [Path(p).name for p in src.paths] == ["y.JpEg", "x.PNG", "z.webp"]
    assert src.labels.tolist() == [0, 0, 1]
    assert src[2] == {"path": src.paths[2], "label": 1}
    reordered = ImageFolder(root, "train", classes=["b_cls", "a_cls"])
    assert {Path(p).name: int(l) for p, l in zip(reordered.paths, reordered.labels)} == {
        "z.webp": 0, "y.JpEg": 1, "x.PNG": 1}
    with pytest.raises(DataError, match="missing.*c_cls"):
        ImageFolder(root, "train", classes=["a_cls", "b_cls", "c_cls"])
    with pytest.raises(DataError, match="unexpected.*b_cls"):
        ImageFolder(root, "train", classes=["a_cls"])


def _save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_load_image_conversions(tmp_path: Path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 250, 100, 10
    out = load_image(_save(tmp_path / "rgb.png", Image.fromarray(rgb)))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    jpg = load_image(_save(tmp_path / "rgb.jpg", Image.fromarray(rgb), quality=95))
    assert np.abs(jpg.astype(int) - rgb).max() <= 3

    # 16-bit grayscale PNG: the full 16-bit range is divided by 257.
    g16 = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)
    img16 = Image.fromarray(g16)
    assert img16.mode == "I;16"
    out = load_image(_save(tmp_path / "g16.png", img16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.arange(256).reshape(16, 16))
    assert (out[..., 0] == out[..., 2]).all()
    # 16-bit container holding 8-bit values: kept as is.
    small = Image.fromarray(np.full((8, 8), 200, np.uint16))
    assert (load_image(_save(tmp_path / "small16.png", small)) == 200).all()
    # 32-bit integer TIFF with negative values: min-max stretched.
    i32 = Image.fromarray(np.array([[-1000, 0], [500, 3000]], np.int32))
    out = load_image(_save(tmp_path / "i32.tif", i32))[..., 0]
    assert out.min() == 0 and out.max() == 255 and out[0, 1] == round(1000 * 255 / 4000)
    # float TIFF in [0, 1] is multiplied by 255.
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32))
    assert load_image(_save(tmp_path / "f.tif", f))[..., 1].tolist() == [[0, 128], [255, 64]]

    gray = load_image(_save(tmp_path / "g.png", Image.fromarray(np.full((9, 7), 77, np.uint8))))
    assert gray.shape == (9, 7, 3) and (gray == 77).all()
    bw = load_image(_save(tmp_path / "bw.bmp", Image.new("1", (5, 5), 1)))
    assert (bw == 255).all()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(load_image(_save(tmp_path / "p.png", pal)), rgb)

    # Alpha is composited on black.
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :2, 3] = 255
    rgba[:, 2, 3] = 128
    out = load_image(_save(tmp_path / "rgba.png", Image.fromarray(rgba)))
    assert (out[:, :2] == 200).all() and (out[:, 3] == 0).all()
    assert np.abs(out[:, 2].astype(int) - 100).max() <= 1
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    np.testing.assert_array_equal(load_image(_save(tmp_path / "la.png", la)), out)

    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = load_image(_save(tmp_path / "cmyk.jpg", cmyk, quality=95))
    assert out.shape == (20, 30, 3) and np.abs(out.astype(int) - rgb).max() <= 8

    # Multi-page TIFF: frame 0.
    frames = [Image.new("RGB", (10, 6), c) for c in [(10, 20, 30), (200, 0, 0), (0, 200, 0)]]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    assert out.shape == (6, 10, 3) and (out == [10, 20, 30]).all()


def test_load_image_draft_decodes_jpegs_at_the_smallest_covering_scale(tmp_path: Path):
    yy, xx = np.mgrid[:400, :800]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    full = load_image(tmp_path / "a.jpg")
    assert full.shape == (400, 800, 3)
    assert load_image(tmp_path / "a.jpg", (300, 150)).shape == (200, 400, 3)  # 1/2: 1/4 would be under 150 rows
    assert load_image(tmp_path / "a.jpg", (100, 50)).shape == (50, 100, 3)  # 1/8
    assert load_image(tmp_path / "a.jpg", (801, 10)).shape == (400, 800, 3)  # never below the request
    assert load_image(tmp_path / "a.png", (100, 50)).shape == (400, 800, 3)  # other formats: in full
    half = np.asarray(Image.fromarray(full).resize((400, 200), Image.Resampling.BOX), np.float32)
    assert np.abs(load_image(tmp_path / "a.jpg", (300, 150)) - half).mean() < 4  # close to a full decode, resized
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotated 90 degrees)
    Image.fromarray(pixels).save(tmp_path / "r.jpg", quality=95, exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (800, 400, 3)
    assert load_image(tmp_path / "r.jpg", (150, 300)).shape == (400, 200, 3)  # the request is after orientation


def test_load_image_failures(tmp_path: Path):
    bad = tmp_path / "trunc.png"
    write_corrupt(bad)
    with pytest.raises(ImageLoadError) as e:
        load_image(bad)
    assert e.value.path == str(bad) and str(bad) in str(e.value)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageLoadError, match="junk.jpg"):
        load_image(junk)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_scan(tmp_path: Path):
    root = make_id_dataset(tmp_path / "d", splits=("train", "val"))
    corrupt = root / "gz2_5class_val" / "spiral" / "zz_broken.png"
    write_corrupt(corrupt)
    report = sources.scan(root, splits=("train", "val"), workers=2)
    assert report.classes == ["edge_on", "elliptical", "spiral"]
    assert report.counts["train"] == COUNTS
    assert report.counts["val"] == {**COUNTS, "spiral": COUNTS["spiral"] + 1}
    assert [p for p, _ in report.unreadable] == [str(corrupt)] and not report.ok
    text = report.summary()
    assert "spiral" in text and str(corrupt) in text and "37" in text
    # Header-only scanning does not decode, so the truncated file passes.
    assert sources.scan(root, splits=("train", "val"), decode=False).ok

    with pytest.raises(MissingDataError, match="test"):
        sources.scan(root, splits=("train", "test"))
    (root / "gz2_5class_val" / "irregular").mkdir()
    with pytest.raises(DataError, match="irregular"):
        sources.scan(root, splits=("train", "val"))
    empty = tmp_path / "e"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        sources.scan(empty, splits=("train",))


# ----------------------------------------------------------------------------- transforms


def test_transforms():
    cfg = transforms.TransformConfig.from_config(pipeline.default_data_config())
    cfg = dataclasses.replace(cfg, image_size=32, erasing_prob=1.0,
                              color_jitter=(0.3, 0.3, 0.3, 0.1))
    image = np.random.default_rng(0).integers(0, 256, (40, 28, 3), dtype=np.uint8)
    a = transforms.train_transform(image, cfg, np.random.default_rng(1))
    b = transforms.train_transform(image, cfg, np.random.default_rng(1))
    c = transforms.train_transform(image, cfg, np.random.default_rng(2))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a == 0).all(axis=-1).any()  # erased rectangle
    assert np.isfinite(a).all() and np.abs(a).max() < 3.0

    # Rotation fills corners with black; centre keeps the colour.
    white = np.full((64, 64, 3), 255, np.uint8)
    rot = transforms.rotated_resized_crop(Image.fromarray(white), 45, 32, (1, 1), (1, 1), np.random.default_rng(3))
    rot = np.asarray(rot)
    assert (rot[0, 0] == 0).all() and (rot[16, 16] == 255).all()

    # Eval: shorter side -> round(32 / 0.8) = 40, then the centre 32x32.
    ramp = np.broadcast_to(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (40, 80, 3)).copy()
    ev_cfg = transforms.TransformConfig(image_size=32, crop_ratio=0.8)
    out = transforms.eval_transform(ramp, ev_cfg)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    pixels = (out * STD + MEAN) * 255
    np.testing.assert_allclose(pixels[5, :, 0], np.arange(24, 56) * 3, atol=1e-3)
    const = transforms.eval_transform(np.full((20, 30, 3), 128, np.uint8), ev_cfg)
    np.testing.assert_allclose(const[0, 0], (128 / 255 - MEAN) / STD, rtol=1e-5)


def test_hue_moves_the_hsv_hue_channel_by_whole_steps():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8))
    hsv = np.asarray(img.convert("HSV")).astype(int)
    for shift in (-0.5, -0.1, -0.02, 0.0, 0.013, 0.1, 0.5):
        moved = hsv.copy()
        moved[..., 0] = (moved[..., 0] + round(shift * 255)) % 256
        expected = np.asarray(Image.fromarray(moved.astype(np.uint8), "HSV").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(transforms.adjust_hue(img, shift)), expected)


def test_rotation_and_crop_in_one_resampling_are_close_to_the_two_step_path():
    """`rotated_resized_crop` (one resampling at the output's size) against the rotation at the source's size then
    the crop, with the same angle and box, on galaxies: the same geometry, pixels within a few levels."""
    from jaxvit.demos.gz2 import CLASSES, render_galaxy
    rng = np.random.default_rng(0)
    for k, cls in enumerate(CLASSES[:3]):
        img = Image.fromarray(render_galaxy(cls, rng, 256))
        angle = float(rng.uniform(-180, 180))
        rotated = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        old = np.asarray(transforms.random_resized_crop(rotated, 128, (0.5, 1.0), (0.8, 1.25),
                                                        np.random.default_rng(k))).astype(int)
        new = np.asarray(transforms.rotated_resized_crop(img, angle, 128, (0.5, 1.0), (0.8, 1.25),
                                                         np.random.default_rng(k))).astype(int)
        diff = np.abs(old - new)
        assert diff.mean() < 4 and np.percentile(diff, 99) < 20, (cls, diff.mean(), np.percentile(diff, 99))
        assert ((old.max(-1) == 0) != (new.max(-1) == 0)).mean() < 0.01  # the black corners in the same place


def test_rgb_example_decodes_then_transforms(tmp_path: Path):
    """The transform the pipeline calls: a source example {"path", ...} -> {"image", other fields as arrays}."""
    path = _save(tmp_path / "x.png", Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (40, 28, 3), dtype=np.uint8)))
    cfg = transforms.TransformConfig(image_size=16)
    t = transforms.RGBExample(cfg)
    example = {"path": str(path), "label": 3, "targets": [0.5, 2.0]}
    train = t(example, np.random.default_rng(1))
    np.testing.assert_array_equal(
        train["image"], transforms.train_transform(load_image(path), cfg, np.random.default_rng(1)))
    ev = t(example)
    np.testing.assert_array_equal(ev["image"], transforms.eval_transform(load_image(path), cfg))
    assert set(ev) == {"image", "label", "targets"}
    assert ev["label"] == 3 and ev["label"].dtype == np.int32
    assert ev["targets"].dtype == np.float32 and ev["targets"].tolist() == [0.5, 2.0]
    with pytest.raises(ImageLoadError, match="gone.png"):
        t({"path": str(tmp_path / "gone.png"), "label": 0})


# ----------------------------------------------------------------------------- train pipeline


def test_train_shapes_and_determinism(id_root: Path):
    src = ImageFolder(id_root, "train")
    cfg = pipeline.default_data_config()
    cfg.image_size, cfg.num_workers = 32, 0
    it = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=8, seed=3, process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["bad"].dtype == np.int32 and not batch["bad"].any()
    again = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=8, seed=3, process_index=0,
                                    process_count=1)
    assert_batches_equal([batch] + take(it, 2), take(again, 3))
    other = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=8, seed=4, process_index=0,
                                    process_count=1)
    assert not np.array_equal(next(other)["image"], batch["image"])
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=7, seed=0, process_index=0, process_count=2)
    with pytest.raises(DataError, match="36 examples, fewer than train.batch_size=64"):
        pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=64, seed=0, process_index=0,
                                process_count=1)


def test_train_epochs_cover_and_reshuffle(id_root: Path):
    src = ImageFolder(id_root, "train")
    lookup = uid_to_index(src)
    spe = pipeline.steps_per_epoch(len(src), 10)
    assert spe == 3  # 36 // 10: the remainder (6) is dropped each epoch
    cfg = plain_cfg()
    it = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=10, seed=0, process_index=0,
                                 process_count=1)
    epochs = []
    for _ in range(3):
        batches = take(it, spe)
        uids = np.concatenate([decode_ids(b["image"]) for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        idx = np.array([lookup[u] for u in uids])
        np.testing.assert_array_equal(src.labels[idx], labels)
        assert len(set(idx.tolist())) == spe * 10  # no repeats within an epoch
        epochs.append(idx)
    assert it.epoch == 3 and it.step == 9
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_train_resume_in_process(id_root: Path):
    src = ImageFolder(id_root, "train")
    cfg = pipeline.default_data_config()
    cfg.image_size, cfg.num_workers, cfg.prefetch = 16, 0, 2

    def make():
        return pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=8, seed=11, process_index=0,
                                       process_count=1)

    it = make()
    take(it, 3)
    state = it.get_state()
    rest = take(it, 5)  # crosses the epoch boundary (4 steps per epoch)
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), rest)


def test_train_workers_match_and_resume(id_root: Path):
    """Worker processes give the same batches as in-process; state moves between worker counts."""
    src = ImageFolder(id_root, "train")
    cfg = pipeline.default_data_config()
    cfg.image_size, cfg.num_workers = 16, 0

    def make(workers: int):
        cfg.num_workers = workers
        return pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=8, seed=5, process_index=0,
                                       process_count=1)

    reference = take(make(0), 7)
    it = make(2)
    first = take(it, 3)
    state = it.get_state()
    it.close()
    resumed = make(1)
    resumed.set_state(state)
    rest = take(resumed, 4)
    resumed.close()
    assert_batches_equal(first + rest, reference)


def test_train_orbax_checkpoint(id_root: Path, tmp_path: Path):
    import orbax.checkpoint as ocp

    src = ImageFolder(id_root, "train")
    cfg = plain_cfg()

    def make():
        return pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=6, seed=2, process_index=0,
                                       process_count=1)

    it = make()
    take(it, 4)
    expected = take(make(), 6)[4:]
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(
            params=ocp.args.StandardSave({"w": np.arange(3.0)}),
            data_iter=pipeline.iterator_save_args(it)))
        mngr.wait_until_finished()
    fresh = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(4, args=ocp.args.Composite(
            params=ocp.args.StandardRestore({"w": np.zeros(3)}),
            data_iter=pipeline.iterator_restore_args(fresh)))
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))
    assert restored["data_iter"] is fresh and fresh.step == 4
    assert_batches_equal(take(fresh, 2), expected)


def test_train_process_shards(id_root: Path):
    src = ImageFolder(id_root, "train")
    lookup = uid_to_index(src)
    cfg = plain_cfg()
    whole = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=12, seed=9, process_index=0,
                                    process_count=1)
    shards = [pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=12, seed=9, process_index=p,
                                      process_count=2) for p in (0, 1)]
    seen = []
    for _ in range(3):  # one epoch
        full = decode_ids(next(whole)["image"])
        parts = [decode_ids(next(s)["image"]) for s in shards]
        assert all(len(p) == 6 for p in parts)
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), full)
        seen.extend(lookup[u] for p in parts for u in p)
    assert sorted(seen) == list(range(36))


def test_train_bad_image_replaced(tmp_path: Path, caplog):
    root = make_id_dataset(tmp_path / "d")
    corrupt = root / "gz2_5class_train" / "spiral" / "999.png"
    write_corrupt(corrupt)
    src = ImageFolder(root, "train")
    assert len(src) == 37
    cfg = plain_cfg()
    it = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=37, seed=0, process_index=0,
                                 process_count=1)
    with caplog.at_level(logging.WARNING):
        batches = take(it, 2)  # two epochs, each contains every file once
    lookup = uid_to_index(src)
    for b in batches:
        assert b["bad"].sum() == 1
        (replaced,) = decode_ids(b["image"])[b["bad"] == 1]
        assert replaced in lookup and lookup[replaced] != src.paths.index(str(corrupt))  # a real image ...
        assert b["label"][b["bad"] == 1] == src.labels[lookup[replaced]]  # ... with its own label
    assert it.bad_count == 2 and it.get_state()["bad_count"] == 2
    assert str(corrupt) in caplog.text
    assert "replacing unreadable training example" in caplog.text
    assert_batches_equal(batches, take(pipeline.train_iterator(
        src, rgb(cfg), cfg, global_batch=37, seed=0, process_index=0, process_count=1), 2))

    strict_cfg = plain_cfg(skip_bad_images=False)
    strict = pipeline.train_iterator(src, rgb(strict_cfg), strict_cfg, global_batch=37,
                                     seed=0, process_index=0, process_count=1)
    with pytest.raises(ImageLoadError, match="999.png"):
        next(strict)


def test_class_balanced_sampling(id_root: Path):
    src = ImageFolder(id_root, "train")

    def label_fractions(balanced: bool) -> np.ndarray:
        cfg = plain_cfg(image_size=8, class_balanced=balanced)
        it = pipeline.train_iterator(src, rgb(cfg), cfg, global_batch=36, seed=1, process_index=0,
                                     process_count=1)
        labels = np.concatenate([b["label"] for b in take(it, 12)])
        return np.bincount(labels, minlength=3) / len(labels)

    balanced = label_fractions(True)
    np.testing.assert_allclose(balanced, 1 / 3, atol=0.08)
    np.testing.assert_allclose(label_fractions(False), np.array([4, 24, 8]) / 36)
    np.testing.assert_array_equal(balanced, label_fractions(True))  # deterministic


# ----------------------------------------------------------------------------- eval pipeline


def test_eval_covers_each_index_once(tmp_path: Path, caplog):
    root = make_id_dataset(tmp_path / "d", splits=("val",), prefix="")
    corrupt = root / "val" / "spiral" / "999.png"
    write_corrupt(corrupt)
    src = ImageFolder(root, "val")
    lookup = uid_to_index(src)
    n = len(src)  # 37 = 4 full global batches of 8 + 5
    cfg = plain_cfg(image_size=16)
    assert pipeline.eval_steps(n, 8) == 5
    bad_index = src.paths.index(str(corrupt))
    seen = []
    with caplog.at_level(logging.WARNING):
        for p in (0, 1):
            batches = list(pipeline.eval_iterator(src, rgb(cfg), cfg, global_batch=8, process_index=p,
                                                  process_count=2))
            assert len(batches) == 5
            for b in batches:
                assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
                assert b["mask"].dtype == np.bool_ and b["index"].dtype == np.int32
                assert b["label"].dtype == np.int32
                good = b["mask"]
                np.testing.assert_array_equal(good, b["index"] >= 0)
                seen.extend(b["index"][good].tolist())
                np.testing.assert_array_equal(b["label"][good], src.labels[b["index"][good]])
                ids = decode_ids(b["image"][good])
                np.testing.assert_array_equal([lookup[u] for u in ids], b["index"][good])
                # padding and unreadable rows: zeros shaped like a real example
                assert not b["image"][~good].any() and not b["label"][~good].any()
    assert sorted(seen) == [i for i in range(n) if i != bad_index]  # every readable example exactly once
    assert str(corrupt) in caplog.text and "skipping unreadable eval example" in caplog.text
    # In dataset order; the unreadable file is a row like padding (mask False, index -1) in its place.
    all_batches = list(pipeline.eval_iterator(src, rgb(cfg), cfg, global_batch=8, process_index=0,
                                              process_count=1))
    index = np.concatenate([b["index"] for b in all_batches])
    mask = np.concatenate([b["mask"] for b in all_batches])
    assert index.tolist() == [i if i != bad_index else -1 for i in range(n)] + [-1] * 3
    assert mask.sum() == n - 1 and not mask[bad_index]


class _SlowSource:
    """Any random-access source works: 64 examples of one float field."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"x": float(i)}


def _slow_transform(example: dict, rng: np.random.Generator) -> dict:
    time.sleep(0.01)  # 10 ms per example, one example at a time: at most 100 examples/s
    return {"x": np.float32(example["x"] + rng.random())}


def test_measure_throughput_counts_examples_per_second():
    cfg = plain_cfg(prefetch=1)  # one thread: examples are made one after the other
    rate = pipeline.measure_throughput(_SlowSource(), _slow_transform, cfg, n_batches=4, global_batch=8)
    # <= 100 examples/s (4 / 3 of it if one batch was prepared ahead during the warm-up), far above the
    # 12.5 batches/s a per-batch rate would give.
    assert 40 < rate < 4 / 3 * 100 + 5
