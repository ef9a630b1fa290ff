"""Shared fixtures: a tiny synthetic GZ2 set, a tiny config, one finished LoRA run on a transformers
checkpoint (reused by the evaluation, export and freezing tests) and one persistent XLA compilation cache for
the whole session and the subprocesses it starts."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Before jax is imported anywhere: compiled programs are shared across tests and subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jaxvit_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # test modules import helpers from each other
TINY_VIT = dict(patch_size=8, hidden_size=32, depth=2, num_heads=2, mlp_hidden=64, pos_grid=4)


def tiny_config(data_dir, task: str = "classification", **train):
    """A tiny ViT (patch 8, width 32, depth 2) on 32 px images; 2 epochs of batch 8, in-process data."""
    from jaxvit.config import base_config
    c = base_config(task)
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


@pytest.fixture(scope="session")
def gz2_dir(tmp_path_factory):
    """Synthetic GZ2: 5 classes x (8 train, 3 val, 3 test) images of 32 px."""
    from jaxvit.data.synthetic_gz2 import write_dataset
    root = tmp_path_factory.mktemp("gz2")
    write_dataset(root, per_class={"train": 8, "val": 3, "test": 3}, size=32, seed=0)
    return root


def tiny_hf_dinov2(directory: Path) -> Path:
    """A randomly initialised (and perturbed) transformers DINOv2 checkpoint of the tiny size, saved to disk."""
    import torch
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                  image_size=32, patch_size=8)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(directory)
    return directory


LORA_RUN = dict(targets=("query", "value", "layer_1/mlp/fc2"), head_hidden=(16,), pool="cls_mean")


@pytest.fixture(scope="session")
def lora_run(gz2_dir, tmp_path_factory):
    """A finished LoRA run (rank 4) with EMA on a transformers DINOv2 checkpoint: 3 epochs of 5 steps, the
    first training the head alone, end-of-run test evaluation included. Returns (workdir, config)."""
    from jaxvit.train import Trainer
    pretrained = tiny_hf_dinov2(tmp_path_factory.mktemp("dinov2_hf"))
    c = tiny_config(gz2_dir, epochs=3, ema_decay=0.5, stage1_epochs=1)
    c.model.arch, c.model.pretrained = "dinov2_vits14", str(pretrained)
    c.model.head_hidden, c.model.pool = LORA_RUN["head_hidden"], LORA_RUN["pool"]
    c.lora.enabled, c.lora.rank, c.lora.alpha, c.lora.targets = True, 4, 16.0, LORA_RUN["targets"]
    c.optim.lr = 1e-2
    c.data.aug.rotate_degrees = 0.0
    workdir = tmp_path_factory.mktemp("lora_run")
    Trainer(c, workdir).run()
    return workdir, c


def set_best_step(workdir: Path, step: int) -> None:
    """Records `step` as the run's best in the loop state of its newest checkpoint (orbax's JSON on disk)."""
    import json
    from jaxvit import checkpoint
    path = Path(workdir) / "checkpoints" / str(max(checkpoint.steps(workdir))) / "loop" / "metadata"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), best_step=step)))


def run_killed_and_resumed(cli, tmp_path: Path, kill_after: int = 3) -> None:
    """Runs `cli(workdir)` to the end in tmp_path/ref; in tmp_path/run, kills it with SIGKILL once its resume
    point `kill_after` exists, checks it had not finished, and runs it again to the end (resuming)."""
    import os
    import signal
    import subprocess
    import time
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(cli(tmp_path / "ref"), cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(cli(tmp_path / "run"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (saved / str(kill_after)).exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from jaxvit import checkpoint
    assert max(checkpoint.steps(tmp_path / "run")) < max(checkpoint.steps(tmp_path / "ref")), \
        "the run finished before it was killed"
    subprocess.run(cli(tmp_path / "run"), cwd=ROOT, env=env, check=True, capture_output=True)
