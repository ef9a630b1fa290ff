"""Checkpoints on disk: broken steps skipped on resume and named by the readers, a full disk stops the save in
one line with the previous step intact, lean checkpoints (frozen weights reloaded from their source)."""
import csv
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers.tiny import ROOT
from jaxvit import checkpoint, run_io
from jaxvit.checkpoint import Checkpoints, CheckpointError, LoopState
from jaxvit.errors import DataError
from jaxvit.train import Trainer


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def flat_keys(tree) -> set:
    return {"/".join(k) for k in traverse_util.flatten_dict(dict(tree))}


def rows(workdir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"}
            for r in csv.DictReader((workdir / "training_history.csv").open())]


def test_loop_state_keeps_fields_it_does_not_know():
    loop = LoopState(phase=1, best=0.5, best_step=10, extra={"data_fingerprint": {"train": "abc"}},
                     bests={"val/accuracy": [0.5, 10], "val/f1_macro": [0.4, 5]})
    again = LoopState.from_json({**loop.to_json(), "added_later": 3})
    assert again.phase == 1 and again.best_step == 10 and again.bests == loop.bests
    assert again.extra == {"data_fingerprint": {"train": "abc"}, "added_later": 3}
    older = {k: v for k, v in loop.to_json().items() if k != "bests"}  # written before checkpoint.also_best
    assert LoopState.from_json(older).bests == {} and LoopState.from_json(older).kept_steps() == {10}


