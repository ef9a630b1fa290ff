"""Mistakes a user can fix (bad config value, missing data or weights): one line, exit code 2, no traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(Exception):
    """Raised for input the user must change; the message names the key, file or value and what to do."""


class ConfigError(UserError, ValueError):
    """A config value out of range or of an unknown kind."""


class DataError(UserError, ValueError):
    """Data that do not fit what the run expects (class sets, columns, unreadable files)."""


class WeightLoadError(UserError, ValueError):
    """Pretrained weights that cannot be found, downloaded or read."""


class MissingDataError(UserError, FileNotFoundError):
    """A data directory, split or file that does not exist."""


def exit_on_user_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call fn; a UserError ends the process with its message alone on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
