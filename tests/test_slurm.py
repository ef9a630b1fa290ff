"""The real launch/slurm.sbatch on a real one-node SLURM cluster (launch/slurm_local/setup.sh: slurm-wlm + munge on
this machine, 2 CPUs): 2 tasks (one CPU device each) train the tiny demo; `scancel --signal=USR1 --batch` (what
`--signal=B:USR1@120` sends before the time limit) makes the batch shell forward it, both tasks save a resume point
and exit 75, the job requeues itself and finishes with the result of an uninterrupted one-process run.
Skipped, with the reason, where the cluster cannot start (not root, no apt, no network for the packages)."""
import os
import re
import subprocess
import sys
import time

import pytest

from helpers.tiny import ROOT
from test_cluster import _assert_same_result, _cli

pytestmark = pytest.mark.slow
SETUP = ROOT / "launch" / "slurm_local" / "setup.sh"


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (launch/slurm_local/setup.sh installs and starts daemons)")
    try:
        proc = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"launch/slurm_local/setup.sh could not run: {e}")
    if proc.returncode != 0:
        pytest.skip("launch/slurm_local/setup.sh failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])


def _job(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(what, seconds: float, out) -> None:
    deadline = time.time() + seconds
    while not what():
        assert time.time() < deadline, out.read_text()[-4000:] if out.exists() else "no output"
        time.sleep(0.2)


def test_sbatch_two_tasks_preempted_requeue_and_match_one_process(slurm, gz2_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHON=sys.executable,
               PYTHONPATH=str(ROOT))
    t0 = time.time()
    subprocess.run(_cli(tmp_path / "one", gz2_dir), cwd=ROOT, env=env, check=True, capture_output=True)
    out = tmp_path / "slurm.out"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--gpus-per-node=0", "--time=20", f"--output={out}", str(ROOT / "launch" / "slurm.sbatch"),
                          *_cli(tmp_path / "two", gz2_dir)[3:]],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        _wait(lambda: out.exists() and "1: " in out.read_text() and " step 2/" in out.read_text(), 300, out)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        _wait(lambda: _job(job).get("Restarts") == "1", 120, out)
        # A requeued job waits cred_expire seconds (10 in launch/slurm_local's slurm.conf, 120 by default) before it
        # may start again; starting it sooner kills it ("job credential revoked").
        _wait(lambda: _job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 400, out)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = out.read_text()
    print(f"one process + SLURM job with a requeue: {time.time() - t0:.0f} s")
    assert _job(job)["JobState"] == "COMPLETED", text[-4000:]
    assert "jaxvit: SIGUSR1: forwarding to the tasks" in text
    assert "0: preempted: a signal to another process" in text or "0: preempted: SIGUSR1" in text
    assert "jaxvit: preempted after a resume point; requeueing job" in text and "(restart 1)" in text
    stopped = int(text.split("stopped after step ", 1)[1].split()[0])
    assert f"resumed from step {stopped}" in text
    assert "process 1 of 2 on 1 x cpu; 2 global devices" in text
    _assert_same_result(tmp_path / "two", tmp_path / "one")
