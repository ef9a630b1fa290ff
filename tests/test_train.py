"""The fine-tuning pipeline on tiny models and real files: LoRA, layer-wise rates, stages, accumulation, resume."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from jaxvit import lora, optim
from jaxvit.checkpoint import Checkpoints
from jaxvit.config import base_config
from jaxvit.data.synthetic_gz2 import write_dataset
from jaxvit.models import get_config
from jaxvit.models.heads import Classifier
from jaxvit.train import Trainer, build_model, make_train_step

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = dict(patch_size=8, hidden_size=32, depth=2, num_heads=2, mlp_hidden=64, pos_grid=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gz2")
    write_dataset(root, per_class={"train": 8, "val": 3, "test": 3}, size=32, seed=0)
    return root


def tiny_config(data_dir, **train):
    c = base_config()
    c.data.data_dir = str(data_dir)
    c.data.image_size = 32
    c.data.crop_ratio = 1.0
    c.data.num_workers = 0
    c.model.overrides.update(TINY_VIT)
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.log_every_steps = 2
    c.eval.batch_size = 8
    c.optim.warmup_ratio = 0.0
    c.optim.lr = 1e-3
    c.checkpoint.keep = 20
    for k, v in train.items():
        c.train[k] = v
    return c


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def restore_state(workdir: Path, name: str = "final", step: int | None = None) -> dict:
    """The train state saved under <workdir>/checkpoints/<name>, read back from disk as numpy."""
    ck = Checkpoints(workdir / "checkpoints")
    mngr = ck.periodic if name == "periodic" else ck._named(name)
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_lora_freezes_base_and_has_no_state_for_it(data_dir, tmp_path):
    c = tiny_config(data_dir)
    c.lora.enabled = True
    c.lora.rank = 4
    trainer = Trainer(c, tmp_path)
    initial = flat(trainer.variables_template["params"]["backbone"])
    result = trainer.run()
    state = restore_state(tmp_path)
    frozen = flat(state["frozen"]["params"]["backbone"])
    assert frozen.keys() == initial.keys()
    for k in initial:
        np.testing.assert_array_equal(frozen[k], initial[k], err_msg=k)  # bit-identical
    # Optimizer state exists for trainable leaves only: adapters and head.
    opt_paths = {"/".join(str(getattr(p, "key", p)) for p in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
    assert not any("params/backbone" in p for p in opt_paths)
    assert any("lora_a" in p for p in opt_paths)
    # The adapters did train.
    assert np.abs(flat(state["trainable"]["lora"])[
        "backbone/encoder/layer_0/attention/query/lora_b"]).max() > 0
    assert (tmp_path / "eval_test" / "test_results.json").exists()
    assert (tmp_path / "config.json").exists()
    assert 0.0 <= result["accuracy"] <= 1.0


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


def test_freeze_first_n_layers():
    c = base_config()
    c.train.freeze_first_n_layers = 1
    assert not optim.is_trainable("params/backbone/embeddings/cls_token", c, 2)
    assert not optim.is_trainable("params/backbone/encoder/layer_0/mlp/fc1/kernel", c, 2)
    assert optim.is_trainable("params/backbone/encoder/layer_1/mlp/fc1/kernel", c, 2)
    assert optim.is_trainable("params/head/out/kernel", c, 1)
    assert not optim.is_trainable("params/backbone/encoder/layer_1/mlp/fc1/kernel", c, 1)


def test_two_stage_switches_after_stage1_epochs(data_dir, tmp_path):
    c = tiny_config(data_dir, epochs=3, stage1_epochs=1)
    trainer = Trainer(c, tmp_path)
    backbone0 = flat(trainer.variables_template["params"]["backbone"])
    trainer.run()
    rows = list(csv.DictReader((tmp_path / "training_history.csv").open()))
    assert [r["stage"] for r in rows] == ["1", "2", "2"]
    # After stage 1 the backbone was untouched; the checkpoint at the end of epoch 1 shows it.
    step1 = int(rows[0]["step"])
    saved = restore_state(tmp_path, "periodic", step1)
    after1 = flat(optim.combine(saved["trainable"], saved["frozen"])["params"]["backbone"])
    for k in backbone0:
        np.testing.assert_array_equal(after1[k], backbone0[k])
    final = flat(restore_state(tmp_path)["trainable"]["params"]["backbone"])
    assert any(np.abs(final[k] - backbone0[k]).max() > 0 for k in backbone0)


def test_gradient_accumulation_equals_full_batch(data_dir):
    results = []
    for k in (1, 4):
        c = tiny_config(data_dir, grad_accum=k)
        model, variables = build_model(c, 5, jax.random.key(0))
        trainable, frozen = optim.split(variables, lambda p: optim.is_trainable(p, c, 2))
        tx, schedule, _ = optim.make_optimizer(c, trainable, 10, 2)
        state = dict(step=jnp.int32(0), rng=jax.random.key_data(jax.random.key(1)), trainable=trainable,
                     frozen=frozen, opt_state=tx.init(trainable))
        step = jax.jit(make_train_step(model, c, tx, 5, schedule))
        batch = dict(image=jax.random.normal(jax.random.key(2), (8, 32, 32, 3)),
                     label=jnp.arange(8) % 5, bad=jnp.zeros(8, jnp.int32))
        state, m = step(state, batch)
        results.append((flat(state["trainable"]), float(m["loss"])))
    (p1, l1), (p4, l4) = results
    assert abs(l1 - l4) < 1e-5
    # Adam's first step is lr * g / |g| per coordinate: where g is ~0, float rounding of the two gradient sums
    # can move a coordinate by a visible fraction of lr (1e-3), so the bound is 2% of lr.
    for name in p1:
        np.testing.assert_allclose(p4[name], p1[name], rtol=1e-5, atol=2e-5, err_msg=name)


def _cli(workdir, data_dir, *extra):
    overrides = [f"--config.model.overrides.{k}={v}" for k, v in TINY_VIT.items()]
    return [sys.executable, "-m", "jaxvit.main", "--config=configs/gz2_lora.py:demo", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.synthetic=False", "--config.data.image_size=32",
            "--config.data.num_workers=0", "--config.train.batch_size=8", "--config.eval.batch_size=8",
            "--config.train.epochs=3", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=50",
            *overrides, *extra]


def test_killed_run_resumes_to_the_same_result(data_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Uninterrupted reference.
    subprocess.run(_cli(tmp_path / "ref", data_dir), cwd=ROOT, env=env, check=True, capture_output=True)
    # Killed with SIGKILL after its third step's checkpoint, in the middle of epoch 1 (5 steps per epoch).
    proc = subprocess.Popen(_cli(tmp_path / "run", data_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    periodic = tmp_path / "run" / "checkpoints" / "periodic"
    deadline = time.time() + 240
    while time.time() < deadline and not (periodic / "3").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "checkpoints" / "final").exists(), "the run finished before it was killed"
    subprocess.run(_cli(tmp_path / "run", data_dir), cwd=ROOT, env=env, check=True, capture_output=True)
    ref = list(csv.DictReader((tmp_path / "ref" / "training_history.csv").open()))
    got = list(csv.DictReader((tmp_path / "run" / "training_history.csv").open()))
    keys = ("epoch", "step", "train_loss", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]
    fa, fb = (flat(restore_state(tmp_path / d)["trainable"]) for d in ("ref", "run"))
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_corrupt_image_is_reported_by_path(data_dir, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    bad = root / "gz2_5class_train" / "spiral" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    c = tiny_config(root)
    c.data.skip_bad_images = False
    with pytest.raises(ValueError, match="zz_corrupt.png"):
        Trainer(c, tmp_path / "w1")
    # Skipped by default: training runs and replaces it.
    c.data.skip_bad_images = True
    c.train.epochs = 1
    Trainer(c, tmp_path / "w2").run()


def test_unknown_config_key_lists_valid_keys(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxvit.main", "--config=configs/gz2_lora.py",
                           f"--workdir={tmp_path}", "--config.train.epochz=3"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "train.epochz" in proc.stderr and "epochs" in proc.stderr and "batch_size" in proc.stderr


def test_nonfinite_loss_stops_with_checkpoint_intact(data_dir, tmp_path):
    c = tiny_config(data_dir, epochs=2)
    c.optim.lr = 1e30  # diverges within a few steps
    c.optim.grad_clip = 0.0
    c.train.log_every_steps = 1
    with pytest.raises(FloatingPointError, match="non-finite"):
        Trainer(c, tmp_path).run()
    for step in Checkpoints(tmp_path / "checkpoints").periodic.all_steps():  # what was saved is finite
        s = restore_state(tmp_path, "periodic", step)
        assert all(np.isfinite(v).all() for v in flat(s["trainable"]).values())
