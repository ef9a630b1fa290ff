"""The training loop on tiny models and real files: LoRA, phases, layer-wise rates, accumulation, checkpoints,
resume, a second task through the same loop, and user mistakes that end in one line."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from PIL import Image

from helpers.processes import run_killed_and_resumed
from helpers.tiny import ROOT, TINY_VIT, tiny_config
from jaxvit import checkpoint, lora, optim, run_io, sharding, tasks
from jaxvit.config import base_config, problems
from jaxvit.models import get_config, load_pretrained
from jaxvit.models.heads import Classifier
from jaxvit.tasks.classification import Classification
from jaxvit.train import Trainer, init_state, make_step, phases


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def saved_state(workdir: Path, step: int | None = None) -> dict:
    """The train state of a resume point (default: the newest), read back from disk as numpy (a lean checkpoint's
    frozen weights filled from the run's source)."""
    return checkpoint.read(workdir, "latest" if step is None else step, run_io.source_of(workdir)).state


def history(workdir: Path) -> list[dict]:
    return list(csv.DictReader((Path(workdir) / "training_history.csv").open()))


# ------------------------------------------------------------------------------------------- LoRA and phases

@pytest.mark.integration
def test_lora_run_trains_adapters_and_head_only(lora_run):
    workdir, c = lora_run
    _, base = load_pretrained(c.model.pretrained)
    state = saved_state(workdir)
    frozen = flat(state["frozen"]["params"]["backbone"])
    assert frozen.keys() == flat(base).keys()
    for k, v in flat(base).items():
        np.testing.assert_array_equal(frozen[k], v, err_msg=k)  # the base is bit-identical
    opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
    assert not any("'backbone'" in p and "'params'" in p for p in opt_paths)  # no optimizer state for the base
    assert any("lora_a" in p for p in opt_paths)
    # Phase "head" (epoch 1) left the adapters at their start (B = 0); phase "all" trained them.
    rows = history(workdir)
    assert [r["phase"] for r in rows] == ["head", "all", "all"]
    at_switch = saved_state(workdir, int(rows[0]["step"]))  # saved just before the switch to phase "all"
    after_head = flat(optim.combine(at_switch["trainable"], at_switch["frozen"])["lora"])
    assert not any(v.any() for k, v in after_head.items() if k.endswith("lora_b"))
    assert np.abs(flat(state["trainable"]["lora"])["backbone/encoder/layer_0/attention/query/lora_b"]).max() > 0
    with pytest.raises(checkpoint.CheckpointError, match="is lean"):
        checkpoint.read(workdir, "best").variables()  # the frozen base is not stored: its source fills it
    best = checkpoint.read(workdir, "best", run_io.source_of(workdir))
    assert best.ema and set(best.variables()) == {"params", "lora"}
    assert (workdir / "eval_test" / "test_results.json").exists()


@pytest.mark.integration
def test_merged_lora_equals_unmerged_forward():
    cfg = get_config("dinov2_vits14", **TINY_VIT, lora_alpha=8.0)
    model = Classifier(cfg, 5)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    adapters = {"backbone": lora.init_adapters(params["backbone"], ("query", "value", "fc1"), 4, jax.random.key(2))}
    adapters = jax.tree_util.tree_map(lambda a: a + 0.1, adapters)  # B != 0 so the adapters matter
    unmerged = model.apply({"params": params, "lora": adapters}, x)
    merged_params = dict(params, backbone=lora.merge(params["backbone"], adapters["backbone"], 8.0))
    merged = model.apply({"params": merged_params}, x)
    plain = model.apply({"params": params}, x)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert np.abs(plain - unmerged).max() > 1e-3


def test_lora_targets_are_regexes_over_paths():
    assert lora.matches(("backbone", "encoder", "layer_3", "attention", "dense"), ["dense"])
    assert not lora.matches(("backbone", "encoder", "layer_3", "mlp", "fc1"), ["dense", "query"])
    assert lora.matches("backbone/encoder/layer_12/attention/key", [r".*/layer_1[2-9]/attention/(key|value)"])
    assert not lora.matches("backbone/encoder/layer_2/attention/key", [r".*/layer_1[2-9]/attention/(key|value)"])


def test_multi_transform_groups_get_configured_rates():
    c = base_config()
    c.optim.schedule, c.optim.warmup_ratio, c.optim.lr, c.optim.weight_decay, c.optim.grad_clip = (
        "constant", 0.0, 1e-2, 0.0, 0.0)
    c.optim.lr_mults = ((r"^params/backbone/encoder/layer_0/", 0.1), (r"^params/backbone/", 0.5))
    tree = {"params": {"backbone": {"encoder": {"layer_0": {"w": jnp.ones(3)}, "layer_1": {"w": jnp.ones(3)}},
                                    "embeddings": {"w": jnp.ones(3)}}, "head": {"w": jnp.ones(3)}}}
    tx, _, mults = optim.make_optimizer(c, tree, 100, depth=2)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3), tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    got = {k: float(-v[0]) for k, v in flat(updates).items()}
    # Adam's first step moves every coordinate by lr * multiplier.
    np.testing.assert_allclose(got["params/backbone/encoder/layer_0/w"], 1e-3, rtol=1e-4)
    np.testing.assert_allclose(got["params/backbone/encoder/layer_1/w"], 5e-3, rtol=1e-4)
    np.testing.assert_allclose(got["params/backbone/embeddings/w"], 5e-3, rtol=1e-4)
    np.testing.assert_allclose(got["params/head/w"], 1e-2, rtol=1e-4)
    # Layer decay multiplies in: block i gets decay ** (depth - i), embeddings decay ** (depth + 1).
    c.optim.lr_mults, c.optim.layer_decay = (), 0.5
    _, _, mults = optim.make_optimizer(c, tree, 100, depth=2)
    assert mults == {"params/backbone/encoder/layer_0/w": 0.25, "params/backbone/encoder/layer_1/w": 0.5,
                     "params/backbone/embeddings/w": 0.125, "params/head/w": 1.0}
    # A phase's own rules replace optim.lr_mults; its lr replaces optim.lr.
    tx, schedule, mults = optim.make_optimizer(c, tree, 100, depth=2, lr=1e-4, lr_mults=((r"head", 3.0),))
    assert mults["params/head/w"] == 3.0 and schedule(50) == pytest.approx(1e-4)


