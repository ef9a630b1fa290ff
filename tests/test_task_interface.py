"""Every registered task through the whole interface on a tiny model: build + one training step + evaluation
(the Trainer), the run loaded back, prediction (`jaxvit.predict`), and the PyTorch export with its reload check,
or the task's one-line refusal."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from helpers.tiny import ROOT, TINY_VIT, tiny_config
from jaxvit import export, predict, run_io, tasks
from jaxvit.config import load_config_file
from jaxvit.data.sources import find_split_dir
from jaxvit.errors import UserError
from jaxvit.train import Trainer


def _regression_csvs(gz2_dir: Path, out: Path, splits: tuple[str, ...]) -> Path:
    """The GZ2 demo images as a regression set: target = the class index."""
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        images = sorted(p for p in find_split_dir(gz2_dir, split).rglob("*") if p.is_file())
        classes = sorted({p.parent.name for p in images})
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_path", "target"])
            w.writerows([str(p), classes.index(p.parent.name)] for p in images)
    return out


def config(name: str, gz2_dir: Path, data: Path):
    if name in ("classification", "regression", "biomass", "cell_distance"):
        c = tiny_config(gz2_dir, name)
    elif name == "ssl":
        c = tiny_config(gz2_dir, "ssl")
        s = c.ssl
        s.epoch_length = 0
        s.crops.global_size, s.crops.local_size, s.crops.n_local = 32, 16, 2
        for head in (s.dino, s.ibot):
            head.n_prototypes, head.hidden_dim, head.bottleneck_dim = 64, 32, 16
        s.knn.k, s.attention_images = 3, 2
    elif name == "sar_grounding":
        c = load_config_file(f"{ROOT}/configs/terramind_stage3.py:demo")
        c.data.image_size, c.data.num_workers = 32, 0
        c.sar_grounding.tokenizer, c.sar_grounding.fit_tokenizer_steps = "", 0  # random tokenizers
        c.sar_grounding.overrides.image_size = c.sar_grounding.tokenizer_overrides.image_size = 32
        c.train.batch_size = c.eval.batch_size = 2
        c.optim.warmup_steps = 0
    else:
        raise AssertionError(f"no tiny config for the task {name!r}: add one here")
    if name == "regression":
        c.data.data_dir = str(_regression_csvs(gz2_dir, data, (c.data.train_split, c.eval.val_split)))
    elif name in ("biomass", "cell_distance", "sar_grounding"):
        c.data.data_dir, c.data.demo = str(data), {"biomass": "pasture", "cell_distance": "cells",
                                                   "sar_grounding": "sar"}[name]
    if name == "biomass":
        c.cv.fold = 0  # the demo set is the Kaggle layout: validation is a fold of train.csv
    if name == "cell_distance":
        c.model.overrides.update(TINY_VIT, num_registers=0)
        c.cell_distance.decoder_channels = (16, 8, 8, 8)
        c.cell_distance.eval_size, c.cell_distance.tile_overlap = 96, 16  # the demo's sites are 96 px
    c.train.epochs, c.train.steps = 0, 1
    c.eval.test_split, c.eval.test_checkpoint = "", "final"
    return c


@pytest.mark.slow
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_builds_steps_evaluates_predicts_and_exports(name, gz2_dir, tmp_path):
    workdir = tmp_path / "run"
    result = Trainer(config(name, gz2_dir, tmp_path / "data"), workdir).run()
    assert result is not None
    history = list(csv.DictReader(open(workdir / "training_history.csv")))
    assert history and int(history[-1]["step"]) == 1

    run = run_io.load_run(workdir, "final")
    example = run.task.source(run.cfg.eval.val_split)[0]
    image = example.get("s1", example.get("path"))  # an S1 tile (sar_grounding), or an image file
    output = tmp_path / "predicted" / "prediction.json"  # a directory of files for tasks with image outputs
    records = predict.main([f"--workdir={workdir}", "--checkpoint=final", f"--image={image}", f"--output={output}"])
    assert records and "error" not in records[0], records
    assert json.loads(output.read_text()) if output.is_file() else any(output.iterdir())

    try:
        out = export.export_run(run, tmp_path / "export")
    except UserError as refusal:
        assert "\n" not in str(refusal) and run.task.name in str(refusal)
        return
    diffs = export.check_export(run, out)
    assert diffs and max(v for k, v in diffs.items() if not k.startswith("base_vs")) < 1e-4, diffs
