"""Entry point: python -m jaxvit.main --config=configs/gz2_lora.py[:variant] --workdir=DIR [--config.key=value]

A mistake the user can fix (an unknown key, a bad value, missing data or weights) ends with one line on stderr
and exit code 2.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxvit import distributed
from jaxvit.config import check_overrides
from jaxvit.errors import exit_on_user_error
from jaxvit.run_io import setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file under configs/, e.g. configs/gz2_lora.py:demo",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, reports. Resumes if it has any.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    distributed.initialize()
    from jaxvit import cv, train, xla_options
    xla_options.keep_cpu_heap()  # after jax.distributed is up, before anything starts the backends
    distributed.log_topology()
    run = cv.run if _CONFIG.value.cv.folds else train.run  # cross-validation: one run per fold
    exit_on_user_error(run, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    exit_on_user_error(check_overrides, sys.argv)  # unknown --config.KEY: the valid keys, not a traceback
    app.run(main)
