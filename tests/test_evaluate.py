"""Evaluation, prediction, probes and robustness on the session's finished LoRA run (conftest `lora_run`): files
on disk, orbax checkpoints, scikit-learn and PyTorch as the references."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import traverse_util
from PIL import Image
from scipy import ndimage
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from transformers import Dinov2Model

from helpers.tiny import ROOT, set_best_step
from helpers.torch_models import tiny_hf_dinov2
from jaxvit import checkpoint, evaluate, inference, optim, predict, probe, robustness, run_io
from jaxvit.demos import write_digits
from jaxvit.evals import knn, linear
from jaxvit.data.pipeline import default_data_config
from jaxvit.data.sources import ImageFolder, load_image
from jaxvit.data.transforms import TransformConfig, eval_transform
from jaxvit.models import load_pretrained
from jaxvit.tasks import classification

REPORT_FILES = ("results.json", "confusion_matrix.png", "confusion_matrix_raw.png", "per_class_metrics.png",
                "predictions.csv")


def read_predictions(path: Path, classes: list[str]):
    rows = list(csv.DictReader(path.open()))
    y = np.array([classes.index(r["true"]) for r in rows])
    pred = np.array([classes.index(r["predicted"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return rows, y, pred, probs


def classes_of(workdir: Path) -> list[str]:
    return json.loads((workdir / "classes.json").read_text())


def history(workdir: Path) -> list[dict]:
    return list(csv.DictReader((workdir / "training_history.csv").open()))


def assert_png_not_blank(path: Path):
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert min(pixels.shape[:2]) > 100
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # text, cells, colour bar: not a flat image


@pytest.mark.integration
def test_evaluate_cli_writes_report_that_agrees_with_sklearn(lora_run, tmp_path):
    workdir, _ = lora_run
    out = tmp_path / "eval"
    result = evaluate.main([f"--workdir={workdir}", "--split=test", f"--output_dir={out}", "--batch_size=4"])
    for name in REPORT_FILES:
        assert (out / f"test_{name}").exists(), name
    for name in REPORT_FILES[1:4]:
        assert_png_not_blank(out / f"test_{name}")
    assert_png_not_blank(workdir / "training_curves.png")

    classes = classes_of(workdir)
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
    # float32 softmax rows sum to 1 only to ~1e-7; sklearn's log_loss would warn and renormalise them.
    assert saved["loss"] == pytest.approx(skm.log_loss(y, probs / probs.sum(1, keepdims=True), labels=labels),
                                          rel=1e-6)
    assert saved["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        assert saved["per_class"][c] == pytest.approx(dict(precision=p[i], recall=r[i], f1=f[i], support=s[i]))
    # ECE, written out: 15 equal-width confidence bins, |accuracy - mean confidence| weighted by bin size.
    conf, bins = probs.max(1), np.clip(np.ceil(probs.max(1) * 15).astype(int) - 1, 0, 14)
    ece = sum(abs((pred == y)[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert saved["ece"] == pytest.approx(ece)
    # The end-of-training test evaluation used the same (best) checkpoint, restored another way.
    at_end = json.loads((workdir / "eval_test" / "test_results.json").read_text())
    assert at_end["accuracy"] == saved["accuracy"] and at_end["loss"] == pytest.approx(saved["loss"], rel=1e-6)
    best_step = checkpoint.read(workdir, "best").step
    assert saved["models"] == [{"workdir": str(workdir), "checkpoint": f"best/{best_step}", "ema": True}]
    assert saved["split"] == "test"


@pytest.mark.integration
def test_ensemble_averages_probabilities(lora_run, tmp_path):
    """An ensemble of the run and a copy whose `best` is an earlier resume point: the mean of their probabilities."""
    workdir, _ = lora_run
    classes = classes_of(workdir)
    best_step = checkpoint.read(workdir, "best").step
    other = next(s for s in checkpoint.steps(workdir) if s != best_step)
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_*"))
    set_best_step(copy, other)
    single = read_predictions(workdir / "eval_test" / "test_predictions.csv", classes)
    evaluate.main([f"--workdir={copy}", f"--output_dir={tmp_path / 'copy_eval'}"])
    member = read_predictions(tmp_path / "copy_eval" / "test_predictions.csv", classes)
    assert np.abs(member[3] - single[3]).max() > 1e-4  # two different members

    result = evaluate.main([f"--workdir={workdir}", f"--workdir={copy}", "--checkpoint=best"])
    out = workdir / "eval_test_ensemble"  # the default: next to the first member's own evaluation
    try:
        rows, y, pred, probs = read_predictions(out / "test_predictions.csv", classes)
        saved = json.loads((out / "test_results.json").read_text())
    finally:
        shutil.rmtree(out)  # the shared run stays as the fixture made it
    assert [r["path"] for r in rows] == [r["path"] for r in single[0]]
    np.testing.assert_allclose(probs, (single[3] + member[3]) / 2, atol=1e-6)
    assert result["accuracy"] == saved["accuracy"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
    assert [m["checkpoint"] for m in result["models"]] == [f"best/{best_step}", f"best/{other}"]


@pytest.mark.integration
def test_load_run_restores_the_ema_weights_of_a_checkpoint(lora_run):
    workdir, cfg = lora_run
    step = max(checkpoint.steps(workdir))
    by_name = run_io.load_run(workdir, "final")
    by_step = run_io.load_run(workdir, step)  # a step number
    assert by_name.checkpoint == f"final/{step}" and by_step.checkpoint == f"step/{step}"
    assert by_step.step == by_name.step == step and by_name.ema and by_step.ema
    # The reference: the stored (lean) train state read with orbax directly; the LoRA base, not stored, equals
    # the pretrained weights it came from.
    mngr = ocp.CheckpointManager(workdir / "checkpoints")
    full = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    want = {"/".join(k): v for k, v in traverse_util.flatten_dict(optim.combine(full["ema"], full["frozen"])).items()}
    base = {"params/backbone/" + "/".join(k): v for k, v in traverse_util.flatten_dict(
        load_pretrained(cfg.model.pretrained)[1]).items()}
    assert not want.keys() & base.keys()
    for run in (by_name, by_step):
        got = {"/".join(k): v for k, v in traverse_util.flatten_dict(run.variables).items()}
        assert got.keys() == want.keys() | base.keys()
        for k, v in {**want, **base}.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    ema_head, raw_head = (full[k]["params"]["head"]["out"]["kernel"] for k in ("ema", "trainable"))
    assert np.abs(ema_head - raw_head).max() > 0  # EMA weights, not the raw ones
    # "best" is the evaluation with the highest val accuracy (the first of equals).
    rows = history(workdir)
    acc = [float(r["val_accuracy"]) for r in rows]
    assert run_io.load_run(workdir, "best").step == int(rows[int(np.argmax(acc))]["step"])
    for missing, message in (("best_val_loss", "no checkpoint 'best_val_loss'.*available: .*best_val_accuracy 15"),
                             ("newest", "use best, final, latest, best_<evaluator>_<metric> or a step"),
                             (999, "available: steps .*final")):
        with pytest.raises(FileNotFoundError, match=message):
            checkpoint.read(workdir, missing)


@pytest.mark.integration
def test_predict_cli_directory_with_corrupt_file(lora_run, tmp_path):
    workdir, _ = lora_run
    classes = classes_of(workdir)
    rows, _, _, probs = read_predictions(workdir / "eval_test" / "test_predictions.csv", classes)
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for i, r in enumerate(rows[:4]):
        shutil.copy(r["path"], images / ("nested" if i % 2 else "") / f"img{i}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out_csv = tmp_path / "out" / "preds.csv"
    results = predict.main([f"--workdir={workdir}", f"--image_dir={images}", f"--output={out_csv}",
                            "--batch_size=3", f"--attention_dir={tmp_path / 'attention'}", "--attention_max=2"])
    written = list(csv.DictReader(out_csv.open()))
    assert sorted(Path(r["path"]).name for r in written) == [f"img{i}.png" for i in range(4)]
    for r in written:
        i = int(Path(r["path"]).stem[3:])
        np.testing.assert_allclose([float(r[f"prob_{c}"]) for c in classes], probs[i], atol=1e-5)
        assert r["predicted"] == classes[int(probs[i].argmax())]
    bad = list(csv.DictReader((tmp_path / "out" / "preds_unreadable.csv").open()))
    assert [Path(b["path"]).name for b in bad] == ["corrupt.png"] and bad[0]["reason"]
    assert sum("error" in r for r in results) == 1
    overlays = sorted((tmp_path / "attention").glob("*.png"))
    assert len(overlays) == 2
    assert_png_not_blank(overlays[0])

    # One image: a JSON record naming the weights used.
    out_json = tmp_path / "one.json"
    predict.main([f"--workdir={workdir}", f"--image={rows[0]['path']}", f"--output={out_json}"])
    one = json.loads(out_json.read_text())
    assert one["class"] == classes[int(probs[0].argmax())] and one["class_index"] == int(probs[0].argmax())
    assert one["confidence"] == pytest.approx(probs[0].max(), abs=1e-5)
    np.testing.assert_allclose([one["probabilities"][c] for c in classes], probs[0], atol=1e-5)
    best_step = checkpoint.read(workdir, "best").step
    assert one["model"] == {"workdir": str(workdir), "checkpoint": f"best/{best_step}", "ema": True}


@pytest.mark.slow
def test_predict_as_a_module(lora_run, tmp_path):
    """`python -m jaxvit.predict` in a fresh process writes what the in-process call writes."""
    workdir, _ = lora_run
    classes = classes_of(workdir)
    rows, _, _, probs = read_predictions(workdir / "eval_test" / "test_predictions.csv", classes)
    out_json = tmp_path / "one.json"
    subprocess.run([sys.executable, "-m", "jaxvit.predict", f"--workdir={workdir}", f"--image={rows[0]['path']}",
                    f"--output={out_json}"], cwd=ROOT, check=True, capture_output=True)
    one = json.loads(out_json.read_text())
    assert one["class"] == classes[int(probs[0].argmax())]
    np.testing.assert_allclose([one["probabilities"][c] for c in classes], probs[0], atol=1e-5)


@pytest.mark.integration
def test_predictor_api(lora_run, gz2_dir):
    workdir, _ = lora_run
    p = predict.Predictor.from_workdir(workdir, "best", batch_size=4)
    path = next((gz2_dir / "gz2_5class_test" / "spiral").glob("*.png"))
    by_path = p.predict(path)
    with Image.open(path) as im:
        by_pil = p.predict(im)
        by_array = p.predict(np.asarray(im.convert("RGB")))
    assert by_path["path"] == str(path) and by_pil["class"] == by_path["class"] == by_array["class"]
    assert by_pil["probabilities"] == pytest.approx(by_path["probabilities"], abs=1e-6)
    assert sum(by_path["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # The same numbers as the end-of-run evaluation of this checkpoint.
    classes = classes_of(workdir)
    rows, _, _, probs = read_predictions(workdir / "eval_test" / "test_predictions.csv", classes)
    i = [r["path"] for r in rows].index(str(path))
    np.testing.assert_allclose([by_path["probabilities"][c] for c in classes], probs[i], atol=1e-5)
    # Lower-level entry points: outputs of preprocessed images, raw outputs or the reason for each input.
    x = np.stack([p.preprocess(r["path"]) for r in rows[:6]])  # 6 rows: two padded batches of 4
    np.testing.assert_allclose(p.outputs(x), probs[:6], atol=1e-5)
    raw = p.raw_outputs([path, "/no/such/file.png"])
    assert isinstance(raw[1], str) and np.allclose(raw[0], probs[i], atol=1e-5)
    batch = p.predict_batch([path, "/no/such/file.png", path])
    assert "error" in batch[1] and batch[0]["probabilities"] == pytest.approx(batch[2]["probabilities"])
    bench = p.benchmark(8)
    assert (bench["batch_size"], bench["images"]) == (4, 8) and np.isfinite(bench["images_per_s"])
    maps = p.attention_maps(x[:1])
    cfg = p.model.backbone
    assert maps.shape == (1, cfg.num_heads, 32 // cfg.patch_size, 32 // cfg.patch_size)
    assert (maps >= 0).all() and (maps.sum(axis=(2, 3)) <= 1 + 1e-5).all()  # CLS row, patch columns only
    assert (maps.sum(axis=(2, 3)) < 1 - 1e-6).all()  # the CLS key itself takes a share


@pytest.mark.integration
def test_probe_on_a_backbone_without_fine_tuning(gz2_dir, tmp_path, capsys):
    hf = tiny_hf_dinov2(tmp_path / "hf")
    out = tmp_path / "probe.json"
    result = probe.main([f"--data_dir={gz2_dir}", f"--pretrained={hf}", "--image_size=32", "--crop_ratio=1",
                         "--num_workers=0", "--k=1,3", "--l2=1e-4,1e-2", "--steps=100", f"--output={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    md = (tmp_path / "probe.md").read_text()
    assert md == probe.table(result) + "\n" and md.startswith(f"Embedding study of pretrained {hf}: folder split test")
    got = {(r["method"], r["pool"], r.get("k")) for r in result["results"]}
    assert got == {(m, pool, k) for pool in ("cls", "cls_mean") for m, k in
                   (("k-NN", 1), ("k-NN", 3), ("linear probe", None))}
    lin = [r for r in result["results"] if r["method"] == "linear probe"]
    assert all(set(r["sweep"]) == {1e-4, 1e-2} for r in lin)  # chosen on the val split
    assert result["splits"]["eval"] == {"split": "test", "images": 15}
    assert "| k-NN (k=3, cosine, T=0.07) | cls |" in capsys.readouterr().out

    # The features are the transformers model's (pooler output ++ mean patch token), and 1-NN on them is
    # scikit-learn's cosine 1-NN.
    vit, params = load_pretrained(hf)
    data = default_data_config()
    data.data_dir, data.image_size, data.crop_ratio, data.num_workers = str(gz2_dir), 32, 1.0, 0
    mesh = inference.run_mesh()
    feats, labels = {}, {}
    for split in ("train", "test"):
        src = ImageFolder(gz2_dir, split)
        f, ok = probe.extract_features(vit, {"params": params}, src, data, inference.round_batch(8, mesh), mesh)
        assert ok.all() and f.shape == (len(src), 64)
        feats[split], labels[split] = f, src.labels
    src = ImageFolder(gz2_dir, "test")
    x = np.stack([eval_transform(load_image(q), TransformConfig.from_config(data)) for q in src.paths])
    with torch.no_grad():
        o = Dinov2Model.from_pretrained(hf).eval()(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
    want = torch.cat([o.pooler_output, o.last_hidden_state[:, 1:].mean(1)], -1).numpy()
    np.testing.assert_allclose(feats["test"], want, atol=1e-4 * np.abs(want).max())
    for pool in ("cls", "cls_mean"):
        knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(probe.pooled(feats["train"], pool),
                                                                       labels["train"])
        row = next(r for r in result["results"] if (r["method"], r["pool"], r.get("k")) == ("k-NN", pool, 1))
        assert row["accuracy"] == pytest.approx(knn.score(probe.pooled(feats["test"], pool), labels["test"]))


@pytest.mark.integration
def test_probe_of_a_run_scores_its_own_head_as_evaluate_does(lora_run):
    """--workdir: the run's (LoRA, unmerged) backbone gives the features on the run's own data and splits; its own
    head on them scores exactly what the end-of-run evaluation of the same checkpoint scored. The report lands
    in W/probe/, next to the eval reports."""
    workdir, _ = lora_run
    result = probe.main([f"--workdir={workdir}", "--num_workers=0", "--k=1", "--l2=1e-2", "--steps=10",
                         "--pool=cls_mean"])
    best_step = checkpoint.read(workdir, "best").step
    assert result["backbone"] == {"workdir": str(workdir), "checkpoint": f"best/{best_step}", "ema": True}
    assert result["classes"] == classes_of(workdir)
    assert {r: s["split"] for r, s in result["splits"].items()} == {"train": "train", "eval": "test", "val": "val"}
    assert json.loads((workdir / "probe" / "probe_results.json").read_text()) == json.loads(json.dumps(result))
    md = (workdir / "probe" / "probe_results.md").read_text()
    assert md.startswith(f"Embedding study of run {workdir}, checkpoint best/{best_step} (EMA weights): folder split")
    assert "| fine-tuned head | cls_mean |" in md
    head = next(r for r in result["results"] if r["method"] == "fine-tuned head")
    at_end = json.loads((workdir / "eval_test" / "test_results.json").read_text())
    assert head["pool"] == "cls_mean"
    assert (head["accuracy"], head["f1_macro"]) == pytest.approx((at_end["accuracy"], at_end["f1_macro"]))


@pytest.mark.integration
def test_probe_on_an_npz_source_with_a_random_backbone(tmp_path):
    """The seed's protocol (k=3, cosine, CLS and CLS + mean patch) on real digits read through the npz source: a
    random-init tiny ViT's features already separate them well above chance (10%); seeds 0-3 gave k-NN 0.35-0.47
    and linear probes 0.60-0.69 here. A val split that does not exist: the L2 penalty is not swept."""
    write_digits(tmp_path / "digits")
    result = probe.main(["--arch=dinov2_vits14", "--override=patch_size=8,hidden_size=32,depth=2,num_heads=2,"
                         "mlp_hidden=64,pos_grid=4", "--image_size=32", "--crop_ratio=1", "--source=npz",
                         f"--data_dir={tmp_path / 'digits'}", "--val_split=holdout", "--num_workers=0", "--k=3",
                         "--l2=1e-4,1e-3,1e-2", "--steps=50", f"--output={tmp_path / 'out' / 'probe.json'}"])
    assert result["data"] == {"source": "npz", "location": str(tmp_path / "digits" / "test.npz")}
    assert result["classes"] == [str(c) for c in range(10)]
    assert result["splits"] == {"train": {"split": "train", "images": 1078}, "eval": {"split": "test", "images": 359}}
    rows = {(r["method"], r["pool"]): r for r in result["results"]}
    assert set(rows) == {(m, pool) for m in ("k-NN", "linear probe") for pool in ("cls", "cls_mean")}
    for pool in ("cls", "cls_mean"):
        assert rows["k-NN", pool]["k"] == 3 and rows["k-NN", pool]["accuracy"] > 0.25
        assert rows["linear probe", pool]["accuracy"] > 0.45
        assert (rows["linear probe", pool]["l2"], rows["linear probe", pool]["sweep"]) == (1e-3, {})
    assert (tmp_path / "out" / "probe.md").read_text().startswith(
        "Embedding study of dinov2_vits14 randomly initialised (seed 0, patch_size=8,")


def test_knn_and_linear_probe_match_references():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8))
    y = rng.integers(0, 3, 60)
    x = centres[y] + rng.standard_normal((60, 8))
    train, test, y_train = x[:40], x[40:], y[:40]
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = unit(test) @ unit(train).T
    for temperature in (0.0, 0.1):  # the one k-NN (jaxvit.evals.knn: the loop's evaluator, probe, the ssl task)
        got = knn.knn_predict(train, y_train, test, [1, 5], temperature, 3)
        shares = knn.knn_votes(train, y_train, test, [1, 5], temperature, 3)
        for k in (1, 5):
            nn = np.argsort(-sim, axis=1)[:, :k]
            weights = np.exp(np.take_along_axis(sim, nn, 1) / temperature) if temperature else np.ones(nn.shape)
            votes = np.stack([(weights * (y_train[nn] == c)).sum(1) for c in range(3)], 1)
            np.testing.assert_array_equal(got[k], votes.argmax(1))
            np.testing.assert_allclose(shares[k], votes / votes.sum(1, keepdims=True), rtol=1e-5)
    # Logistic regression: mean CE + l2 |W|^2 is sklearn's objective with C = 1 / (2 N l2).
    l2 = 1e-2
    params = linear.fit_logistic(train.astype(np.float32), y_train, l2, 3, steps=200)
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


@pytest.mark.integration
def test_robustness_cli(lora_run, tmp_path):
    workdir, _ = lora_run
    result = robustness.main([f"--workdir={workdir}", "--corruptions=gaussian_noise,contrast", "--severities=1,5",
                              f"--output_dir={tmp_path}"])
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["accuracy"] == {c: {"1": result["accuracy"][c][1], "5": result["accuracy"][c][5]}
                                 for c in ("gaussian_noise", "contrast")}
    clean = json.loads((workdir / "eval_test" / "test_results.json").read_text())["accuracy"]
    assert saved["clean"] == pytest.approx(clean)
    for c in ("gaussian_noise", "contrast"):
        assert saved["mean"][c] == pytest.approx(np.mean(list(saved["accuracy"][c].values())))
        assert saved["drop"][c] == pytest.approx(clean - saved["mean"][c])
    table = (tmp_path / "robustness.md").read_text()
    assert "| Corruption | s1 | s5 | Mean | vs clean |" in table and "| contrast |" in table

    # The corrupted forward pass, by hand: un-normalise, corrupt with the per-image key of the image's dataset
    # index, re-normalise, classify.
    run = run_io.load_run(workdir)
    d, src = run.cfg.data, run.task.source("test")
    mean, std = np.asarray(d.mean, np.float32), np.asarray(d.std, np.float32)
    x = np.stack([eval_transform(load_image(q), TransformConfig.from_config(d)) for q in src.paths])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(len(src)))
    mesh = inference.run_mesh(run.cfg)
    variables = inference.place(run.variables, mesh, run.cfg)
    for name, severity in (("gaussian_noise", 1), ("contrast", 5)):
        s = robustness.SEVERITY[name][severity - 1]
        xc = (np.asarray(robustness.corrupt(jnp.asarray(x * std + mean), name, s, keys)) - mean) / std
        want = np.asarray(classification.probabilities(run.model, run.variables, xc))
        fn = robustness.corrupted_probs(run.task, run.model, d.mean, d.std, name)
        probs, ok = inference.map_source(fn, (variables, np.float32(s)), src, run.task.eval_transform(), d,
                                         run.cfg.eval.batch_size, mesh)
        assert ok.all()
        np.testing.assert_allclose(probs, want, atol=1e-5)
        assert result["accuracy"][name][severity] == pytest.approx(skm.accuracy_score(src.labels, probs.argmax(1)))


# ------------------------------------------------------------------------------------------- test-time augmentation

def _test_images(run) -> tuple[object, np.ndarray]:
    """The test split and its eval-transformed images [N, S, S, 3], preprocessed here on the host."""
    src = run.task.source("test")
    return src, np.stack([eval_transform(load_image(q), TransformConfig.from_config(run.cfg.data)) for q in src.paths])


@pytest.mark.integration
def test_tta_averages_probabilities_over_flipped_images(lora_run, tmp_path):
    """hflip: the mean of the probabilities of the images and of the images flipped in numpy; the same through
    `Predictor` with tta= and `predict --tta`; crops5 views are corner / centre crops resized back."""
    from jaxvit import tta
    workdir, _ = lora_run
    run = run_io.load_run(workdir)
    src, x = _test_images(run)
    plain = np.asarray(classification.probabilities(run.model, run.variables, x))
    flipped = np.asarray(classification.probabilities(run.model, run.variables, np.ascontiguousarray(x[:, :, ::-1])))
    got = np.asarray(classification.tta_probabilities(run.model, run.variables, x, ("hflip",)))
    np.testing.assert_allclose(got, (plain + flipped) / 2, atol=1e-6)
    assert np.abs(got - plain).max() > 1e-4  # the flip changes the outputs of this model
    p = predict.Predictor.from_workdir(workdir, batch_size=8, tta=("hflip",))
    np.testing.assert_allclose(p.outputs(x), (plain + flipped) / 2, atol=1e-6)
    predict.main([f"--workdir={workdir}", f"--image={src.paths[0]}", f"--output={tmp_path / 'one.json'}",
                  "--tta=hflip"])
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["tta"] == ["hflip"]
    np.testing.assert_allclose(list(one["probabilities"].values()), got[0], atol=1e-6)

    views = tta.views(jnp.asarray(x), ("crops5",))
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    np.testing.assert_allclose(views[2], jax.image.resize(x[:, :28, 4:], x.shape, "cubic"), atol=1e-6)  # 7/8 of 32


@pytest.mark.integration
def test_evaluate_cli_tta_records_views_and_scores_averaged_probabilities(lora_run, tmp_path):
    workdir, _ = lora_run
    run = run_io.load_run(workdir)
    src, x = _test_images(run)
    views = [x, x[:, :, ::-1]] + [np.rot90(x, k, axes=(1, 2)) for k in (1, 2, 3)]
    want = np.mean([classification.probabilities(run.model, run.variables, np.ascontiguousarray(v))
                    for v in views], 0)
    result = evaluate.main([f"--workdir={workdir}", f"--output_dir={tmp_path}", "--tta=hflip,rot90"])
    saved = json.loads((tmp_path / "test_results.json").read_text())
    _, y, _, probs = read_predictions(tmp_path / "test_predictions.csv", classes_of(workdir))
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert saved["tta"] == result["tta"] == ["hflip", "rot90"]
    assert saved["accuracy"] == pytest.approx(skm.accuracy_score(src.labels, want.argmax(1)))
    plain = json.loads((workdir / "eval_test" / "test_results.json").read_text())
    assert plain["tta"] == []  # the run's own eval.tta, recorded by the end-of-training test


@pytest.mark.integration
def test_unknown_tta_view_is_a_one_line_config_error(lora_run, capsys):
    from jaxvit.config import validate
    from jaxvit.errors import ConfigError
    workdir, cfg = lora_run
    bad = cfg.copy_and_resolve_references()
    bad.eval.tta = ("hflip", "mirror")
    with pytest.raises(ConfigError) as e:
        validate(bad)
    assert str(e.value) == ("eval.tta=('hflip', 'mirror'): unknown view 'mirror'; "
                            "use any of hflip, vflip, rot90, crops5")
    with pytest.raises(SystemExit) as e:
        predict.main([f"--workdir={workdir}", f"--image={workdir}", "--output=x.json", "--tta=mirror"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown view 'mirror'" in err
