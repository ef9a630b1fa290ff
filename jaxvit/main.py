"""jaxvit train: jaxvit train --config=gz2_lora[:variant] --workdir=DIR [--config.KEY=VALUE ...]

(the same as python -m jaxvit.main ...). --config takes a shipped config by name (`jaxvit configs` lists them) or a
config file path. --print_config prints the resolved config and exits; --dry_run checks everything a run needs
(config, data, weights, one compiled training step, one evaluation batch) without writing a checkpoint.

A mistake the user can fix (an unknown key, a bad value, missing data or weights) ends with one line on stderr
and exit code 2.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxvit import distributed
from jaxvit.config import check_overrides, resolve_config_spec
from jaxvit.errors import exit_on_user_error
from jaxvit.run_io import log_to_file, setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config by name (gz2_lora, gz2_lora:demo; `jaxvit configs` lists them) or a config "
    "file (path/to/config.py[:variant]). Override any key with --config.KEY=VALUE, e.g. --config.train.epochs=3",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, log.txt, reports. Resumes if it has any.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (file + overrides) and exit.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check the config, the data, the model with its weights, one "
                             "compiled and executed training step and one evaluation batch; write no checkpoint.")
flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (the run directory)")
    setup_logging()
    distributed.initialize()
    from jaxvit import accelerator, cv, train, xla_options
    xla_options.keep_cpu_heap()  # after jax.distributed is up, before anything starts the backends
    log_to_file(_WORKDIR.value)
    distributed.log_topology()
    exit_on_user_error(accelerator.check, _CONFIG.value.train.require_accelerator)
    if _CONFIG.value.cv.folds and not _DRY_RUN.value:
        exit_on_user_error(cv.run, _CONFIG.value, _WORKDIR.value)  # cross-validation: one run per fold
    else:
        exit_on_user_error(train.run, _CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value)


def _named_configs(argv: list[str]) -> list[str]:
    """argv with a shipped config name in --config (`gz2_lora:demo`) replaced by its file path."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config_spec(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config_spec(out[i + 1])
    return out


def cli(argv: list[str] | None = None) -> None:
    """`jaxvit train ...` / `python -m jaxvit.main ...`."""
    argv = sys.argv if argv is None else argv
    if "--help" in argv or "-h" in argv:  # this command's flags (absl's --help would list the caller's module)
        print(__doc__ + "\nflags:\n" + flags.FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    argv = exit_on_user_error(_named_configs, argv)
    exit_on_user_error(check_overrides, argv)  # unknown --config.KEY: the valid keys, not a traceback
    app.run(main, argv=argv)


if __name__ == "__main__":
    cli()
