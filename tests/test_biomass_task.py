"""The biomass task through the shared loop on a small synthetic pasture set in the competition's long-CSV layout:
the best checkpoint by validation weighted R^2, derived targets, auxiliary heads, the submission CSV, bad data."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.tiny import ROOT, tiny_config

from jaxvit import checkpoint, inference, run_io
from jaxvit.tasks.biomass import maths
from jaxvit.train import Trainer


@pytest.fixture(scope="module")
def pasture_dir(tmp_path_factory):
    from jaxvit.demos.pasture import write_dataset
    root = tmp_path_factory.mktemp("pasture")
    write_dataset(root, per_split={"train": 48, "val": 16, "test": 16}, size=(64, 32), seed=0)
    return root


def _config(data_dir, **biomass_keys):
    c = tiny_config(data_dir, task="biomass", epochs=3)
    c.data.aug.color_jitter_prob = 0.0
    c.model.pool = "cls_mean"
    for k, v in biomass_keys.items():
        c.biomass[k] = v
    return c


@pytest.mark.slow
def test_biomass_trains_with_aux_heads_and_writes_a_submission(pasture_dir, tmp_path):
    c = _config(pasture_dir, height_weight=0.2, ndvi_weight=0.2, species_weight=0.1, uncertainty=True,
                mass_balance_weight=0.1, qc_weight=1e-3, huber_dead_delta=5.0, clahe_prob=0.5, motion_blur_prob=0.5,
                perspective_jitter=0.05, border_mask=0.1, species_prior=True, aos_weight=0.3, state_scaling=True)
    from jaxvit import tasks
    transform, src = tasks.create(c).train_transform(), tasks.create(c).source("train")
    a, b = (transform(src[0], np.random.default_rng(7)) for _ in range(2))
    assert a["image"].shape == (32, 32, 3) and np.array_equal(a["image"], b["image"])  # deterministic in the rng
    assert not np.array_equal(a["image"], transform(src[0])["image"])  # and augmented
    result = Trainer(c, tmp_path / "run").run()
    rows = list(csv.DictReader((tmp_path / "run" / "training_history.csv").open()))
    assert len(rows) == 3 and {"val_weighted_r2", "val_r2_total", "val_r2_dead"} <= set(rows[0])
    assert np.isfinite([float(r["train_loss"]) for r in rows]).all()
    best = max(rows, key=lambda r: float(r["val_weighted_r2"]))
    run = run_io.load_run(tmp_path / "run", "best")
    assert run.step == int(best["step"])
    mesh = inference.run_mesh(run.cfg)
    again = run.task.evaluate(run.model, inference.place(run.variables, mesh), "val", mesh)
    assert again["weighted_r2"] == pytest.approx(float(best["val_weighted_r2"]), abs=1e-5)
    stats = json.loads((tmp_path / "run" / "biomass_stats.json").read_text())
    assert len(stats["scale"]) == 5 and stats["species"] and stats["states"]
    # The metadata priors trained with the head: their parameters moved from their initial values, except the
    # AOS coefficient of Dead, whose column is derived (Total - GDM) and so gets no gradient.
    extra = run.variables["params"]["head_extra"]
    assert set(extra) == {"aos_coef", "species_gate", "state_log_density"}
    coef = np.asarray(extra["aos_coef"])
    assert coef[maths.DEAD] == 0 and np.all(np.delete(coef, maths.DEAD) != 0)
    assert float(extra["species_gate"]) != -4.0
    assert np.asarray(extra["state_log_density"]).shape == (len(stats["states"]),)
    assert np.all(np.asarray(extra["state_log_density"]) != 0)
    # Submission: five rows per test image, sample_id = <image id>__<target>; Dead is Total - GDM exactly.
    sub = list(csv.DictReader((tmp_path / "run" / "eval_test" / "test_submission.csv").open()))
    assert len(sub) == 5 * 16 and sub[0]["sample_id"].endswith("__Dry_Green_g")
    by_image = {}
    for r in sub:
        image, target = r["sample_id"].split("__")
        by_image.setdefault(image, {})[target] = float(r["target"])
    for t in by_image.values():
        assert t["Dry_Dead_g"] == pytest.approx(t["Dry_Total_g"] - t["GDM_g"], abs=1e-3)
    # The reported metric is the official formula on the submission's numbers.
    truth = maths.read_long_csv(pasture_dir / "test.csv")
    ids = {k.rsplit("/", 1)[-1].rsplit(".", 1)[0]: v["targets"] for k, v in truth.items()}
    pred = np.array([[by_image[i][n] for n in maths.TARGETS] for i in ids])
    assert result["weighted_r2"] == pytest.approx(maths.weighted_r2(np.stack(list(ids.values())), pred), abs=1e-4)
    # predict on a directory writes the same submission layout with the same numbers.
    from jaxvit import predict
    predict.main([f"--workdir={tmp_path / 'run'}", f"--image_dir={pasture_dir / 'test'}",
                  f"--output={tmp_path / 'pred.csv'}", "--checkpoint=best"])
    predicted = {r["sample_id"]: float(r["target"]) for r in csv.DictReader((tmp_path / "pred.csv").open())}
    assert len(predicted) == len(sub) and all(predicted[r["sample_id"]] == pytest.approx(float(r["target"]),
                                                                                       rel=1e-4, abs=1e-3)
                                              for r in sub)
    # An ensemble of the run and a copy whose best is another resume point averages their masses.
    import shutil
    from jaxvit import evaluate
    from helpers.tiny import set_best_step
    other = next(s for s in checkpoint.steps(tmp_path / "run") if s != run.step)
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    set_best_step(copy, other)
    members = [run_io.load_run(w, "best") for w in (tmp_path / "run", copy)]
    assert members[0].step != members[1].step
    outs = [m.task.outputs(m.model, m.variables, m.task.source("test"), mesh)[0] for m in members]
    ens = evaluate.evaluate_runs([tmp_path / "run", copy], "test", output_dir=tmp_path / "ens")
    rows = list(csv.DictReader((tmp_path / "ens" / "test_submission.csv").open()))
    np.testing.assert_allclose([float(r["target"]) for r in rows], ((outs[0] + outs[1]) / 2).reshape(-1), rtol=1e-5)
    assert ens["weighted_r2"] == pytest.approx(maths.weighted_r2(np.stack(list(ids.values())),
                                                                   (outs[0] + outs[1]) / 2), abs=1e-6)


def test_metadata_priors_are_the_documented_formula():
    """mass = ((1 - g) * (head + aos * c) + g * softmax(species) @ table) * softmax(state) @ exp(a)."""
    import jax
    from jaxvit.tasks.biomass.model import MetadataPriors
    layout = (("mass", 0, 5), ("species", 5, 8), ("aos", 8, 9), ("state", 9, 11))
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 5))
    priors = MetadataPriors(layout, tuple(map(tuple, table)), aos=True)
    out = rng.normal(size=(4, 11)).astype(np.float32)
    params = {"aos_coef": rng.normal(size=5), "species_gate": np.float32(0.3), "state_log_density": rng.normal(size=2)}
    got = np.asarray(priors.apply({"params": params}, out))
    softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    g = 1 / (1 + np.exp(-0.3))
    mass = (1 - g) * (out[:, :5] + out[:, 8:9] * params["aos_coef"]) + g * softmax(out[:, 5:8]) @ table
    mass *= (softmax(out[:, 9:11]) @ np.exp(params["state_log_density"]))[:, None]
    np.testing.assert_allclose(got[:, :5], mass, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, 5:], out[:, 5:])
    init = priors.init(jax.random.key(0), out)["params"]
    assert float(init["species_gate"]) == -4.0 and not np.any(init["aos_coef"]) and not np.any(init["state_log_density"])


def test_depth_features_are_the_documented_statistics_and_pooling():
    import jax
    from jaxvit.tasks.biomass.model import DepthFeatures
    rng = np.random.default_rng(3)
    depth, tokens = rng.uniform(1, 5, size=(2, 8, 8)).astype(np.float32), rng.normal(size=(2, 4, 6)).astype(np.float32)
    features = DepthFeatures()
    got = np.asarray(features.apply({"params": {"beta": np.float32(2.0)}}, depth, tokens, (2, 2)))
    d = (depth - depth.min((1, 2), keepdims=True)) / (np.ptp(depth, (1, 2), keepdims=True) + 1e-6)
    flat = d.reshape(2, -1)
    stats = np.stack([flat.mean(-1), flat.std(-1), *np.quantile(flat, [0.1, 0.5, 0.9], axis=-1)], -1)
    tiles = d.reshape(2, 2, 4, 2, 4).mean((2, 4)).reshape(2, 4)  # the mean depth of each 4 x 4 tile
    weights = np.exp(2 * tiles) / np.exp(2 * tiles).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.concatenate([stats, np.einsum("bt,btd->bd", weights, tokens)], -1),
                               rtol=1e-5, atol=1e-5)
    assert float(features.init(jax.random.key(0), depth, tokens, (2, 2))["params"]["beta"]) == 0.0


@pytest.mark.slow
def test_biomass_with_depth_features_trains_the_attention_and_leaves_depth_anything_frozen(pasture_dir, tmp_path):
    from flax import traverse_util
    from helpers.torch_models import depth_anything

    from jaxvit.models import load_pretrained
    depth_anything().save_pretrained(tmp_path / "da")
    c = _config(pasture_dir, depth_model=str(tmp_path / "da"))
    c.train.epochs = 2
    Trainer(c, tmp_path / "run").run()
    rows = list(csv.DictReader((tmp_path / "run" / "training_history.csv").open()))
    assert np.isfinite([float(r["val_weighted_r2"]) for r in rows]).all()
    params = run_io.load_run(tmp_path / "run", "final").variables["params"]
    assert float(params["head_depth"]["beta"]) != 0.0
    trained = traverse_util.flatten_dict(params["depth"])
    for k, v in traverse_util.flatten_dict(load_pretrained(tmp_path / "da")[1]).items():
        np.testing.assert_array_equal(np.asarray(trained[k]), np.asarray(v))


@pytest.mark.integration
def test_biomass_learns_the_demo_signal(pasture_dir, tmp_path):
    c = _config(pasture_dir, loss="planthydra")
    c.train.epochs, c.train.batch_size, c.optim.lr = 12, 16, 2e-3
    Trainer(c, tmp_path / "run").run()
    r2 = [float(r["val_weighted_r2"]) for r in csv.DictReader((tmp_path / "run" / "training_history.csv").open())]
    assert max(r2) > 0.3 and max(r2) > r2[0] + 0.2, r2


@pytest.mark.integration
def test_a_target_missing_for_an_image_is_one_line(pasture_dir, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    for split in ("train", "val", "test"):
        lines = (pasture_dir / f"{split}.csv").read_text().splitlines()
        if split == "train":  # drop the second image's Dead row (the demo config's folds read train.csv)
            assert "Dry_Dead_g" in lines[7]
        keep = [line for i, line in enumerate(lines) if not (split == "train" and i == 7)]
        (bad / f"{split}.csv").write_text("\n".join(keep) + "\n")
        (bad / split).symlink_to(pasture_dir / split)
    proc = subprocess.run([sys.executable, "-m", "jaxvit.main", "--config=configs/biomass.py:demo",
                           f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={bad}", "--config.data.demo="],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.csv" in last and "no row for Dry_Dead_g" in last


@pytest.mark.integration
def test_cross_validation_over_grouped_folds(pasture_dir, tmp_path):
    from jaxvit import cv, tasks
    c = _config(pasture_dir, fold_strategy="group")
    c.train.epochs = 1
    c.cv.folds, c.cv.n_folds = (0, 2), 3
    result = cv.run(c, tmp_path)
    # Folds keep State x Season x Species groups whole and partition the train split.
    task = tasks.create(c)
    records = maths.read_long_csv(pasture_dir / "train.csv")
    meta = [r["metadata"] for r in records.values()]
    folds = task.folds(list(records), meta)
    assert sorted(set(folds.tolist())) == [0, 1, 2]
    groups = {}
    for f, m in zip(folds, meta):
        groups.setdefault((m["State"], maths.season(m["Sampling_Date"]), m["Species"]), set()).add(int(f))
    assert all(len(v) == 1 for v in groups.values())
    for k in (0, 2):
        c.cv.fold = k
        train, val = tasks.create(c).source("train"), tasks.create(c).source("val")
        assert not set(train.paths) & set(val.paths) and len(train) + len(val) == len(records)
        assert len(val) == int((folds == k).sum()) and result["folds"][k]["images"] == len(val)
        assert checkpoint.read(tmp_path / f"fold_{k}", "best").step in checkpoint.steps(tmp_path / f"fold_{k}")
    saved = json.loads((tmp_path / "cv_results.json").read_text())
    r2 = [saved["folds"][str(k)]["val"]["weighted_r2"] for k in (0, 2)]
    assert saved["mean"]["weighted_r2"] == pytest.approx(np.mean(r2)) and saved["std"]["weighted_r2"] >= 0
    oof = list(csv.DictReader((tmp_path / "oof_predictions.csv").open()))
    assert len(oof) == 5 * int(np.isin(folds, [0, 2]).sum())
    # A fold CSV decides instead when given.
    fold_csv = tmp_path / "folds.csv"
    fold_csv.write_text("image_path,fold\n" + "".join(f"{p},{i % 3}\n" for i, p in enumerate(records)))
    c.cv.fold_csv = str(fold_csv)
    assert tasks.create(c).folds(list(records), meta).tolist() == [i % 3 for i in range(len(records))]


@pytest.mark.integration
def test_left_and_right_halves_add_up_to_the_photo(pasture_dir, tmp_path):
    c = _config(pasture_dir, halves=True, cross_view_weight=0.1)
    c.train.epochs = 1
    Trainer(c, tmp_path / "run").run()
    run = run_io.load_run(tmp_path / "run", "final")
    src = run.task.source("test")
    example = run.task.eval_transform()(src[0])
    assert example["image"].shape == (2, 32, 32, 3)
    # The photo's masses are the sum of what the model sees in each half (derived Dead from the summed heads).
    raw = np.asarray(run.model.apply(run.variables, example["image"]))[:, :5] * np.asarray(run.task.stats["scale"])
    expected = np.asarray(maths.complete(raw.sum(0, keepdims=True), False, True))[0]
    got = np.asarray(run.task.predict_fn(run.model)(run.variables, example["image"][None]))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    from jaxvit.predict import Predictor
    from PIL import Image
    photo = np.asarray(Image.open(src.paths[0]).convert("RGB"))
    np.testing.assert_allclose(Predictor.from_workdir(tmp_path / "run", "final").raw_outputs([photo])[0], got,
                               rtol=1e-4, atol=1e-3)
