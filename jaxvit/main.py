"""Entry point: python -m jaxvit.main --config=configs/gz2_lora.py[:variant] --workdir=DIR [--config.key=value]"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxvit import distributed
from jaxvit.config import check_overrides

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file under configs/, e.g. configs/gz2_lora.py:demo",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, reports. Resumes if it has any.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    distributed.initialize()
    from jaxvit import train  # after jax.distributed is up
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    check_overrides(sys.argv)  # unknown --config.KEY: a message listing the valid keys, not a traceback
    app.run(main)
