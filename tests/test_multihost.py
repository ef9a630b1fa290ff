"""Several real processes on this machine, coordinated through jax.distributed (gloo CPU collectives).

- launch/local.sh 2 trains to the same history as one process; evaluation counts every image exactly once;
- a 2-process run killed mid-run resumes on 1 process and finishes with the 1-process history;
- a process killed mid-run makes the surviving one exit non-zero within a minute (heartbeat timeout);
- local.sh prefixes output with the process index and stops the others when one fails.
"""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.tiny import ROOT, TINY_VIT
from jaxvit import checkpoint

pytestmark = pytest.mark.slow
LOCAL = str(ROOT / "launch" / "local.sh")
# fp32: the 2-process run all-reduces gradients and metrics in a different order than one process.
RTOL = 1e-4
HISTORY = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro")


@pytest.fixture(scope="module")
def data_dir(gz2_dir):
    return gz2_dir  # 15 val / test images


@pytest.fixture(scope="module")
def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)  # conftest set the shared XLA cache


def _args(workdir, data_dir, *extra):
    """python args of a tiny demo run: 2 epochs of 5 steps (global batch 8), eval batch 8 (the last padded)."""
    return ["-m", "jaxvit.main", "--config=configs/gz2_lora.py:demo", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.demo=", "--config.data.image_size=32",
            "--config.data.num_workers=0", "--config.train.batch_size=8", "--config.eval.batch_size=8",
            "--config.train.epochs=2", *[f"--config.model.overrides.{k}={v}" for k, v in TINY_VIT.items()], *extra]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_two_processes_match_one(data_dir, env, tmp_path):
    t0 = time.time()
    subprocess.run([sys.executable, *_args(tmp_path / "one", data_dir)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    t1 = time.time()
    proc = subprocess.run([LOCAL, "2", *_args(tmp_path / "two", data_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    print(f"one process {t1 - t0:.0f} s, two processes {time.time() - t1:.0f} s")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "[0] " in proc.stdout and "[1] " in proc.stdout
    assert "process 1 of 2 on 1 x cpu; 2 global devices" in proc.stdout
    assert proc.stdout.count("heap kept between steps (ok)") == 2  # keep_cpu_heap ran before the backends
    one, two = _rows(tmp_path / "one" / "training_history.csv"), _rows(tmp_path / "two" / "training_history.csv")
    assert [r["step"] for r in two] == [r["step"] for r in one] == ["5", "10"]
    for key in HISTORY:
        np.testing.assert_allclose([float(r[key]) for r in two], [float(r[key]) for r in one], rtol=RTOL,
                                   err_msg=key)
    # Evaluation over two hosts: each of the 15 test images exactly once (8 per step, 4 per process, one pad row).
    p_one = _rows(tmp_path / "one" / "eval_test" / "test_predictions.csv")
    p_two = _rows(tmp_path / "two" / "eval_test" / "test_predictions.csv")
    paths = [r["path"] for r in p_two]
    assert len(paths) == len(set(paths)) == 15 and paths == [r["path"] for r in p_one]
    prob_cols = [k for k in p_one[0] if k.startswith("p_") or k.startswith("prob")]
    assert prob_cols, list(p_one[0])
    np.testing.assert_allclose([[float(r[k]) for k in prob_cols] for r in p_two],
                               [[float(r[k]) for k in prob_cols] for r in p_one], rtol=RTOL, atol=1e-6)
    # Only process 0 writes: one config, one history, one TensorBoard directory, one report.
    assert (tmp_path / "two" / "config.json").exists() and len(list((tmp_path / "two").glob("tensorboard/*"))) == 1


def test_two_process_run_killed_resumes_on_one_process(data_dir, env, tmp_path):
    """Resume points hold one data-iterator file per process; with another process count the data restart at
    the saved step (the batch at step t depends only on (seed, t)), so the history equals one process's."""
    args = _args(tmp_path / "run", data_dir, "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=50")
    two = subprocess.Popen([LOCAL, "2", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    periodic = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (periodic / "7").exists():  # epoch 1 done, in epoch 2
        assert two.poll() is None, "the 2-process run stopped before it was killed"
        time.sleep(0.05)
    os.killpg(two.pid, signal.SIGKILL)
    two.wait()
    assert max(checkpoint.steps(tmp_path / "run")) < 10, "the run finished before it was killed"
    assert (periodic / "7" / "data" / "process_1-of-2.json").exists()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "another number of processes" in proc.stderr
    subprocess.run([sys.executable, *_args(tmp_path / "one", data_dir)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    got, want = _rows(tmp_path / "run" / "training_history.csv"), _rows(tmp_path / "one" / "training_history.csv")
    assert [r["step"] for r in got] == [r["step"] for r in want] == ["5", "10"]
    for key in HISTORY:
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in want], rtol=RTOL,
                                   err_msg=key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_a_killed_process_makes_the_other_exit_nonzero(data_dir, env, tmp_path, victim=1):
    """Started without local.sh (which would stop the survivor itself): jax's coordination service must do it.
    The victim is process 1, the harder case: when process 0 (the coordinator) dies, the others lose the
    coordination service at once and abort in under a second (measured; victim=0 also passes)."""
    port = _free_port()
    procs = []
    for i in range(2):
        penv = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        log = (tmp_path / f"p{i}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, *_args(tmp_path / "run", data_dir, "--config.train.epochs=50",
                                                              "--config.checkpoint.every_steps=1")],
                                      cwd=ROOT, env=penv, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "2").exists():
            assert all(p.poll() is None for p in procs), "a process stopped before training"
            time.sleep(0.05)
        assert (tmp_path / "run" / "checkpoints" / "2").exists(), "training did not start"
        procs[victim].send_signal(signal.SIGKILL)
        t_kill = time.time()
        survivor = procs[1 - victim]
        rc = survivor.wait(timeout=60)
        print(f"survivor exited with {rc} after {time.time() - t_kill:.1f} s")
        assert rc != 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "distributed" in (tmp_path / f"p{1 - victim}.log").read_text().lower()


def test_local_sh_prefixes_output_and_stops_the_others_when_one_fails(tmp_path):
    code = ("import os, sys, time\n"
            "i = int(os.environ['JAX_PROCESS_ID'])\n"
            "print('process', i, 'of', os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS'])\n"
            "sys.stdout.flush()\n"
            "time.sleep(0.5)\n"
            "sys.exit(7) if i == 2 else time.sleep(120)\n")
    t0 = time.time()
    proc = subprocess.run([LOCAL, "3", "-c", code], env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == 7
    for i in range(3):
        assert f"[{i}] process {i} of 3 localhost:" in proc.stdout
    assert "stopping the others" in proc.stderr
    bad = subprocess.run([LOCAL, "x", "-c", "pass"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
