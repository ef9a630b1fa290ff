"""Classification sources beyond folders (data.source): npz arrays, CSV of paths, tensorflow-datasets built on
disk by a real builder and read with tfds.data_source; the demo digits set; the messages for bad or absent data."""
from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from helpers.tiny import ROOT, tiny_config

from jaxvit import demos
from jaxvit.data import labelled
from jaxvit.data.sources import list_images
from jaxvit.data.transforms import RGBExample, TransformConfig
from jaxvit.errors import DataError, MissingDataError


def _data_cfg(source, data_dir, **kw):
    c = tiny_config(data_dir).data
    c.source = source
    for k, v in kw.items():
        c[k] = v
    return c


# ------------------------------------------------------------------------------------------- npz

def test_npz_source_reads_gray_and_rgb_arrays_and_reloads_in_workers(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 9, 7), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=gray, labels=np.array([0, 1, 2, 0, 1, 2]),
             class_names=np.array(["a", "b", "c"]))
    rgb = rng.integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", images=rgb, labels=np.array([2, 2, 1, 0]))
    cfg = _data_cfg("npz", tmp_path)
    train = labelled.open_split(cfg, "train")
    assert train.classes == ["a", "b", "c"] and train.class_counts().tolist() == [2, 2, 2]
    ex = train[4]
    assert ex["label"] == 1 and ex["image"].shape == (9, 7, 3)
    np.testing.assert_array_equal(ex["image"][..., 2], gray[4])  # grey replicated to RGB
    test = labelled.open_split(cfg, "test", train.classes)  # indices keep the train split's names
    assert test.labels.tolist() == [2, 2, 1, 0] and test.paths[1] == f"{tmp_path / 'test.npz'}#1"
    blob = pickle.dumps(test)  # what a grain worker receives: no pixels, read again there
    clone = pickle.loads(blob)
    assert rgb.tobytes() not in blob and clone._images is None
    np.testing.assert_array_equal(clone[3]["image"], rgb[3])
    out = RGBExample(TransformConfig(image_size=16, crop_ratio=1.0))(test[0])
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32 and int(out["label"]) == 2


@pytest.mark.parametrize("arrays,needle", [
    (dict(images=np.zeros((3, 4, 4), np.float32), labels=np.zeros(3, int)), "images are float32; store uint8"),
    (dict(images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2, int)), "N = 2"),
    (dict(images=np.zeros((3, 4, 4, 2), np.uint8), labels=np.zeros(3, int)), "[N, H, W, 3]"),
    (dict(pixels=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(3, int)), "arrays ['images'] missing"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 5]), class_names=np.array(["x", "y"])),
     "label 5 is not a class index in [0, 2)"),
])
def test_npz_mistakes_name_the_file_and_the_fix(tmp_path, arrays, needle):
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(DataError, match=None) as e:
        labelled.open_split(_data_cfg("npz", tmp_path), "train")
    assert needle in str(e.value) and str(tmp_path / "train.npz") in str(e.value)
    with pytest.raises(MissingDataError, match="val.npz' not found"):
        labelled.open_split(_data_cfg("npz", tmp_path), "val")


# ------------------------------------------------------------------------------------------- csv

def test_csv_of_paths_with_class_names(gz2_dir, tmp_path):
    train_dir = next(gz2_dir.glob("*_train"))
    files = list_images(train_dir / "spiral")[:2] + list_images(train_dir / "edge_on")[:3]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[str(p), "spiral"] for p in files[:2]] + [[str(p), "edge_on"] for p in files[2:]])
    (tmp_path / "val.csv").write_text(f"path,label\n{files[0]},merger\n")
    cfg = _data_cfg("csv", tmp_path)
    src = labelled.open_split(cfg, "train")
    assert src.classes == ["edge_on", "spiral"] and src.labels.tolist() == [1, 1, 0, 0, 0]
    assert src[0] == {"path": str(files[0]), "label": 1} and src.files
    with pytest.raises(DataError, match=r"labels \['merger'\] are not among the classes"):
        labelled.open_split(cfg, "val", src.classes)