@pytest.mark.slow
def test_broken_checkpoints_are_skipped_on_resume_and_named_by_readers(lora_run, tmp_path, caplog):
    """The LoRA run (steps 5, 10, 15; the phase switch at 5) with step 15 truncated and step 10's state deleted:
    readers name them; a resume warns, starts from step 5 and ends exactly as the uninterrupted run."""
    workdir, c = lora_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_*"))
    data_files = sorted((copy / "checkpoints" / "15" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    with data_files[-1].open("r+b") as f:  # the largest array file, truncated to nothing
        f.truncate(0)
    shutil.rmtree(copy / "checkpoints" / "10" / "state")

    with caplog.at_level(logging.WARNING, logger="jaxvit"):
        assert checkpoint.read(copy, "latest").step == 5
    assert "15 (" in caplog.text and "10 (" in caplog.text and "newest good one is step 5" in caplog.text
    with pytest.raises(CheckpointError, match=r"'final' .* do not restore: 15 \(.*; 10 \(.*good checkpoints: 5 "):
        checkpoint.read(copy, "final")
    with pytest.raises(CheckpointError, match=r"checkpoint 10 \(.*/10\) does not restore .*good checkpoints: 5 "):
        checkpoint.read(copy, 10)
    proc = subprocess.run([sys.executable, "-m", "jaxvit.evaluate", f"--workdir={copy}", "--checkpoint=final"],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(error) == 1 and "do not restore: 15 (" in error[0] and "good checkpoints: 5" \
        in error[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxvit"):
        Trainer(c, copy).run()
    warned = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warned) == 2 and "/15 does not restore" in warned[0] and "resuming from step 10" in warned[0]
    assert "/10 does not restore" in warned[1] and "resuming from step 5" in warned[1]
    assert sorted(p.name for p in (copy / "broken_checkpoints").iterdir()) == ["10", "15"]
    assert rows(copy) == rows(workdir)
    want, got = (checkpoint.read(d, "final").state for d in (workdir, copy))
    a, b = (jax.tree_util.tree_leaves_with_path({k: s[k] for k in ("trainable", "opt_state", "ema")})
            for s in (want, got))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _grain_iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_stops_the_save_in_one_line_and_keeps_the_previous_step(small_disk):
    weights = np.random.default_rng(0).standard_normal(1_000_000, np.float32)  # 4 MB that do not compress
    state = {"step": jnp.int32(1), "trainable": {"w": jnp.asarray(weights)}, "frozen": {}}
    data = _grain_iterator()
    next(data)
    ckpts = Checkpoints(small_disk / "checkpoints", keep=3)
    ckpts.save(1, state, data, LoopState(best_step=1), {})
    ckpts.wait()
    with pytest.raises(CheckpointError) as err:  # 4 MB more do not fit in the 2 MB left
        ckpts.save(2, dict(state, step=jnp.int32(2)), data, LoopState(), {})
        ckpts.wait()
    message = str(err.value)
    assert "\n" not in message and f"step 2 under {small_disk / 'checkpoints'}" in message
    assert "no space left on device" in message and "needs about 4.0 MB" in message
    assert "previous checkpoint (1) is intact" in message
    again = Checkpoints(small_disk / "checkpoints", keep=3)
    fresh = _grain_iterator()
    state_back, loop = again.restore_latest(lambda loop: state, fresh, {})
    assert int(state_back["step"]) == 1 and loop.best_step == 1 and next(fresh) == 1
    np.testing.assert_array_equal(state_back["trainable"]["w"], state["trainable"]["w"])


def test_rotation_keeps_the_best_and_final_steps(tmp_path):
    state = {"step": jnp.int32(0), "trainable": {"w": jnp.ones(3)}, "frozen": {}}
    data = _grain_iterator()
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=2)
    for step in range(1, 7):
        ckpts.save(step, dict(state, step=jnp.int32(step)), data, LoopState(best_step=2), {})
    ckpts.wait()
    assert checkpoint.steps(tmp_path) == [2, 5, 6]


def test_rotation_keeps_every_best_and_the_periodic_steps_readable_by_name(tmp_path):
    state = {"step": jnp.int32(0), "trainable": {"w": jnp.ones(3)}, "frozen": {}}
    data = _grain_iterator()
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=2, keep_period=4)  # e.g. every 2nd epoch of 2 steps
    for step in range(1, 10):
        loop = LoopState(best_step=2, bests={"val/accuracy": [0.9, 2], "val/f1_macro": [0.8, min(step, 3)]})
        ckpts.save(step, dict(state, step=jnp.int32(step), trainable={"w": jnp.full(3, step)}), data, loop, {})
    ckpts.wait()
    assert checkpoint.steps(tmp_path) == [2, 3, 4, 8, 9]  # best, best by F1, periodic 4 and 8, newest 2
    assert checkpoint.read(tmp_path, "best_val_f1_macro").step == 3
    assert checkpoint.read(tmp_path, "best_val_accuracy").state["trainable"]["w"].tolist() == [2, 2, 2]
    with pytest.raises(FileNotFoundError, match="no checkpoint 'best_val_loss' .*best_val_f1_macro 3"):
        checkpoint.read(tmp_path, "best_val_loss")
    with pytest.raises(FileNotFoundError, match="use best, final, latest, best_<evaluator>_<metric>"):
        checkpoint.read(tmp_path, "f1")


@pytest.mark.integration
def test_lean_checkpoint_needs_the_same_frozen_weights(lora_run, tmp_path):
    """The LoRA base is not stored; a changed pretrained file is a one-line error naming it."""
    workdir, c = lora_run
    import orbax.checkpoint as ocp
    fingerprint = checkpoint.read(workdir, "final").frozen
    assert fingerprint["stored"] is False and fingerprint["source"].startswith("model.pretrained=")
    assert all(n.startswith("params/backbone/") for n in fingerprint["leaves"]) and fingerprint["leaves"]
    on_disk = ocp.PyTreeCheckpointer().metadata(workdir / "checkpoints" / "15" / "state").item_metadata
    assert not any(n.split("/", 1)[1] in flat_keys(on_disk["frozen"]) for n in fingerprint["leaves"])
    assert flat_keys(on_disk["trainable"]["lora"])  # the adapters are stored
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval_*"))
    changed = tmp_path / "pretrained"
    shutil.copytree(c.model.pretrained, changed)
    cfg_path = copy / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace(str(c.model.pretrained), str(changed)))
    import safetensors.numpy as stn
    weights = changed / "model.safetensors"
    tensors = stn.load_file(weights)
    name = next(k for k in tensors if k.endswith("attention.query.weight"))
    tensors[name] = tensors[name] + 1e-3
    stn.save_file(tensors, weights, metadata={"format": "pt"})
    message = (f"frozen weights loaded from model.pretrained='{changed}'.*differ.*trained with \\(from "
               f"model.pretrained='{c.model.pretrained}'.*restore the original")
    with pytest.raises(DataError, match=message) as err:
        run_io.load_run(copy, "final")
    assert "\n" not in str(err.value)
