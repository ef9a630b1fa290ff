"""Evaluators declared in the config (jaxvit.evals): the config checks, and a tiny training run that runs each
evaluator on its own schedule, logs it under its name and keeps the best checkpoint by a k-NN metric."""
import csv
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from jaxvit import checkpoint, config, evals, run_io
from jaxvit.errors import ConfigError


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every TensorBoard event file under logdir (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2
    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_a_config_without_evals_gets_the_tasks_own_metrics_on_val(tmp_path):
    c = tiny_config(tmp_path)
    assert {n: (e.kind, e.split, e.every_steps) for n, e in evals.declared(c).items()} == {"val": ("task", "val", 0)}
    c.eval.val_split, c.eval.test_checkpoint = "", "final"
    assert evals.declared(c) == {}
    s = tiny_config(tmp_path, "ssl")
    assert {n: e.kind for n, e in evals.declared(s).items()} == {"val": "task", "attention": "attention"}


@pytest.mark.parametrize("spec, best, message", [
    (dict(type="knnn"), "", "evals.e.type='knnn': use one of 'task', 'knn'"),
    (dict(type="knn", split="valid"), "", "evals.e.split='valid': not a split of this config; use one of 'test', "
                                          "'train', 'val'"),
    (dict(type="linear_probe", train_split="extra"), "", "evals.e.train_split='extra': not a split"),
    (dict(type="knn", every_steps=-5), "", "evals.e.every_steps=-5: must be an integer >= 0"),
    (dict(type="knn", every_steps=2.5), "", "evals.e.every_steps=2.5: must be an integer >= 0"),
    (dict(type="attention", size=3), "", "evals.e.size: not a key of a 'attention' evaluator"),
    (dict(type="knn", k=0), "", "evals.e.k=0: must be an integer >= 1"),
    (dict(type="robustness", corruptions=("fog",)), "", "evals.e.corruptions: unknown ['fog']"),
    (dict(type="knn"), "e/loss", "checkpoint.best_metric='e/loss': evaluator 'e' reports e/accuracy, e/f1_macro"),
    (dict(type="knn"), "knn/accuracy", "checkpoint.best_metric='knn/accuracy': no evaluator is named 'knn'"),
    (dict(type="knn"), "", "checkpoint.best_metric='val/accuracy': no evaluator is named 'val'"),
])
def test_bad_evaluators_are_named(tmp_path, spec, best, message):
    c = tiny_config(tmp_path)
    c.evals.e = spec
    c.checkpoint.best_metric = best
    with pytest.raises(ConfigError) as e:
        config.validate(c)
    assert message in str(e.value), str(e.value)


def test_more_best_metrics_are_checked_like_the_best_metric(tmp_path):
    c = tiny_config(tmp_path)
    c.checkpoint.also_best = ("val/f1_macro", "val/loss:min")
    assert config.problems(c) == []
    c.checkpoint.also_best = ("val/f1", "knn/accuracy", "val/loss:down")
    found = "\n".join(config.problems(c))
    assert "checkpoint.also_best='val/f1': evaluator 'val' reports val/loss, val/accuracy, val/f1_macro" in found
    assert "checkpoint.also_best='knn/accuracy': no evaluator is named 'knn'" in found
    assert "checkpoint.also_best: val/loss:down: the direction after ':' is max or min" in found


def test_evaluators_on_tasks_that_cannot_have_them(tmp_path):
    c = tiny_config(tmp_path, "regression")
    c.evals.val = dict(type="task")
    c.evals.knn = dict(type="knn")
    c.evals.rob = dict(type="robustness")
    found = "\n".join(config.problems(c))
    assert "evals.knn.type='knn': the regression task has no class labels" in found
    assert "evals.rob.type='robustness': measures a classifier's accuracy" in found


@pytest.mark.slow  # a Trainer run (~1 min on 2 CPU cores)
def test_declared_evaluators_run_on_their_schedules(gz2_dir, tmp_path):
    """2 epochs of 5 steps; the task's metrics each epoch, k-NN every 3 steps, a linear probe, a corruption and
    attention maps at the epochs; every evaluator at the end. The best checkpoint follows knn/accuracy."""
    c = tiny_config(gz2_dir)
    c.evals.val = dict(type="task")
    c.evals.knn = dict(type="knn", every_steps=3, k=5)
    c.evals.probe = dict(type="linear_probe", l2=(1e-3,), steps=10)
    c.evals.attn = dict(type="attention", images=2)
    c.evals.rob = dict(type="robustness", corruptions=("contrast",), severities=(5,))
    c.checkpoint.best_metric = "knn/accuracy"
    c.checkpoint.also_best = ("val/loss:min", "probe/accuracy")
    from jaxvit.train import Trainer
    Trainer(c, tmp_path / "run").run()
    rows = list(csv.DictReader((tmp_path / "run" / "training_history.csv").open()))
    assert [int(r["step"]) for r in rows] == [3, 5, 6, 9, 10]
    has = lambda col: [int(r["step"]) for r in rows if r[col] != ""]
    assert has("knn_accuracy") == has("knn_f1_macro") == [3, 6, 9, 10]
    assert has("val_accuracy") == has("val_loss") == has("probe_accuracy") == has("rob_mean_contrast") == [5, 10]
    for r in rows[1::3]:  # the same weights and split: the clean accuracy under corruptions is the task's accuracy
        assert float(r["rob_clean"]) == pytest.approx(float(r["val_accuracy"]))
    assert not any(k.startswith("attn_") for k in rows[0])  # attention maps have no metrics

    knn = {int(r["step"]): float(r["knn_accuracy"]) for r in rows if r["knn_accuracy"]}
    best_step = next(s for s, v in knn.items() if v == max(knn.values()))  # the first of the best
    assert run_io.load_run(tmp_path / "run", "best").step == best_step
    # The other bests (checkpoint.also_best), each in its direction: the first step of the lowest / highest value.
    loss = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    probe = {int(r["step"]): float(r["probe_accuracy"]) for r in rows if r["probe_accuracy"]}
    assert checkpoint.read(tmp_path / "run", "best_val_loss").step == min(loss, key=loss.get)
    assert checkpoint.read(tmp_path / "run", "best_probe_accuracy").step == max(probe, key=probe.get)
    assert checkpoint.read(tmp_path / "run", "best_knn_accuracy").step == best_step
    # The task's columns also under the GZ2 DINOv3 project's names; the other evaluators' are not renamed.
    assert all(r["val_acc"] == r["val_accuracy"] and r["val_f1"] == r["val_f1_macro"] for r in rows)
    assert all(r["train_acc"] == r["train_accuracy"] != "" for r in rows)
    assert not {"knn_acc", "probe_acc", "knn_f1"} & set(rows[0])

    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert sorted(scalars["knn/accuracy"]) == [3, 6, 9, 10]
    assert sorted(scalars["val/accuracy"]) == sorted(scalars["probe/accuracy"]) == [5, 10]
    assert scalars["knn/accuracy"][6] == pytest.approx(knn[6])
    assert sorted(scalars["eval/train_loss"]) == [3, 5, 6, 9, 10]
    assert (tmp_path / "run" / "attn_val.png").stat().st_size > 0

    # The loop's k-NN is the k-NN of the saved best weights (the one implementation in jaxvit.evals).
    run = run_io.load_run(tmp_path / "run", "best")
    from jaxvit import inference
    mesh = inference.run_mesh(run.cfg)
    again = evals.declared(run.cfg)["knn"].run(run.task, run.model, inference.place(run.variables, mesh, run.cfg),
                                               mesh, None)
    assert again["accuracy"] == pytest.approx(knn[best_step])
    assert 0 <= again["f1_macro"] <= 1 and again["train_examples"] == 40 and again["examples"] == 15
    np.testing.assert_allclose(again["accuracy"], max(knn.values()))
