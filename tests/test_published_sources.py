"""Data as published: Hugging Face `datasets` (save_to_disk folders, the hub's parquet layout, the offline cache),
the CIFAR python archives, and validation held out of train (data.val_fraction)."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvit.config import base_config, problems
from jaxvit.data import holdout, labelled
from jaxvit.errors import ConfigError, DataError, MissingDataError

ROOT = Path(__file__).resolve().parents[1]
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(n, seed, size=12):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _data_cfg(source, data_dir="", **kw):
    c = base_config("classification").data
    c.source, c.data_dir = source, str(data_dir)
    c.update(kw)
    return c


def _hf_split(images, labels, image_column="img"):
    import datasets
    features = datasets.Features({image_column: datasets.Image(),
                                  "label": datasets.ClassLabel(names=CIFAR_NAMES)})
    return datasets.Dataset.from_dict({image_column: [Image.fromarray(x) for x in images], "label": labels},
                                      features=features)


@pytest.fixture(scope="module")
def cifar_like():
    return {"train": (_images(30, 0), [i % 10 for i in range(30)]), "test": (_images(12, 1), [3] * 6 + [7] * 6)}


def test_hf_save_to_disk_folder_with_slices_and_class_names(tmp_path, cifar_like):
    import datasets
    datasets.DatasetDict({s: _hf_split(*v) for s, v in cifar_like.items()}).save_to_disk(tmp_path / "cifar")
    cfg = _data_cfg(f"hf:{tmp_path / 'cifar'}")
    train = labelled.open_split(cfg, "train")
    assert train.classes == CIFAR_NAMES and len(train) == 30 and not train.files
    np.testing.assert_array_equal(train[4]["image"], cifar_like["train"][0][4])  # PNG round trip is lossless
    assert train[4]["label"] == 4
    part = labelled.open_split(cfg, "test[2:8]", train.classes)
    assert len(part) == 6 and part.labels.tolist() == [3] * 4 + [7] * 2
    np.testing.assert_array_equal(part[0]["image"], cifar_like["test"][0][2])
    with pytest.raises(MissingDataError, match="has no split 'validation'.*'test', 'train'"):
        labelled.open_split(cfg, "validation")


def test_hf_parquet_files_in_the_hub_layout_with_named_columns(tmp_path, cifar_like):
    # uoft-cs/cifar10 on the hub: plain_text/{train,test}-00000-of-00001.parquet with columns img, label
    for split, (x, y) in cifar_like.items():
        (tmp_path / "plain_text").mkdir(exist_ok=True)
        _hf_split(x, y).to_parquet(str(tmp_path / "plain_text" / f"{split}-00000-of-00001.parquet"))
    cfg = _data_cfg(f"hf:{tmp_path}", hf_image_column="img", hf_label_column="label")
    test = labelled.open_split(cfg, "test[:5]")
    assert test.classes == CIFAR_NAMES and len(test) == 5
    np.testing.assert_array_equal(test[1]["image"], cifar_like["test"][0][1])
    with pytest.raises(ConfigError, match="data.hf_image_column='image' is not a column.*'img'"):
        labelled.open_split(_data_cfg(f"hf:{tmp_path}", hf_image_column="image"), "test")


def test_hf_hub_id_offline_without_a_cache_says_both_ways(tmp_path):
    # a fresh process: datasets reads HF_HUB_OFFLINE when it is imported
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = ("from jaxvit.config import base_config; from jaxvit.data import labelled; c = base_config().data; "
            "c.source = 'hf:uoft-cs/cifar10'; labelled.open_split(c, 'train')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and message.startswith("jaxvit.errors.MissingDataError")
    assert "hf:uoft-cs/cifar10" in message and "HF_TOKEN" in message and "save_to_disk" in message


CIFAR_CARD = """---
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
  default: true
