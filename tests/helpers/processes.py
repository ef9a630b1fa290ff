"""Runs a training CLI to the end, and again killed with SIGKILL part-way and resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers.tiny import ROOT


def run_killed_and_resumed(cli, tmp_path: Path, kill_after: int = 3) -> None:
    """Runs `cli(workdir)` to the end in tmp_path/ref; in tmp_path/run, kills it with SIGKILL once its resume
    point `kill_after` exists, checks it had not finished, and runs it again to the end (resuming)."""
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
