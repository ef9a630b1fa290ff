"""The CSIRO biomass project as downloaded from Kaggle: train.csv with folds, the unlabelled test.csv predicted by
the folds' mean into submission.csv; the original's flags (stage-2 epochs, an absolute backbone lr, presence heads,
no SmoothL1) and the loss components in the history."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers.tiny import tiny_config

from jaxvit import cv, optim, tasks, train
from jaxvit.tasks.biomass import maths as biomass
from jaxvit.demos import pasture as syn
from jaxvit.errors import DataError


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("csiro")
    return syn.write_dataset(root, per_split={"train": 48, "test": 12}, size=(64, 32), seed=0, hidden_test=True)


def _config(data_dir, **biomass_keys):
    c = tiny_config(data_dir, task="biomass", epochs=2)
    c.data.aug.color_jitter_prob = 0.0
    c.model.pool = "cls_mean"
    c.eval.val_split, c.eval.test_split = "val", ""
    c.cv.n_folds, c.cv.predict_split = 3, "test"
    c.biomass.update(biomass_keys)
    return c


def test_the_kaggle_files_are_in_the_competitions_layout(kaggle_dir):
    header = (kaggle_dir / "test.csv").read_text().splitlines()[0]
    assert header == "sample_id,image_path,target_name" and not (kaggle_dir / "val.csv").exists()
    task = tasks.create(_config(kaggle_dir))
    test = task.source("test")
    assert not test.labelled and len(test) == 12 and np.isnan(test.targets).all()
    assert set(test.sample_ids[0]) == set(biomass.TARGETS)
    with pytest.raises(DataError, match="has no targets .*predict it"):
        task.score(np.zeros((12, 5)), np.ones(12, bool), test)


def test_stratified_folds_spread_each_stratum_and_balance_the_folds():
    rng = np.random.default_rng(0)
    meta = [{"State": s, "Sampling_Date": f"2015/{m}/3", "Species": sp}
            for s, m, sp in zip(rng.choice(["NSW", "Tas", "Vic"], 200), rng.choice([1, 4, 7, 10], 200),
                                rng.choice(["Clover", "Ryegrass"], 200))]
    folds = biomass.stratified_folds(meta, 5, seed=1)
    assert np.array_equal(folds, biomass.stratified_folds(meta, 5, seed=1))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    keys = [(m["State"], biomass.season(m["Sampling_Date"]), m["Species"]) for m in meta]
    for k in set(keys):
        in_stratum = folds[[i for i, key in enumerate(keys) if key == k]]
        counts = np.bincount(in_stratum, minlength=5)
        assert counts.max() - counts.min() <= 1  # dealt out evenly


def test_mse_and_presence_losses_against_numpy():
    pred = np.array([[1.0, 0.0, 2.0, 3.0, 4.0], [0.5, 1.0, 0.0, 1.0, 2.0]], np.float32)
    true = np.array([[1.5, 0.0, 0.0, 3.0, np.nan], [0.5, 2.0, 1.0, 1.0, 2.5]], np.float32)
    w = np.array(biomass.WEIGHTS, np.float32)
    expected = [np.nansum(w * (pred[i] - true[i]) ** 2 * np.isfinite(true[i])) for i in range(2)]
    np.testing.assert_allclose(biomass.mse(pred, true, w), expected, rtol=1e-6)
    logits = np.array([[2.0, -1.0, 0.5, 0.0, 3.0]] * 2, np.float32)
    p = 1 / (1 + np.exp(-logits))
    y = (np.nan_to_num(true) > 0).astype(np.float32)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    expected = [np.sum(bce[i] * np.isfinite(true[i])) / np.isfinite(true[i]).sum() for i in range(2)]
    np.testing.assert_allclose(biomass.presence_bce(logits, true), expected, rtol=1e-5)


def test_backbone_lr_is_absolute_and_stage2_epochs_bound_the_second_stage(kaggle_dir):
    c = _config(kaggle_dir)
    c.optim.lr, c.optim.backbone_lr = 2e-4, 1e-5
    assert optim.lr_multiplier("params/backbone/encoder/layer_0/mlp/fc1/kernel", c, 2) == pytest.approx(0.05)
    assert optim.lr_multiplier("params/head/dense/kernel", c, 2) == 1.0
    c.optim.lr = 1e-3  # changing the heads' lr leaves the backbone's at 1e-5
    assert optim.lr_multiplier("params/backbone/embeddings/cls_token", c, 2, (), 1e-3) * 1e-3 == pytest.approx(1e-5)
    c.train.stage1_epochs, c.train.stage1_patience, c.train.stage2_epochs = 3, 2, 4
    head, rest = train.phases(c)
    assert (head.trainable, head.epochs, head.patience) == ("head", 3, 2) and (rest.trainable, rest.epochs) == ("all", 4)


def test_score_submission_against_a_solution_file(kaggle_dir, tmp_path):
    solution = list(csv.DictReader((kaggle_dir / syn.SOLUTION_NAME).open()))
    with open(tmp_path / "perfect.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sample_id", "target"])
        w.writeheader()
        w.writerows({"sample_id": r["sample_id"], "target": r["target"]} for r in solution)
    assert biomass.score_submission(tmp_path / "perfect.csv", kaggle_dir / syn.SOLUTION_NAME)["weighted_r2"] == 1.0
    (tmp_path / "short.csv").write_text("sample_id,target\n" + f"{solution[0]['sample_id']},1.0\n")
    with pytest.raises(DataError, match="sample_ids of .* are missing"):
        biomass.score_submission(tmp_path / "short.csv", kaggle_dir / syn.SOLUTION_NAME)


@pytest.mark.slow
def test_folds_then_one_submission_with_every_test_sample_id(kaggle_dir, tmp_path):
    c = _config(kaggle_dir, presence_weight=0.5, height_weight=0.2, loss="mse")
    c.cv.folds = (0, 1)
    c.train.stage1_epochs, c.train.stage2_epochs = 1, 1
    c.optim.backbone_lr = 5e-4
    result = cv.run(c, tmp_path)
    assert set(result["folds"]) == {0, 1} and np.isfinite(result["mean"]["weighted_r2"])
    rows = list(csv.DictReader((tmp_path / "submission.csv").open()))
    listed = [r["sample_id"] for r in csv.DictReader((kaggle_dir / "test.csv").open())]
    assert [r["sample_id"] for r in rows] == listed and all(float(r["target"]) >= 0 for r in rows)
    score = json.loads((tmp_path / "submission_score.json").read_text())  # the demo set's test_solution.csv
    assert set(score) >= {"weighted_r2", "r2_total"}
    history = list(csv.DictReader((tmp_path / "fold_0" / "training_history.csv").open()))
    assert [r["phase"] for r in history] == ["head", "all"]
    assert {"train_loss_masses", "train_loss_presence", "train_loss_height", "val_loss", "val_loss_masses",
            "val_mse"} <= set(history[0])
    total = float(history[-1]["train_loss"])
    parts = sum(float(history[-1][k]) for k in history[-1] if k.startswith("train_loss_"))
    assert total == pytest.approx(parts, rel=1e-4)  # the components add up to the objective


@pytest.mark.integration
def test_a_dry_run_of_the_folds_checks_the_first_fold(kaggle_dir, tmp_path):
    c = _config(kaggle_dir)
    c.cv.folds = (1, 2)
    assert np.isfinite(train.run(c, tmp_path, dry_run=True)["dry_run_loss"])
    assert not any(p.is_dir() and any(p.iterdir()) for p in tmp_path.glob("checkpoints"))