def test_trainable_rules():
    c = base_config()
    c.train.freeze_first_n_layers = 1
    every = optim.trainable_rule("all", c, r"^params/head/")
    head = optim.trainable_rule("head", c, r"^params/head/")
    assert not every("params/backbone/embeddings/cls_token")
    assert not every("params/backbone/encoder/layer_0/mlp/fc1/kernel")
    assert every("params/backbone/encoder/layer_1/mlp/fc1/kernel") and every("params/backbone/layernorm/scale")
    assert head("params/head/out/kernel") and not head("params/backbone/encoder/layer_1/mlp/fc1/kernel")
    c.lora.enabled = True
    every = optim.trainable_rule("all", c, r"^params/head/")
    assert every("lora/backbone/encoder/layer_0/attention/query/lora_a") and every("params/head/out/bias")
    assert not every("params/backbone/encoder/layer_1/mlp/fc1/kernel")
    regexes = optim.trainable_rule((r"layer_1/", r"^params/head/"), c, r"^params/head/")
    assert regexes("params/backbone/encoder/layer_1/mlp/fc1/kernel") and not regexes("params/backbone/layernorm/scale")
    c.lora.enabled = False
    kept = optim.trainable_rule("all", c, r"^params/head/", frozen=r"^params/depth/")
    assert kept("params/head/out/bias") and not kept("params/depth/neck/fusion_0/kernel")


def test_freeze_backbone_is_one_head_phase_and_excludes_the_other_shorthands(gz2_dir):
    c = tiny_config(gz2_dir, epochs=3)
    c.train.freeze_backbone = True
    assert [(p.name, p.trainable) for p in phases(c)] == [("head", "head")]
    c.train.stage1_epochs = 1
    assert any("freeze_backbone" in p for p in problems(c))


