"""jaxvit.metrics checked against scikit-learn; jaxvit.report artefacts checked for sanity."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from jaxvit import metrics, report

K = 5
N = 500
NAMES = ["smooth_round", "smooth_in_between", "smooth_cigar", "edge_on", "spiral"]
TOL = 1e-9


def make_data(seed: int = 0, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels and informative Dirichlet probabilities; column 3 is
    rounded to one decimal (the other columns rescaled so rows still sum to 1),
    giving many exact ties in that class's scores."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(K, size=n, p=[0.45, 0.30, 0.15, 0.07, 0.03])
    # Dirichlet(1 + 2 * onehot(label)) rows, drawn as normalised gamma variates.
    gammas = rng.gamma(1.0 + 2.0 * np.eye(K)[labels])
    probs = gammas / gammas.sum(axis=1, keepdims=True)
    tied = np.round(probs[:, 3], 1)
    rest = np.delete(probs, 3, axis=1)
    rest *= ((1.0 - tied) / rest.sum(axis=1))[:, None]
    probs = np.insert(rest, 3, tied, axis=1)
    return probs, labels


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_data()


def sk_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Textbook ECE (Guo et al. 2017): loop over bins (lo, hi]."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def test_data_has_ties_and_imbalance(data):
    probs, labels = data
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert len(np.unique(probs[:, 3])) <= 11  # heavily tied column
    counts = np.bincount(labels, minlength=K)
    assert counts.min() > 0 and counts.max() > 8 * counts.min()


def test_confusion_matrix_matches_sklearn(data):
    probs, labels = data
    preds = probs.argmax(axis=1)
    cm = metrics.confusion_matrix(labels, preds, K)
    assert cm.dtype == np.int64 and cm.shape == (K, K)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, preds, labels=range(K)))


def test_classification_metrics_match_sklearn(data):
    probs, labels = data
    preds = probs.argmax(axis=1)
    m = metrics.classification_metrics(probs, labels, NAMES)
    lab = list(range(K))

    assert m["num_samples"] == N
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=TOL)
    for k in (1, 2, 3):
        ref = skm.top_k_accuracy_score(labels, probs, k=k, labels=lab)
        assert m[f"top{k}_accuracy"] == pytest.approx(ref, abs=TOL)
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, preds, labels=lab, average=avg, zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(p, abs=TOL)
        assert m[f"recall_{avg}"] == pytest.approx(r, abs=TOL)
        assert m[f"f1_{avg}"] == pytest.approx(f, abs=TOL)
        assert m[f"f1_{avg}"] == pytest.approx(
            skm.f1_score(labels, preds, labels=lab, average=avg, zero_division=0), abs=TOL
        )
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=lab, zero_division=0)
    for c, name in enumerate(NAMES):
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(p[c], abs=TOL)
        assert pc["recall"] == pytest.approx(r[c], abs=TOL)
        assert pc["f1"] == pytest.approx(f[c], abs=TOL)
        assert pc["support"] == s[c]
    ref_auc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert m["roc_auc_ovr_macro"] == pytest.approx(ref_auc, abs=TOL)
    assert m["roc_auc_per_class"]["edge_on"] == pytest.approx(
        skm.roc_auc_score(labels == 3, probs[:, 3]), abs=TOL
    )  # the tied column
    assert m["roc_auc_skipped_classes"] == []
    assert m["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=lab), abs=TOL)
    assert m["ece"] == pytest.approx(sk_ece(probs, labels), abs=TOL)
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, preds, labels=lab).tolist()
    # Plain Python values only: strict JSON round trip is lossless.
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_topk_and_loss_arguments(data):
    probs, labels = data
    m = metrics.classification_metrics(probs.astype(np.float32), labels, NAMES, loss=0.25, topk=(1, 4, 5))
    assert m["loss"] == 0.25
    assert "top4_accuracy" in m and "top5_accuracy" not in m and "top2_accuracy" not in m
    assert m["top1_accuracy"] == m["accuracy"]


def test_auc_skips_absent_class(data):
    probs, labels = data
    labels = np.where(labels == 4, 0, labels)  # class 4 never occurs
    m = metrics.classification_metrics(probs, labels, NAMES)
    assert m["roc_auc_skipped_classes"] == ["spiral"]
    per_class = [skm.roc_auc_score(labels == c, probs[:, c]) for c in range(4)]
    assert m["roc_auc_ovr_macro"] == pytest.approx(np.mean(per_class), abs=TOL)
    assert m["per_class"]["spiral"]["support"] == 0
    assert m["per_class"]["spiral"]["recall"] == 0.0
    # Macro averages still run over all K classes, as with sklearn's labels=range(K).
    ref = skm.f1_score(labels, probs.argmax(1), labels=range(K), average="macro", zero_division=0)
    assert m["f1_macro"] == pytest.approx(ref, abs=TOL)


def test_binary_auc_with_heavy_ties():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.3 * y, 1)
    assert metrics.binary_roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=TOL)
    assert metrics.binary_roc_auc(y, np.zeros(300)) == 0.5


def test_small_helpers_match_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, K, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))  # classes 3, 4 under-predicted
    preds[preds == 4] = 0  # class 4 never predicted -> zero division
    assert metrics.accuracy(labels, preds) == pytest.approx(skm.accuracy_score(labels, preds), abs=TOL)
    ref = skm.f1_score(labels, preds, labels=range(K), average="macro", zero_division=0)
    assert metrics.macro_f1(labels, preds, K) == pytest.approx(ref, abs=TOL)


def test_ece_extremes():
    one_hot = np.eye(K)[[0, 1, 2, 3]]
    assert metrics.expected_calibration_error(one_hot, np.array([0, 1, 2, 3])) == 0.0
    assert metrics.expected_calibration_error(one_hot, np.array([1, 2, 3, 4])) == 1.0


def test_input_validation(data):
    probs, labels = data
    with pytest.raises(ValueError):
        metrics.classification_metrics(probs, np.full(N, K), NAMES)
    with pytest.raises(ValueError):
        metrics.classification_metrics(probs, labels, NAMES[:4])
    with pytest.raises(ValueError):
        metrics.confusion_matrix([0, 1], [0], K)


# --- report -----------------------------------------------------------------


def assert_readable_png(path: str, min_side: int = 300) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # not blank
    assert (pixels < 100).mean() > 0.005  # has dark ink (text, lines)


def test_plots(tmp_path, data):
    probs, labels = data
    m = metrics.classification_metrics(probs, labels, NAMES)
    cm = np.array(m["confusion_matrix"])
    report.plot_confusion_matrix(cm, NAMES, tmp_path / "cm.png", normalize=False, title="Counts")
    report.plot_confusion_matrix(cm, NAMES, tmp_path / "cm_norm.png", normalize=True, title="Normalised")
    report.plot_per_class_metrics(m["per_class"], NAMES, tmp_path / "per_class.png", title="Per class")

    hist = tmp_path / "history.csv"
    with open(hist, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "val_loss", "val_acc", "val_f1", "lr"])  # no train_acc
        for e in range(1, 11):
            w.writerow([e, 1.5 / e, 1.6 / e**0.8, 0.5 + 0.04 * e, "" if e == 5 else 0.45 + 0.04 * e, 1e-3 * 0.7**e])
    report.plot_training_curves(hist, tmp_path / "curves.png")

    for name in ("cm.png", "cm_norm.png", "per_class.png", "curves.png"):
        assert_readable_png(str(tmp_path / name))


def test_training_curves_tolerates_sparse_csv(tmp_path):
    hist = tmp_path / "history.csv"
    hist.write_text("epoch,images_per_s\n")
    report.plot_training_curves(hist, tmp_path / "empty.png")
    assert os.path.getsize(tmp_path / "empty.png") > 0


def test_predictions_csv_round_trip(tmp_path, data):
    probs, labels = data
    probs, labels = probs[:20], labels[:20].copy()
    labels[3] = -1
    paths = [f"images/{i:05d}.jpg" for i in range(20)]
    out = tmp_path / "sub" / "predictions.csv"
    report.write_predictions_csv(out, paths, labels, probs, NAMES)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true", "predicted", "confidence", *(f"prob_{c}" for c in NAMES)]
    assert len(rows) == 20
    for i, row in enumerate(rows):
        assert row["path"] == paths[i]
        assert row["true"] == ("" if i == 3 else NAMES[labels[i]])
        assert row["predicted"] == NAMES[probs[i].argmax()]
        assert float(row["confidence"]) == probs[i].max()
        assert [float(row[f"prob_{c}"]) for c in NAMES] == probs[i].tolist()

    report.write_predictions_csv(tmp_path / "nolabels.csv", paths, None, probs, NAMES)
    with open(tmp_path / "nolabels.csv", newline="") as f:
        assert all(r["true"] == "" for r in csv.DictReader(f))


def test_results_json_atomic(tmp_path, data):
    probs, labels = data
    m = metrics.classification_metrics(probs, labels, NAMES)
    m["extra"] = {"step": np.int64(7), "lr": np.float32(0.5), "arr": np.arange(3)}
    out = tmp_path / "results.json"
    out.write_text("old")
    report.write_results_json(out, m)
    text = out.read_text()
    assert text.startswith('{\n  "num_samples": 500')
    loaded = json.loads(text)
    assert loaded["extra"] == {"step": 7, "lr": 0.5, "arr": [0, 1, 2]}
    assert loaded["accuracy"] == m["accuracy"] and loaded["per_class"] == m["per_class"]
    assert os.listdir(tmp_path) == ["results.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        report.write_results_json(out, {"bad": object()})
    assert json.loads(out.read_text())["loss"] == m["loss"]  # failed write left the old file intact
    assert os.listdir(tmp_path) == ["results.json"]
    assert not math.isnan(loaded["ece"])


def test_top5_and_the_error_analysis_by_brute_force():
    probs, labels = make_data(seed=3, n=400)
    wide = np.concatenate([probs, np.full((400, 3), 1e-3)], axis=1)  # 8 classes: top-5 exists
    wide /= wide.sum(1, keepdims=True)
    names = [f"c{i}" for i in range(8)]
    m = metrics.classification_metrics(wide, labels, names)
    top5 = np.mean([labels[i] in np.argsort(-wide[i], kind="stable")[:5] for i in range(400)])
    assert m["top5_accuracy"] == pytest.approx(top5)
    pred = wide.argmax(1)
    pairs = {}
    for t, p in zip(labels, pred):
        if t != p:
            pairs[(names[t], names[p])] = pairs.get((names[t], names[p]), 0) + 1
    got = m["error_analysis"]["most_confused"]
    assert [g["count"] for g in got] == sorted(pairs.values(), reverse=True)[:5]
    assert all(pairs[(g["true"], g["predicted"])] == g["count"] for g in got)
    conf = wide.max(1)
    ea = m["error_analysis"]
    assert ea["confidence_correct"]["mean"] == pytest.approx(conf[pred == labels].mean())
    assert ea["confidence_wrong"]["median"] == pytest.approx(np.median(conf[pred != labels]))
    assert ea["confidence_correct"]["count"] + ea["confidence_wrong"]["count"] == 400
