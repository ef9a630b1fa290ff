"""Mistakes a user can fix (bad config value, missing data or weights): one line, exit code 2, no traceback.
A run stopped by a preemption signal after saving a resume point: one line, exit code PREEMPTED_EXIT (75)."""
from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(Exception):
    """Raised for input the user must change; the message names the key, file or value and what to do."""


class ConfigError(UserError, ValueError):
    """A config value out of range or of an unknown kind."""


class DataError(UserError, ValueError):
    """Data that do not fit what the run expects (class sets, columns, unreadable files)."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced non-finite losses or gradients (train.skip_nonfinite / train.max_nonfinite_steps)."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: launch/slurm.sbatch requeues the job on it


class Preempted(Exception):
    """Raised by the loop after it saved a resume point on a stop signal (jaxvit.cluster)."""


class WeightLoadError(UserError, ValueError):
    """Pretrained weights that cannot be found, downloaded or read."""


class MissingDataError(UserError, FileNotFoundError):
    """A data directory, split or file that does not exist."""


def exit_on_user_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn; a UserError ends the process with its message alone on stderr and exit code 2, Preempted with
    PREEMPTED_EXIT."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)