# ------------------------------------------------------------------------------------------- tfds

@pytest.fixture(scope="module")
def tfds_dir(gz2_dir, tmp_path_factory):
    """The synthetic GZ2 images built into a tfds dataset by jaxvit's own preparation step (data.manual_dir)."""
    import tfds_folder_builder  # noqa: F401  registers the builder
    from jaxvit.data import tfds_source
    root = tmp_path_factory.mktemp("tfds")
    with pytest.raises(MissingDataError, match="tfds build jaxvit_test_folder --file_format=array_record"):
        tfds_source.prepare("jaxvit_test_folder", str(root))
    tfds_source.prepare("jaxvit_test_folder", str(root), manual_dir=str(gz2_dir))
    return root


def test_tfds_source_matches_the_image_files(tfds_dir, gz2_dir):
    import tfds_folder_builder
    from jaxvit.data.sources import ImageFolder, load_image
    cfg = _data_cfg("tfds:jaxvit_test_folder", "", tfds_data_dir=str(tfds_dir))
    src = labelled.open_split(cfg, "train")
    folder = ImageFolder(gz2_dir, "train", src.classes)  # the builder's ClassLabel order, not sorted names
    assert src.classes == list(tfds_folder_builder.CLASSES) and len(src) == len(folder) == 40
    assert sorted(src.labels.tolist()) == sorted(folder.labels.tolist())
    decoded = {load_image(p).tobytes(): int(y) for p, y in zip(folder.paths, folder.labels)}
    for i in (0, 17, 39):  # each example is one of the PNGs, pixel for pixel, with its label
        ex = pickle.loads(pickle.dumps(src))[i]
        assert ex["image"].dtype == np.uint8 and decoded[ex["image"].tobytes()] == ex["label"]
    part = labelled.open_split(cfg, "test[:5]", src.classes)
    assert len(part) == 5 and part.paths[0] == "tfds:jaxvit_test_folder/test[:5]#0"
    with pytest.raises(DataError, match="Unknown split 'holdout'"):
        labelled.open_split(cfg, "holdout")


@pytest.mark.integration
def test_training_end_to_end_on_a_tfds_dataset(tfds_dir, tmp_path):
    from jaxvit.train import Trainer
    c = tiny_config("", epochs=2)
    c.data.source, c.data.tfds_data_dir = "tfds:jaxvit_test_folder", str(tfds_dir)
    c.eval.test_split = "test[:10]"
    result = Trainer(c, tmp_path / "run").run()
    assert {"accuracy", "f1_macro", "loss"} <= set(result)
    out = tmp_path / "run" / "eval_test_10"
    rows = list(csv.DictReader((out / "test_10_predictions.csv").open()))
    assert len(rows) == 10 and rows[0]["path"].startswith("tfds:jaxvit_test_folder/test[:10]#")
    assert json.loads((tmp_path / "run" / "classes.json").read_text())[0] == "completely_round_smooth"


@pytest.mark.integration
def test_a_missing_tfds_dataset_is_one_line_with_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxvit.main", "--config=configs/cifar10_dinov2.py",
                           f"--workdir={tmp_path / 'w'}", f"--config.data.tfds_data_dir={tmp_path / 'none'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tfds dataset 'cifar10' is not prepared") and "tfds build cifar10" in last


# ------------------------------------------------------------------------------------------- demo digits

def test_demo_digits_are_real_stratified_npz_splits(tmp_path):
    demos.write("digits", tmp_path, seed=3)
    cfg = _data_cfg("npz", tmp_path)
    splits = {s: labelled.open_split(cfg, s) for s in ("train", "val", "test")}
    assert sum(len(s) for s in splits.values()) == 1797
    assert all(s.classes == [str(i) for i in range(10)] for s in splits.values())
    counts = splits["train"].class_counts()
    assert counts.min() >= 100 and splits["val"].class_counts().min() >= 30
    from sklearn.datasets import load_digits
    first = splits["test"][0]["image"][..., 0]
    assert any(np.array_equal(first, np.rint(d * 255 / 16).astype(np.uint8)) for d in load_digits().images)
