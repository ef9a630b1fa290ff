"""Surviving clusters: a stop on a preemption signal that every process agrees on, and one writer per workdir.

Preemption: SLURM (`--signal`), Kubernetes and spot VMs send a signal some seconds before the kill. `StopSignals`
records it; at every step boundary the loop asks `requested(step)`, which (several processes) all-gathers each
process's flag, so that every process stops after the same step even when only one got the signal. The loop then
saves one resume point and the process exits with errors.PREEMPTED_EXIT (75, EX_TEMPFAIL: "try again").

Lock: `WorkdirLock` is a JSON file <workdir>/run.lock (host, pid, start time, SLURM job) that process 0 creates
at start and refreshes (its mtime, the heartbeat) every `HEARTBEAT_S` seconds from a thread. A second run on a live
workdir is refused in one line; a stale lock (a dead pid on this host, the same SLURM job requeued, or a heartbeat
older than the limit) is taken over with a warning.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np

from jaxvit.errors import UserError

log = logging.getLogger("jaxvit")
HEARTBEAT_S = 30.0


# ------------------------------------------------------------------------------------------- stop signals

class StopSignals:
    """Records the signals in `names` (e.g. ("SIGTERM", "SIGUSR1")) until `restore`."""

    def __init__(self, names: tuple[str, ...] | list[str], check_every: int = 1):
        self.received: str | None = None
        self.check_every = max(int(check_every), 1)
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():  # Python installs handlers there only
            log.warning("training outside the main thread: %s will not stop it cleanly", ", ".join(names))
            names = ()
        for name in names:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise UserError(f"train.preempt_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name  # the loop stops at the next step boundary

    def requested(self, step: int) -> bool:
        """Whether every process stops after `step`: the same answer on every process (a collective)."""
        import jax
        if jax.process_count() == 1:
            return self.received is not None
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        return bool(np.max(flags))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ------------------------------------------------------------------------------------------- workdir lock

def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; a killed process not yet reaped by its parent (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal test above is all there is


class WorkdirLock:
    """One writer per workdir (see the module docstring); `release` (also at exit) removes it."""

    def __init__(self, workdir: Path, stale_s: float):
        self.path = Path(workdir) / "run.lock"
        self.stale_s = stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.me = dict(host=socket.gethostname(), pid=os.getpid(),
                       started=datetime.datetime.now().isoformat(timespec="seconds"),
                       slurm_job=os.environ.get("SLURM_JOB_ID", ""))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            holder, age = self._holder()
            why = self._stale(holder, age)
            if why is None:
                raise UserError(
                    f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} (started "
                    f"{holder.get('started')}, heartbeat {age:.0f} s ago); stop that run, use another --workdir, "
                    f"or delete {self.path} if it is dead")
            if why:
                log.warning("taking over the lock of %s: %s (%s)", self.path.parent, why, holder)
            self.path.unlink(missing_ok=True)
            if not self._create():
                raise UserError(f"{self.path.parent}: another run took the lock {self.path} at the same time")
        atexit.register(self.release)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="jaxvit-lock-heartbeat")
        self._thread.start()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _holder(self) -> tuple[dict, float]:
        try:
            holder = json.loads(self.path.read_text() or "{}")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {}, float("inf")
        except ValueError:  # half-written by a run killed while creating it
            return {}, time.time() - self.path.stat().st_mtime
        return holder, age

    def _stale(self, holder: dict, age: float) -> str | None:
        """Why the lock may be taken ("" silently: this process's own), or None when it is live."""
        same_host = holder.get("host") == self.me["host"]
        if same_host and holder.get("pid") == self.me["pid"]:
            return ""
        if same_host and not _pid_alive(int(holder.get("pid", -1))):
            return "its process is dead"
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return "it belongs to this SLURM job before a requeue"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (limit {self.stale_s:.0f} s)"
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("the lock %s was removed while this run holds it", self.path)
                return

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._holder()
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


def lock_workdir(workdir: Path, stale_s: float) -> WorkdirLock | None:
    """Process 0 takes the lock; every process raises the same one-line error when it cannot."""
    import jax
    lock, error = None, ""
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, stale_s)
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
            error = f"process 0 could not take the lock of {workdir} (its log says why)"
    if error:
        raise UserError(error)
    return lock