---
# CIFAR-10 (a copy written by the test)
"""


def _hub_cache_download(hub_cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """Files of a data set repo as a hub download leaves them: blobs/<sha256>, snapshots/<revision>/<path> linking
    to its blob, refs/main naming the revision. Returns the snapshot folder."""
    import hashlib
    root = hub_cache / f"datasets--{repo.replace('/', '--')}"
    revision = hashlib.sha1(repo.encode()).hexdigest()  # a commit hash
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    (root / "blobs").mkdir()
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / revision


@pytest.mark.slow  # trains a tiny ViT in a subprocess
def test_hf_hub_id_offline_from_the_hub_cache_of_a_download(tmp_path, cifar_like):
    """`hf download uoft-cs/cifar10 --repo-type dataset` (or any hub download) fills HF_HUB_CACHE only; datasets
    5.x offline reads only its own Arrow cache, so jaxvit falls back to the hub cache's snapshot of the repo:
    with HF_HUB_OFFLINE=1 a run trains and tests on `hf:uoft-cs/cifar10`."""
    files = {"README.md": CIFAR_CARD.encode()}
    for split, (x, y) in cifar_like.items():
        buffer = io.BytesIO()
        _hf_split(x, y).to_parquet(buffer)
        files[f"plain_text/{split}-00000-of-00001.parquet"] = buffer.getvalue()
    _hub_cache_download(tmp_path / "hf" / "hub", "uoft-cs/cifar10", files)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # a tiny run trained and tested offline on hf:uoft-cs/cifar10 (validation test[:6], test test[6:])
    from helpers.tiny import TINY_VIT
    train = [sys.executable, "-m", "jaxvit.main", "--config=configs/gz2_lora.py:demo", f"--workdir={tmp_path / 'w'}",
             "--config.data.demo=", "--config.data.source=hf:uoft-cs/cifar10", "--config.data.image_size=16",
             "--config.data.num_workers=0", "--config.train.batch_size=8", "--config.eval.batch_size=8",
             "--config.train.epochs=1", "--config.eval.val_split=test[:6]", "--config.eval.test_split=test[6:]",
             *[f"--config.model.overrides.{k}={v}" for k, v in TINY_VIT.items()]]
    proc = subprocess.run(train, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "w" / "eval_test_6" / "test_6_results.json").read_text())  # test[6:]
    assert result["num_samples"] == 6 and 0.0 <= result["accuracy"] <= 1.0
    assert json.loads((tmp_path / "w" / "classes.json").read_text()) == CIFAR_NAMES
    # the repo's config by name: the rows of a slice, their labels and pixels
    code = ("import sys; from jaxvit.config import base_config; from jaxvit.data import labelled; "
            "c = base_config().data; c.source = sys.argv[1]; s = labelled.open_split(c, 'test[2:8]'); "
            "print(len(s), s.classes[3], s.labels.tolist(), int(s[0]['image'].sum()))")
    proc = subprocess.run([sys.executable, "-c", code, "hf:uoft-cs/cifar10:plain_text"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = f"6 cat {[3] * 4 + [7] * 2} {int(cifar_like['test'][0][2].sum())}"
    assert proc.stdout.strip().splitlines()[-1] == expected


def _cifar_archive(path, train_batches, test, names=CIFAR_NAMES):
    def member(tar, name, obj):
        data = pickle.dumps(obj)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def batch(images, labels):  # the archive's layout: rows of 3072 bytes, channel-major (R plane, G, B)
        return {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": list(labels)}

    with tarfile.open(path, "w:gz") as tar:
        for i, (x, y) in enumerate(train_batches, 1):
            member(tar, f"data_batch_{i}", batch(x, y))
        member(tar, "test_batch", batch(*test))
        member(tar, "batches.meta", {b"label_names": [n.encode() for n in names]})


def test_cifar_python_archive_as_downloaded(tmp_path):
    train = [(_images(4, i, 32), [(i + k) % 10 for k in range(4)]) for i in range(5)]
    test = (_images(6, 9, 32), [1, 2, 3, 4, 5, 6])
    _cifar_archive(tmp_path / "cifar-10-python.tar.gz", train, test)
    cfg = _data_cfg("cifar_python", tmp_path)
    src = labelled.open_split(cfg, "train")
    assert len(src) == 20 and src.classes == CIFAR_NAMES
    np.testing.assert_array_equal(src[5]["image"], train[1][0][1])
    assert src[5]["label"] == 2
    reloaded = pickle.loads(pickle.dumps(src))  # as a grain worker gets it: the arrays are read again
    np.testing.assert_array_equal(reloaded[19]["image"], train[4][0][3])
    assert labelled.open_split(cfg, "test[-2:]").labels.tolist() == [5, 6]
    with pytest.raises(MissingDataError, match="val_fraction"):
        labelled.open_split(cfg, "val")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:  # the unpacked folder reads the same
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = labelled.open_split(_data_cfg("cifar_python", tmp_path / "unpacked"), "train")
    np.testing.assert_array_equal(folder[7]["image"], src[7]["image"])


def test_cifar_archive_that_is_not_the_original_names_the_member(tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="no member cifar-10-batches-py/data_batch_1"):
        labelled.open_split(_data_cfg("cifar_python", tmp_path), "train")
    with pytest.raises(MissingDataError, match="no cifar-10-python.tar.gz"):
        labelled.open_split(_data_cfg("cifar_python", tmp_path / "nowhere"), "train")


def test_val_fraction_holds_out_the_same_examples_whatever_the_order(tmp_path):
    train = [(_images(40, i, 32), [k % 10 for k in range(40)]) for i in range(5)]
    _cifar_archive(tmp_path / "cifar-10-python.tar.gz", train, (_images(2, 9, 32), [0, 1]))
    cfg = _data_cfg("cifar_python", tmp_path, val_fraction=0.1)
    tr, val = labelled.open_split(cfg, "train"), labelled.open_split(cfg, "val")
    assert len(tr) + len(val) == 200 and not set(tr.paths) & set(val.paths)
    assert 8 <= len(val) <= 35  # ~10 % of 200
    np.testing.assert_array_equal(val[0]["image"], labelled.open_split(_data_cfg("cifar_python", tmp_path),
                                                                       "train")[val._rows[0]]["image"])
    ids = [f"img_{i}.png" for i in range(1000)]
    chosen = {s for s, v in zip(ids, holdout.held_out(ids, 0.2)) if v}
    shuffled = ids[::-1] + ["new.png"]
    assert chosen == {s for s, v in zip(shuffled, holdout.held_out(shuffled, 0.2)) if v} - {"new.png"}
    assert 150 < len(chosen) < 250


def test_val_fraction_needs_the_val_split_name():
    c = base_config("classification")
    c.data.data_dir, c.data.val_fraction, c.eval.val_split = "/data", 0.1, "validation"
    assert any("eval.val_split='val'" in p for p in problems(c))
    c.data.val_fraction = 1.5
    assert any("data.val_fraction" in p for p in problems(c))
