"""Evaluation, prediction, probes and robustness on a real (tiny) finished run: files on disk, orbax checkpoints,
scikit-learn as the reference for the metrics."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from transformers import Dinov2Config, Dinov2Model

from jaxvit import evaluate, optim, predict, probe, robustness, run_io
from jaxvit.checkpoint import Checkpoints
from jaxvit.data.synthetic_gz2 import write_dataset
from jaxvit.train import Trainer
from test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILES = ("results.json", "confusion_matrix.png", "confusion_matrix_raw.png", "per_class_metrics.png",
                "predictions.csv")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gz2")
    write_dataset(root, per_class={"train": 8, "val": 3, "test": 3}, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """A finished full fine-tuning run with EMA (3 epochs of 5 steps), end-of-run test evaluation included."""
    c = tiny_config(data_dir, epochs=3, ema_decay=0.5)
    c.optim.lr = 3e-3
    c.data.aug.rotate_degrees = 0.0
    workdir = tmp_path_factory.mktemp("run")
    Trainer(c, workdir).run()
    return workdir


def read_predictions(path: Path, classes: list[str]):
    rows = list(csv.DictReader(path.open()))
    y = np.array([classes.index(r["true"]) for r in rows])
    pred = np.array([classes.index(r["predicted"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return rows, y, pred, probs


def assert_png_not_blank(path: Path):
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert min(pixels.shape[:2]) > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # text, cells, colour bar: not a flat image


def test_evaluate_cli_writes_report_that_agrees_with_sklearn(run_dir, tmp_path):
    out = tmp_path / "eval"
    result = evaluate.main([f"--workdir={run_dir}", "--split=test", f"--output_dir={out}", "--batch_size=4"])
    for name in REPORT_FILES:
        assert (out / f"test_{name}").exists(), name
    for name in REPORT_FILES[1:4]:
        assert_png_not_blank(out / f"test_{name}")
    assert_png_not_blank(run_dir / "training_curves.png")

    classes = json.loads((run_dir / "classes.json").read_text())
    rows, y, pred, probs = read_predictions(out / "test_predictions.csv", classes)
    assert len(rows) == 15 and np.array_equal(pred, probs.argmax(1))
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(1))
    saved = json.loads((out / "test_results.json").read_text())
    assert saved["accuracy"] == result["accuracy"]
    labels = list(range(len(classes)))
    assert saved["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert saved["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=2, labels=labels))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, labels=labels, zero_division=0)
        assert (saved[f"precision_{avg}"], saved[f"recall_{avg}"], saved[f"f1_{avg}"]) == pytest.approx((p, r, f))
    assert saved["roc_auc_ovr_macro"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr",
                                                                         average="macro", labels=labels))
    assert saved["loss"] == pytest.approx(skm.log_loss(y, probs, labels=labels), rel=1e-6)
    assert saved["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        assert saved["per_class"][c] == pytest.approx(dict(precision=p[i], recall=r[i], f1=f[i], support=s[i]))
    # ECE, written out: 15 equal-width confidence bins, |accuracy - mean confidence| weighted by bin size.
    conf, bins = probs.max(1), np.clip(np.ceil(probs.max(1) * 15).astype(int) - 1, 0, 14)
    ece = sum(abs((pred == y)[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert saved["ece"] == pytest.approx(ece)
    # The end-of-training test evaluation used the same (best_acc) checkpoint, restored another way.
    at_end = json.loads((run_dir / "eval_test" / "test_results.json").read_text())
    assert at_end["accuracy"] == saved["accuracy"] and at_end["loss"] == pytest.approx(saved["loss"], rel=1e-6)
    assert saved["models"] == [{"workdir": str(run_dir), "checkpoint": result["models"][0]["checkpoint"],
                                "ema": True}]


def test_ensemble_averages_probabilities(run_dir):
    single = read_predictions(run_dir / "eval_test" / "test_predictions.csv", run_io.load_classes(run_dir, None))
    result = evaluate.main([f"--workdir={run_dir}", f"--workdir={run_dir}", "--checkpoint=best_acc"])
    out = run_dir / "eval_test_ensemble"
    ensemble = read_predictions(out / "test_predictions.csv", run_io.load_classes(run_dir, None))
    np.testing.assert_allclose(ensemble[3], single[3], atol=1e-7)  # the mean of two equal members
    assert len(result["models"]) == 2 and result["accuracy"] == pytest.approx(
        json.loads((run_dir / "eval_test" / "test_results.json").read_text())["accuracy"])


def test_load_run_restores_the_ema_weights_of_a_checkpoint(run_dir):
    name, step, _ = run_io.find_checkpoint(run_dir, "final")
    by_step = run_io.load_run(run_dir, step)
    by_name = run_io.load_run(run_dir, "final")
    assert by_name.checkpoint == f"final/{step}" and by_step.step == step
    mngr = Checkpoints(run_dir / "checkpoints")._named("final")
    full = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    want = optim.combine(full["ema"], full["frozen"])
    leaves = lambda t: jax.tree_util.tree_leaves_with_path(t)
    for (path, a), (_, b), (_, c) in zip(leaves(want), leaves(by_name.variables), leaves(by_step.variables)):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
        np.testing.assert_array_equal(a, c, err_msg=str(path))
    ema_head, raw_head = full["ema"]["params"]["head"]["out"]["kernel"], full["trainable"]["params"]["head"]["out"][
        "kernel"]
    assert np.abs(ema_head - raw_head).max() > 0  # EMA weights, not the raw ones
    with pytest.raises(FileNotFoundError, match="available"):
        run_io.find_checkpoint(run_dir, "best_loss")


def test_predict_cli_single_image_and_directory_with_corrupt_file(run_dir, data_dir, tmp_path):
    classes = run_io.load_classes(run_dir, None)
    rows, _, _, probs = read_predictions(run_dir / "eval_test" / "test_predictions.csv", classes)
    image = Path(rows[0]["path"])
    out_json = tmp_path / "one.json"
    subprocess.run([sys.executable, "-m", "jaxvit.predict", f"--workdir={run_dir}", f"--image={image}",
                    f"--output={out_json}"], cwd=ROOT, check=True, capture_output=True)
    one = json.loads(out_json.read_text())
    assert one["class"] == classes[int(probs[0].argmax())]
    assert one["confidence"] == pytest.approx(probs[0].max(), abs=1e-5)
    np.testing.assert_allclose([one["probabilities"][c] for c in classes], probs[0], atol=1e-5)

    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for i, r in enumerate(rows[:4]):
        shutil.copy(r["path"], images / ("nested" if i % 2 else "") / f"img{i}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out_csv = tmp_path / "out" / "preds.csv"
    results = predict.main([f"--workdir={run_dir}", f"--image_dir={images}", f"--output={out_csv}",
                            "--batch_size=3", f"--attention_dir={tmp_path / 'attention'}", "--attention_max=2"])
    written = list(csv.DictReader(out_csv.open()))
    assert sorted(Path(r["path"]).name for r in written) == [f"img{i}.png" for i in range(4)]
    for r in written:
        i = int(Path(r["path"]).stem[3:])
        np.testing.assert_allclose([float(r[f"prob_{c}"]) for c in classes], probs[i], atol=1e-5)
    bad = list(csv.DictReader((tmp_path / "out" / "preds_unreadable.csv").open()))
    assert [Path(b["path"]).name for b in bad] == ["corrupt.png"] and bad[0]["reason"]
    assert sum("error" in r for r in results) == 1
    overlays = sorted((tmp_path / "attention").glob("*.png"))
    assert len(overlays) == 2
    assert_png_not_blank(overlays[0])


def test_predictor_api(run_dir, data_dir):
    p = predict.Predictor.from_workdir(run_dir, "best_acc", batch_size=4)
    path = next((data_dir / "gz2_5class_test" / "spiral").glob("*.png"))
    by_path = p.predict(path)
    with Image.open(path) as im:
        by_pil = p.predict(im)
        by_array = p.predict(np.asarray(im.convert("RGB")))
    assert by_path["path"] == str(path) and by_pil["class"] == by_path["class"] == by_array["class"]
    assert by_pil["probabilities"] == pytest.approx(by_path["probabilities"], abs=1e-6)
    assert sum(by_path["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    batch = p.predict_batch([path, "/no/such/file.png", path])
    assert "error" in batch[1] and batch[0]["probabilities"] == pytest.approx(batch[2]["probabilities"])
    assert p.benchmark(8)["images_per_s"] > 0
    maps = p.attention_maps(p.preprocess(path)[None])
    cfg = p.model.backbone
    assert maps.shape == (1, cfg.num_heads, 32 // cfg.patch_size, 32 // cfg.patch_size)
    assert (maps >= 0).all() and (maps.sum(axis=(2, 3)) <= 1 + 1e-5).all()  # CLS row, patch columns only


def _tiny_hf_dinov2(path: Path) -> Path:
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                     image_size=32, patch_size=8)).eval()
    model.save_pretrained(path)
    return path


def test_probe_on_a_backbone_without_fine_tuning(data_dir, tmp_path, capsys):
    hf = _tiny_hf_dinov2(tmp_path / "hf")
    out = tmp_path / "probe.json"
    result = probe.main([f"--data_dir={data_dir}", f"--pretrained={hf}", "--image_size=32", "--crop_ratio=1",
                         "--num_workers=0", "--k=1,3", "--l2=1e-4,1e-2", "--steps=100", f"--output={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    got = {(r["method"], r["pool"], r.get("k")) for r in result["results"]}
    assert got == {(m, pool, k) for pool in ("cls", "cls_mean") for m, k in
                   (("k-NN", 1), ("k-NN", 3), ("linear probe", None))}
    for r in result["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0
    lin = [r for r in result["results"] if r["method"] == "linear probe"]
    assert all(set(r["sweep"]) == {1e-4, 1e-2} for r in lin)  # chosen on the val split
    assert result["splits"]["eval"] == {"split": "test", "images": 15}
    assert "| k-NN (k=3, cosine, T=0.07) | cls |" in capsys.readouterr().out


def test_knn_and_linear_probe_match_references():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8))
    y = rng.integers(0, 3, 60)
    x = centres[y] + rng.standard_normal((60, 8))
    train, test, y_train = x[:40], x[40:], y[:40]
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = unit(test) @ unit(train).T
    for temperature in (0.0, 0.1):
        got = probe.knn_predict(train, y_train, test, [1, 5], temperature, 3)
        for k in (1, 5):
            nn = np.argsort(-sim, axis=1)[:, :k]
            weights = np.exp(np.take_along_axis(sim, nn, 1) / temperature) if temperature else np.ones(nn.shape)
            votes = np.stack([(weights * (y_train[nn] == c)).sum(1) for c in range(3)], 1)
            np.testing.assert_array_equal(got[k], votes.argmax(1))
    # Logistic regression: mean CE + l2 |W|^2 is sklearn's objective with C = 1 / (2 N l2).
    l2 = 1e-2
    params = probe.fit_logistic(train.astype(np.float32), y_train, l2, 3, steps=200)
    ours = jax.nn.softmax(test @ np.asarray(params["w"]) + np.asarray(params["b"]), -1)
    ref = LogisticRegression(C=1 / (2 * len(train) * l2), tol=1e-10, max_iter=10_000).fit(train, y_train)
    np.testing.assert_allclose(ours, ref.predict_proba(test), atol=2e-4)


def test_corruptions_are_what_they_say():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, (2, 32, 32, 3)).astype(np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(2))
    s = robustness.SEVERITY
    blurred = np.asarray(robustness.corrupt(x, "blur", s["blur"][4], keys))
    sigma = s["blur"][4] * 32 / 224
    ref = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect", truncate=40.0)
    np.testing.assert_allclose(blurred, ref, atol=1e-5)
    np.testing.assert_allclose(robustness.corrupt(x, "brightness", 0.1, keys), np.clip(x + 0.1, 0, 1), atol=1e-6)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(robustness.corrupt(x, "contrast", 0.4, keys), (x - mean) * 0.4 + mean, atol=1e-6)
    noisy = np.asarray(robustness.corrupt(np.full_like(x, 0.5), "gaussian_noise", 0.08, keys))
    assert abs(noisy.std() - 0.08) < 0.005 and not np.allclose(noisy[0], noisy[1])
    np.testing.assert_array_equal(noisy, robustness.corrupt(np.full_like(x, 0.5), "gaussian_noise", 0.08, keys))


def test_robustness_cli(run_dir, tmp_path):
    result = robustness.main([f"--workdir={run_dir}", "--corruptions=gaussian_noise,contrast", "--severities=1,5",
                              f"--output_dir={tmp_path}"])
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["accuracy"] == {c: {"1": result["accuracy"][c][1], "5": result["accuracy"][c][5]}
                                 for c in ("gaussian_noise", "contrast")}
    clean = json.loads((run_dir / "eval_test" / "test_results.json").read_text())["accuracy"]
    assert saved["clean"] == pytest.approx(clean)
    table = (tmp_path / "robustness.md").read_text()
    assert "| Corruption | s1 | s5 | Mean | vs clean |" in table and "| contrast |" in table