@pytest.mark.integration
def test_two_stage_full_fine_tuning_leaves_the_backbone_alone_in_stage_one(gz2_dir, tmp_path):
    c = tiny_config(gz2_dir, epochs=3, stage1_epochs=1)
    trainer = Trainer(c, tmp_path)
    backbone0 = flat(trainer.variables["params"]["backbone"])
    trainer.run()
    rows = history(tmp_path)
    assert [r["phase"] for r in rows] == ["head", "all", "all"]
    saved = saved_state(tmp_path, int(rows[0]["step"]))
    after1 = flat(optim.combine(saved["trainable"], saved["frozen"])["params"]["backbone"])
    for k in backbone0:
        np.testing.assert_array_equal(after1[k], backbone0[k])
    final = flat(saved_state(tmp_path)["trainable"]["params"]["backbone"])
    assert any(np.abs(final[k] - backbone0[k]).max() > 0 for k in backbone0)


@pytest.mark.integration
def test_step_based_phases_with_their_own_learning_rates(gz2_dir, tmp_path):
    """train.steps with phases of given steps and lr; evaluations every 3 steps; patience ends the last phase."""
    c = tiny_config(gz2_dir, steps=12)
    c.train.phases = (dict(name="head", trainable="head", steps=4, lr=5e-3),
                      dict(name="blocks", trainable=(r"layer_1/", r"^params/head/"), steps=4, lr=2e-3),
                      dict(name="all", lr=1e-3))
    c.optim.schedule = "constant"
    c.eval.every_steps = 3
    trainer = Trainer(c, tmp_path)
    start = flat(trainer.variables["params"])
    trainer.run()
    rows = history(tmp_path)
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    assert [r["phase"] for r in rows] == ["head", "blocks", "all", "all"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([5e-3, 2e-3, 1e-3, 1e-3])
    mid_blocks = saved_state(tmp_path, 6)  # in phase "blocks" (steps 4-8)
    after_blocks = flat(optim.combine(mid_blocks["trainable"], mid_blocks["frozen"])["params"])
    assert np.array_equal(after_blocks["backbone/encoder/layer_0/mlp/fc1/kernel"],
                          start["backbone/encoder/layer_0/mlp/fc1/kernel"])  # phase 2 trained layer_1 only
    assert not np.array_equal(after_blocks["backbone/encoder/layer_1/mlp/fc1/kernel"],
                              start["backbone/encoder/layer_1/mlp/fc1/kernel"])


@pytest.mark.integration
def test_phases_that_all_have_a_length_set_the_run_length(gz2_dir, tmp_path):
    c = tiny_config(gz2_dir, epochs=10)  # 5 steps per epoch
    c.train.phases = (dict(name="head", trainable="head", epochs=1), dict(name="all", steps=3))
    assert Trainer(c, tmp_path / "a").total_steps == 5 + 3
    c.train.phases = (dict(name="head", trainable="head", epochs=1), dict(name="all"))
    assert Trainer(c, tmp_path / "b").total_steps == 10 * 5  # the last phase runs to train.epochs


@pytest.mark.integration
def test_gradient_accumulation_equals_full_batch(gz2_dir):
    results = []
    for k in (1, 4):
        c = tiny_config(gz2_dir, grad_accum=k)
        task = tasks.create(c)
        model, variables = task.build(jax.random.key(0))
        rule = optim.trainable_rule("all", c, task.head)
        tx, schedule, _ = optim.make_optimizer(c, optim.split(variables, rule)[0], 10, 2)
        state, _ = init_state(c, variables, rule, tx, sharding.make_mesh(c.mesh))
        step = jax.jit(make_step(task, model, c, tx, schedule))
        batch = dict(image=jax.random.normal(jax.random.key(2), (8, 32, 32, 3)), label=jnp.arange(8) % 5)
        state, m = step(state, batch)
        results.append((flat(state["trainable"]), float(m["loss"]), float(m["accuracy"])))
    (p1, l1, a1), (p4, l4, a4) = results
    assert abs(l1 - l4) < 1e-5 and a1 == a4
    # Adam's first step is lr * g / |g| per coordinate: where g is ~0, float rounding of the two gradient sums
    # can move a coordinate by a visible fraction of lr (1e-3), so the bound is 2% of lr.
    for name in p1:
        np.testing.assert_allclose(p4[name], p1[name], rtol=1e-5, atol=2e-5, err_msg=name)


@pytest.mark.integration
def test_nonfinite_loss_stops_with_checkpoint_intact(gz2_dir, tmp_path):
    c = tiny_config(gz2_dir, epochs=2)
    c.optim.lr = 1e30  # diverges within a few steps
    c.optim.grad_clip = 0.0
    c.train.log_every_steps = 1
    c.checkpoint.every_steps = 1
    with pytest.raises(FloatingPointError, match="non-finite"):
        Trainer(c, tmp_path).run()
    saved = checkpoint.steps(tmp_path)
    assert saved
    for step in saved:  # what was saved is finite
        assert all(np.isfinite(v).all() for v in flat(saved_state(tmp_path, step)["trainable"]).values())


# ------------------------------------------------------------------------------------------- a second task

def write_disc_regression(root: Path, n: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """Images of one bright disc on noise; targets: its radius and its brightness (CSV per split)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, count in n.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = ["image_path,radius,brightness"]
        for i in range(count):
            r, b = rng.uniform(3, 12), rng.uniform(0.3, 1.0)
            cy, cx = rng.uniform(r, size - r, 2)
            img = rng.normal(0.1, 0.03, (size, size)) + b * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
            rgb = (np.clip(np.repeat(img[..., None], 3, -1), 0, 1) * 255).astype(np.uint8)
            Image.fromarray(rgb).save(root / split / f"{i}.png")
            rows.append(f"{split}/{i}.png,{r:.4f},{b:.4f}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.integration
def test_regression_task_through_the_same_loop(tmp_path):
    root = write_disc_regression(tmp_path / "data", {"train": 64, "val": 24, "test": 24})
    c = tiny_config(root, task="regression", epochs=8)
    c.regression.targets = ("radius", "brightness")
    c.data.aug.rotate_degrees, c.data.aug.color_jitter_prob, c.data.aug.crop_scale = 0.0, 0.0, (1.0, 1.0)
    c.optim.lr = 3e-3
    c.train.batch_size = 16
    result = Trainer(c, tmp_path / "run").run()
    rows = history(tmp_path / "run")
    assert {"val_r2", "val_rmse", "train_loss"} <= set(rows[0])
    r2 = [float(r["val_r2"]) for r in rows]
    assert max(r2) > 0.4 and r2[-1] > r2[0] + 0.3  # it learns the radius and brightness
    # The best checkpoint is the one with the highest val R^2, and evaluating it reproduces that value.
    best_step = int(rows[int(np.argmax(r2))]["step"])
    run = run_io.load_run(tmp_path / "run", "best")
    assert run.step == best_step and run.cfg.task == "regression"
    from jaxvit import inference
    mesh = inference.run_mesh(run.cfg)
    again = run.task.evaluate(run.model, inference.place(run.variables, mesh), "val", mesh)
    assert again["r2"] == pytest.approx(max(r2), abs=1e-5)
    assert result["r2"] > 0.3
    # predict gives the same values in the targets' units as the end-of-run test report.
    from jaxvit.predict import Predictor
    row = next(csv.DictReader((tmp_path / "run" / "eval_test" / "test_predictions.csv").open()))
    got = Predictor.from_workdir(tmp_path / "run", c.eval.test_checkpoint).predict(row["path"])["targets"]
    assert got == pytest.approx({"radius": float(row["pred_radius"]), "brightness": float(row["pred_brightness"])},
                                rel=1e-5)


# ------------------------------------------------------------------------------------------- resume, old layouts

def _cli(workdir, data_dir, *extra):
    overrides = [f"--config.model.overrides.{k}={v}" for k, v in TINY_VIT.items()]
    return [sys.executable, "-m", "jaxvit.main", "--config=configs/gz2_lora.py:demo", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.demo=", "--config.data.image_size=32",
            "--config.data.num_workers=0", "--config.train.batch_size=8", "--config.eval.batch_size=8",
            "--config.train.epochs=3", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=2",
            "--config.checkpoint.keep_every_epochs=2", *overrides, *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(gz2_dir, tmp_path):
    # Killed with SIGKILL after its tenth step's checkpoint, in epoch 3 (5 steps per epoch, a resume point at every
    # step, the newest 2 kept, and every 2nd epoch's, and the bests by validation accuracy and F1 as gz2_lora keeps).
    run_killed_and_resumed(lambda w: _cli(w, gz2_dir), tmp_path, kill_after=10)
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_accuracy", "val_acc", "val_f1")
    assert [[r[k] for k in keys] for r in history(tmp_path / "run")] == [[r[k] for k in keys]
                                                                         for r in history(tmp_path / "ref")]
    acc, f1 = ({int(r["step"]): float(r[k]) for r in history(tmp_path / "ref")} for k in ("val_acc", "val_f1"))
    best_acc, best_f1 = max(acc, key=acc.get), max(f1, key=f1.get)  # the first of the highest
    for d in ("ref", "run"):
        assert checkpoint.steps(tmp_path / d) == sorted({best_acc, best_f1, 10, 14, 15})
        assert checkpoint.read(tmp_path / d, "best").step == best_acc
        assert checkpoint.read(tmp_path / d, "best_val_f1_macro").step == best_f1
    fa, fb = (flat(saved_state(tmp_path / d)["trainable"]) for d in ("ref", "run"))
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.integration
def test_workdir_of_the_old_layout_is_refused_in_one_line(lora_run, tmp_path):
    """Before the one-manager layout, checkpoints/{periodic,best,final}/<step>: a clear error, not a misread."""
    import shutil
    workdir, _ = lora_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(workdir / "checkpoints", old / "checkpoints" / "periodic")
    with pytest.raises(checkpoint.CheckpointError, match="older jaxvit.*periodic/<step>.*train the run again"):
        run_io.load_run(old, "best")
    proc = subprocess.run([sys.executable, "-m", "jaxvit.evaluate", f"--workdir={old}"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "older jaxvit" in proc.stderr


# ------------------------------------------------------------------------------------------- user mistakes

def _main(tmp_path, *overrides, config="configs/gz2_lora.py:demo"):
    return subprocess.run([sys.executable, "-m", "jaxvit.main", f"--config={config}",
                           f"--workdir={tmp_path / 'w'}", "--config.data.demo=", *overrides],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) >= 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in proc.stderr, (w, proc.stderr[-2000:])


@pytest.mark.slow
def test_user_mistakes_end_in_one_line_with_exit_code_2(gz2_dir, tmp_path):
    import shutil
    _one_line_error(_main(tmp_path, "--config.train.epochz=3"), "train.epochz", "epochs", "batch_size")
    _one_line_error(_main(tmp_path, f"--config.data.data_dir={gz2_dir}", "--config.train.batch_size=0"),
                    "train.batch_size=0", "positive")
    _one_line_error(_main(tmp_path, f"--config.data.data_dir={tmp_path / 'nowhere'}"), "nowhere", "data_dir")
    _one_line_error(_main(tmp_path, f"--config.data.data_dir={gz2_dir}", "--config.optim.schedule=linear"),
                    "optim.schedule='linear'", "cosine")
    broken = tmp_path / "broken"
    shutil.copytree(gz2_dir, broken)
    shutil.rmtree(broken / "gz2_5class_test")
    _one_line_error(_main(tmp_path, f"--config.data.data_dir={broken}"), "'test'", "gz2_5class_train")
    shutil.copytree(gz2_dir / "gz2_5class_test", broken / "gz2_5class_test")
    shutil.rmtree(broken / "gz2_5class_val" / "spiral")
    _one_line_error(_main(tmp_path, f"--config.data.data_dir={broken}"), "spiral", "same classes")
    _one_line_error(_main(tmp_path, f"--config.data.data_dir={gz2_dir}",
                          f"--config.model.pretrained={tmp_path / 'no_such_checkpoint'}"), "no_such_checkpoint")
    _one_line_error(_main(tmp_path, config="configs/no_such_config.py"), "no_such_config.py")


@pytest.mark.integration
def test_corrupt_image_is_reported_by_path(gz2_dir, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(gz2_dir, root)
    (root / "gz2_5class_train" / "spiral" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    c = tiny_config(root)
    c.data.skip_bad_images = False
    with pytest.raises(ValueError, match="zz_corrupt.png"):
        Trainer(c, tmp_path / "w1")
    # Skipped by default: the run trains, replaces it and counts it.
    c.data.skip_bad_images, c.train.epochs = True, 1
    Trainer(c, tmp_path / "w2").run()
    assert checkpoint.read(tmp_path / "w2", "final").step == max(checkpoint.steps(tmp_path / "w2"))


# ------------------------------------------------------------------------------------------- task-owned state

class CountingClassification(Classification):
    """Classification that also keeps task state in a mutable collection: examples seen and a running label sum
    (what BatchNorm statistics or DINO centres need from the loop)."""

    def build(self, rng):
        model, variables = super().build(rng)
        return model, {**variables, "counts": {"seen": jnp.zeros((), jnp.float32), "labels": jnp.zeros(())}}

    def loss(self, model, variables, batch, rng, step=None):
        params = {k: v for k, v in variables.items() if k != "counts"}
        loss, metrics, _ = super().loss(model, params, batch, rng)
        c = variables["counts"]
        return loss, metrics, {"counts": {"seen": c["seen"] + batch["label"].shape[0],
                                          "labels": c["labels"] + batch["label"].sum()}}


@pytest.mark.integration
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_task_state_is_updated_checkpointed_and_resumed(gz2_dir, tmp_path, monkeypatch, grad_accum):
    monkeypatch.setitem(tasks.TASKS, "classification", "test_train:CountingClassification")
    c = tiny_config(gz2_dir, epochs=1, grad_accum=grad_accum)
    c.eval.test_split, c.eval.val_split, c.eval.test_checkpoint = "", "", "final"
    Trainer(c, tmp_path).run()  # epoch 1 (5 steps of 8) ...
    c.train.epochs = 2
    trainer = Trainer(c, tmp_path)
    trainer.run()  # ... resumed for epoch 2
    state = saved_state(tmp_path)
    assert float(state["mutable"]["counts"]["seen"]) == 10 * 8  # carried across micro-batches and the resume
    from jaxvit.data import pipeline  # the same 10 batches, read again: their label sum
    data = pipeline.train_iterator(trainer.train_src, trainer.task.train_transform(), c.data, global_batch=8,
                                   seed=c.seed)
    assert float(state["mutable"]["counts"]["labels"]) == sum(int(next(data)["label"].sum()) for _ in range(10))
    final = checkpoint.read(tmp_path, "final").variables()
    assert float(final["counts"]["seen"]) == 80  # evaluation variables include the task state


@pytest.mark.integration
def test_ema_averages_batchnorm_statistics_with_the_weights(gz2_dir):
    c = tiny_config(gz2_dir, ema_decay=0.5)
    c.model.head_hidden, c.model.head_norm = (16,), "batch"
    task = tasks.create(c)
    model, variables = task.build(jax.random.key(0))
    rule = optim.trainable_rule("all", c, task.head)
    tx, schedule, _ = optim.make_optimizer(c, optim.split({"params": variables["params"]}, rule)[0], 10, 2)
    mesh = sharding.make_mesh(c.mesh)
    state, _ = init_state(c, variables, rule, tx, mesh)
    step = jax.jit(make_step(task, model, c, tx, schedule))
    rng = np.random.default_rng(0)
    stats = [flat(state["mutable"]["batch_stats"])]
    for _ in range(2):
        batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                 "label": rng.integers(0, 5, 8).astype(np.int32)}
        state, _ = step(state, batch)
        stats.append(flat(state["mutable"]["batch_stats"]))
    ema, used = flat(state["ema"]["batch_stats"]), flat(checkpoint.eval_variables(state)["batch_stats"])
    for k in stats[0]:  # 0.5 * (0.5 * s0 + 0.5 * s1) + 0.5 * s2, and evaluation uses it
        np.testing.assert_allclose(ema[k], 0.25 * stats[0][k] + 0.25 * stats[1][k] + 0.5 * stats[2][k], rtol=1e-6)
        np.testing.assert_array_equal(used[k], ema[k])
    assert not np.allclose(ema["head/norm_0/mean"], stats[2]["head/norm_0/mean"])
