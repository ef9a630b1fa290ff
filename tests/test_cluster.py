"""Runs that survive clusters (docs/cluster.md): a real signal to a real training process (one of one, one of two)
saves a resume point and exits 75, and the resumed run equals an uninterrupted one; a second run on a live workdir
is refused; a file removed between runs stops the resume; a diverging run stops after train.max_nonfinite_steps.
Each failure ends in one line, with what was saved before intact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers.tiny import ROOT, tiny_config
from jaxvit import checkpoint, cluster, tasks
from jaxvit.data import changes
from jaxvit.errors import DataError, UserError
from test_multihost import HISTORY, LOCAL, RTOL, _args, _free_port, _rows

TEST_METRICS = ("loss", "accuracy", "f1_macro", "roc_auc_ovr_macro")


# ------------------------------------------------------------------------------------------- fast: the parts

def test_stop_signals_record_a_real_signal_and_restore_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    stops = cluster.StopSignals(("SIGUSR1",))
    assert not stops.requested(1)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.01)  # Python runs the handler between bytecodes
    assert stops.requested(2) and stops.received == "SIGUSR1"
    stops.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(UserError, match="SIGNOPE"):
        cluster.StopSignals(("SIGNOPE",))


def _write_lock(workdir: Path, **holder) -> Path:
    path = workdir / "run.lock"
    path.write_text(json.dumps(dict(host="vm", pid=1, started="2026-01-01T00:00:00", slurm_job="") | holder))
    return path


def test_workdir_lock_refuses_a_live_run_and_takes_over_stale_ones(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        lock = cluster.WorkdirLock(tmp_path, stale_s=600)
        host = lock.me["host"]
        _write_lock(tmp_path, host=host, pid=live.pid)
        with pytest.raises(UserError, match=f"in use by pid {live.pid} on {host}") as e:
            lock.acquire()
        assert "\n" not in str(e.value)
        _write_lock(tmp_path, host=host, pid=dead.pid)  # a killed run on this host
        lock.acquire()
        assert "its process is dead" in caplog.text and json.loads(lock.path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock.path.exists()
        path = _write_lock(tmp_path, host="another-host", pid=live.pid)  # its heartbeat stopped 20 min ago
        os.utime(path, (time.time() - 1200, time.time() - 1200))
        lock.acquire()
        assert "no heartbeat for 1200 s" in caplog.text
        lock.release()
        _write_lock(tmp_path, host="another-host", pid=live.pid)  # fresh: refused
        with pytest.raises(UserError, match="another-host"):
            lock.acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same SLURM job, requeued onto another node
        _write_lock(tmp_path, host="another-host", pid=live.pid, slurm_job="77")
        cluster.WorkdirLock(tmp_path, stale_s=600).acquire()
        assert "this SLURM job before a requeue" in caplog.text
    finally:
        live.kill()
        live.wait()


def test_changed_split_is_named_by_counts_and_files(gz2_dir, tmp_path):
    data = tmp_path / "gz2"
    shutil.copytree(gz2_dir, data)
    c = tiny_config(data)
    describe = lambda: changes.describe({"train": tasks.create(c, tmp_path / "w").source("train")}, str(data))
    before = describe()
    assert changes.check(tmp_path / "w", before, None, False, True) is False  # a new run stores it
    victim = sorted((data / "gz2_5class_train").rglob("*.png"))[0]
    victim.unlink()
    with pytest.raises(DataError) as e:
        changes.check(tmp_path / "w", describe(), 4, False, True)
    message = str(e.value)
    assert "train: 40 -> 39 examples" in message and str(victim.relative_to(data)) in message
    assert "data.allow_changed=True" in message and "step 4" in message and "\n" not in message
    assert json.loads((tmp_path / "w" / changes.FILE).read_text()) == before  # refused: the record is kept
    assert changes.check(tmp_path / "w", describe(), 4, True, True) is True  # allowed: the new record is kept
    assert json.loads((tmp_path / "w" / changes.FILE).read_text())["train"]["count"] == 39


# ------------------------------------------------------------------------------------------- slow: real runs

@pytest.fixture(scope="module")
def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONPATH=str(ROOT))


def _cli(workdir, data_dir, *extra):
    return [sys.executable, *_args(workdir, data_dir, "--config.train.log_every_steps=1", *extra)]


@pytest.fixture(scope="module")
def uninterrupted(gz2_dir, env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_cli(workdir, gz2_dir), cwd=ROOT, env=env, check=True, capture_output=True)
    return workdir


def _assert_same_result(got: Path, want: Path) -> None:
    """History (train and val) and test metrics equal, to the tolerance of tests/test_multihost.py."""
    a, b = _rows(got / "training_history.csv"), _rows(want / "training_history.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["5", "10"]
    for key in HISTORY:
        np.testing.assert_allclose([float(r[key]) for r in a], [float(r[key]) for r in b], rtol=RTOL, err_msg=key)
    ta, tb = (json.loads((w / "eval_test" / "test_results.json").read_text()) for w in (got, want))
    for key in TEST_METRICS:
        np.testing.assert_allclose(ta[key], tb[key], rtol=RTOL, err_msg=key)


def _signal_at_step(cmd, env, at: int, sig=signal.SIGTERM):
    """Runs cmd; sends `sig` when it logs step `at`; returns (exit status, output, last step logged before the
    signal, seconds from the signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, t_signal = [], None
    for line in proc.stdout:
        lines.append(line)
        if t_signal is None and f" step {at}/" in line:
            proc.send_signal(sig)
            t_signal = time.time()
    rc = proc.wait()
    assert t_signal is not None, "".join(lines[-30:])
    return rc, "".join(lines), time.time() - t_signal


def _stopped_step(output: str) -> int:
    tail = output.split("stopped after step ", 1)[1]
    return int(tail.split()[0])


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_to_the_uninterrupted_result(gz2_dir, env, tmp_path,
                                                                                 uninterrupted):
    cmd = _cli(tmp_path / "run", gz2_dir)
    rc, out, seconds = _signal_at_step(cmd, env, at=2)
    print(f"1 process: exit {rc} {seconds:.1f} s after SIGTERM")
    assert rc == 75, out[-3000:]
    stopped = _stopped_step(out)
    assert 3 <= stopped <= 4, out[-3000:]  # the step in flight (or the next), mid-epoch (an epoch is 5 steps)
    assert out.strip().splitlines()[-1].startswith("preempted: SIGTERM: stopped after step") and "Traceback" not in out
    assert (tmp_path / "run" / "checkpoints" / str(stopped)).is_dir()
    assert not (tmp_path / "run" / "run.lock").exists()  # released on the way out
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    _assert_same_result(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(gz2_dir, env, tmp_path, uninterrupted):
    """The signal reaches process 1 only; the per-step all-gather makes process 0 stop after the same step."""
    port, procs, logs = _free_port(), [], [tmp_path / f"p{i}.log" for i in range(2)]
    for i in range(2):
        penv = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
        procs.append(subprocess.Popen(_cli(tmp_path / "run", gz2_dir), cwd=ROOT, env=penv,
                                      stdout=logs[i].open("w"), stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and " step 2/" not in logs[1].read_text():
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGTERM)
        t_signal = time.time()
        rcs = [p.wait(timeout=120) for p in procs]
        print(f"2 processes: exits {rcs} {time.time() - t_signal:.1f} s after SIGTERM to process 1")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [log.read_text() for log in logs]
    assert rcs == [75, 75], outs[0][-3000:] + outs[1][-3000:]
    assert "preempted: SIGTERM" in outs[1] and "preempted: a signal to another process" in outs[0]
    stopped = {_stopped_step(o) for o in outs}
    assert len(stopped) == 1 and 3 <= min(stopped) <= 4, stopped
    proc = subprocess.run([LOCAL, "2", *_cli(tmp_path / "run", gz2_dir)[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and f"resumed from step {min(stopped)}" in proc.stdout, proc.stdout[-3000:]
    _assert_same_result(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_second_run_on_a_live_workdir_is_refused_and_a_dead_ones_lock_is_taken_over(gz2_dir, env, tmp_path):
    cmd = _cli(tmp_path / "run", gz2_dir, "--config.train.epochs=200", "--config.checkpoint.every_steps=1",
               "--config.checkpoint.keep=1000")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if " step 2/" in line:
                break
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"in use by pid {first.pid}" in last, second.stderr[-2000:]
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()  # SIGKILL: it leaves its lock behind
        first.wait()
    periodic = tmp_path / "run" / "checkpoints"
    saved = sorted(int(p.name) for p in periodic.iterdir() if p.name.isdigit())
    assert saved and (tmp_path / "run" / "run.lock").exists()
    rc, out, _ = _signal_at_step(cmd, env, at=saved[-1] + 1)  # the third run takes over, resumes, is preempted
    assert rc == 75 and "taking over the lock" in out and "its process is dead" in out, out[-3000:]
    assert f"resumed from step {saved[-1]}" in out
    assert all((periodic / str(s)).is_dir() for s in saved)  # what the first run saved is still there


@pytest.mark.slow
def test_a_file_removed_between_runs_stops_the_resume_until_allowed(gz2_dir, env, tmp_path):
    data = tmp_path / "gz2"
    shutil.copytree(gz2_dir, data)
    cmd = _cli(tmp_path / "run", data)
    rc, out, _ = _signal_at_step(cmd, env, at=2)
    assert rc == 75, out[-3000:]
    periodic = tmp_path / "run" / "checkpoints"
    saved = sorted(p.name for p in periodic.iterdir())
    victim = sorted((data / "gz2_5class_train").rglob("*.png"))[-1]
    victim.unlink()
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the data changed since this run started"), refused.stderr[-2000:]
    assert "train: 40 -> 39 examples" in last and str(victim.relative_to(data)) in last
    assert "--config.data.allow_changed=True" in last
    assert sorted(p.name for p in periodic.iterdir()) == saved  # nothing lost
    allowed = subprocess.run([*cmd, "--config.data.allow_changed=True"], cwd=ROOT, env=env, capture_output=True,
                             text=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert f"the data order restarts at step {_stopped_step(out)}" in allowed.stderr
    # 39 files in batches of 8: 2 epochs are now 2 x 4 steps (the run's length follows the new data).
    assert [r["step"] for r in _rows(tmp_path / "run" / "training_history.csv")][-1] == "8"


@pytest.mark.slow
def test_nonfinite_run_stops_after_the_limit_in_one_line(gz2_dir, env, tmp_path):
    proc = subprocess.run(_cli(tmp_path / "run", gz2_dir, "--config.optim.lr=1e30", "--config.optim.grad_clip=0",
                               "--config.train.skip_nonfinite=True", "--config.train.max_nonfinite_steps=3",
                               "--config.checkpoint.every_steps=1"),
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 non-finite step(s) in a row up to step "), last
    assert "(loss nan)" in last and "non-finite gradients: ['params']" in last and "optim.lr" in last
    stopped = int(last.split("up to step ")[1].split()[0])
    periodic = tmp_path / "run" / "checkpoints"
    saved = sorted(int(p.name) for p in periodic.iterdir())
    assert saved and max(saved) < stopped  # the resume points before the limit, none after
    state = checkpoint.read(tmp_path / "run", max(saved)).state
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["trainable"]))
