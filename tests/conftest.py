"""Test tiers, one XLA compilation cache per session, and the shared fixtures: a tiny synthetic GZ2 set and
one finished LoRA run on a transformers checkpoint (reused by the evaluation, export and freezing tests).

Tiers (docs/testing.md): a test is `unit` unless it is marked `integration` or `slow`;
`make test-unit` runs `-m unit`, `make test` runs `-m "not slow"` (unit + integration), `make test-slow` the rest.
Shared code lives in tests/helpers/; test modules never import this file or each other."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Before jax is imported anywhere: programs compiled once are reused by later tests and by the subprocesses
# they start. A fresh directory per session (what CI sees: a cold cache); set JAX_COMPILATION_CACHE_DIR to
# keep one across runs.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvit_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM at -O0: the tests' tiny programs spend more time compiling than running; this takes ~30% off the CPU
# time of tests/test_train.py (docs/testing.md). Same HLO, same tolerances; set XLA_FLAGS to choose otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from the test modules

import pytest  # noqa: E402

from helpers.tiny import LORA_RUN, tiny_config  # noqa: E402

TIERS = ("unit", "integration", "slow")
UNIT_BUDGET_S = 5.0  # a unit test slower than this (call + setup) is reported at the end of the run


def pytest_collection_modifyitems(items):
    for item in items:
        marked = [t for t in TIERS if item.get_closest_marker(t)]
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid}: marked {marked}; a test belongs to one tier")
        if not marked:
            item.add_marker(pytest.mark.unit)


_unit_times: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    yield
    if item.get_closest_marker("unit"):
        _unit_times[item.nodeid] = time.perf_counter() - start


def pytest_terminal_summary(terminalreporter):
    over = sorted(((t, n) for n, t in _unit_times.items() if t > UNIT_BUDGET_S), reverse=True)
    if over:
        terminalreporter.write_sep("-", f"unit tests over {UNIT_BUDGET_S:.0f} s: mark them integration or slow")
        for t, n in over:
            terminalreporter.write_line(f"{t:6.1f} s  {n}")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def gz2_dir(tmp_path_factory):
    """Synthetic GZ2: 5 classes x (8 train, 3 val, 3 test) images of 32 px."""
    from jaxvit.demos.gz2 import write_dataset
    root = tmp_path_factory.mktemp("gz2")
    write_dataset(root, per_class={"train": 8, "val": 3, "test": 3}, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def lora_run(gz2_dir, tmp_path_factory):
    """A finished LoRA run (rank 4) with EMA on a transformers DINOv2 checkpoint: 3 epochs of 5 steps, the
    first training the head alone, end-of-run test evaluation included. Returns (workdir, config)."""
    from helpers.torch_models import tiny_hf_dinov2
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
