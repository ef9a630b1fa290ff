"""`jaxvit export` of a classification run writes D/classifier/, a transformers DINOv2 image classifier with its
image processor: transformers.pipeline("image-classification") on real PNG / JPEG files (odd sizes, so resize
and crop matter) returns jaxvit predict's probabilities."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from jaxvit import export, run_io
from jaxvit.predict import Predictor
from jaxvit.train import Trainer


def _images(directory, n=6):
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate([(50, 37), (37, 61), (45, 45), (64, 39), (33, 70), (41, 52)][:n]):
        x = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        x[h // 4: h // 2, w // 3: w // 2] = 255 * (i % 2)  # some structure for the model to respond to
        path = directory / (f"img{i}.png" if i % 2 else f"img{i}.jpg")
        Image.fromarray(x).save(path, quality=92)
        paths.append(path)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("arch,pool", [("dinov2_vits14", "cls_mean"), ("dinov2_vits14_reg", "cls")])
def test_pipeline_matches_jaxvit_predict(arch, pool, gz2_dir, tmp_path):
    from transformers import pipeline
    c = tiny_config(gz2_dir)
    c.model.arch, c.model.pool = arch, pool
    if arch.endswith("_reg"):
        c.model.overrides.num_registers = 4
    c.data.crop_ratio = 0.875  # resize the shorter side to 37, then centre-crop 32
    c.train.steps, c.train.epochs, c.optim.lr = 3, 0, 1e-2
    c.eval.val_split, c.eval.test_split, c.eval.test_checkpoint = "", "", "final"
    workdir = tmp_path / "run"
    Trainer(c, workdir).run()
    out = export.export_run(run_io.load_run(workdir, "final"), tmp_path / "export")

    d = out / "classifier"
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == [("Dinov2WithRegistersForImageClassification" if arch.endswith("_reg")
                                        else "Dinov2ForImageClassification")]
    paths = _images(tmp_path)
    predictor = Predictor.from_workdir(workdir, "final")
    assert list(config["id2label"].values()) == predictor.task.classes
    want = predictor.predict_batch(paths)
    got = pipeline("image-classification", model=str(d), device="cpu")([str(p) for p in paths], top_k=5)
    spread = np.ptp([list(w["probabilities"].values()) for w in want], axis=0).max()
    print("largest spread of a class probability over the images", spread)
    assert spread > 1e-2  # the images get different outputs, so 1e-4 agreement is a real check
    for w, g in zip(want, got):
        assert g[0]["label"] == w["class"]
        probs = {r["label"]: r["score"] for r in g}
        diff = max(abs(probs[k] - v) for k, v in w["probabilities"].items())
        print(w["path"], w["class"], "largest probability difference", diff)
        assert diff <= 1e-4
