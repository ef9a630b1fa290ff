"""The `jaxvit` command: one command, subcommands, one flag vocabulary.

    jaxvit train --config=gz2_lora:demo --workdir=runs/demo      (also: python -m jaxvit.main ...)
    jaxvit evaluate --workdir=runs/demo --split=test
    jaxvit configs
    jaxvit data gz2 --hart_csv=... --mapping_csv=... --images_dir=... --out=data/gz2

Shared flag names: --workdir (a run directory), --output_dir (a directory written), --checkpoint (best | final |
latest | a step | best_<evaluator>_<metric>), --batch_size, --image_size, --data_dir, --config /
--config.KEY=VALUE. Older spellings still work for a while (hidden, with a deprecation warning).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

COMMANDS = {  # name -> (module, what it does)
    "train": ("jaxvit.main", "train (and test) a run from a config; --dry_run, --print_config"),
    "evaluate": ("jaxvit.evaluate", "metrics of a trained run (or an ensemble) on a split"),
    "predict": ("jaxvit.predict", "predictions for image files"),
    "probe": ("jaxvit.probe", "k-NN and linear probes of a backbone's frozen features"),
    "export": ("jaxvit.export", "a run's weights for PyTorch / transformers"),
    "robustness": ("jaxvit.robustness", "accuracy under corruptions (classification runs)"),
    "benchmark": ("jaxvit.benchmark", "training and inference speed, optionally against PyTorch"),
    "configs": ("jaxvit.cli", "list the shipped configs"),
    "data": ("jaxvit.cli", "build a data set from its published files into the layout a config reads"),
}
DATA_BUILDERS = {  # `jaxvit data NAME`: name -> (module with main(argv, prog), what it builds)
    "gz2": ("jaxvit.data.gz2", "Galaxy Zoo 2 five-class folders from the Hart et al. table and images_gz2"),
}


# ------------------------------------------------------------------------------------ shared flag helpers

class _Help(argparse.HelpFormatter):
    """Appends '(default: X)' where the help text does not already say its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def parser(command: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of `jaxvit COMMAND` (its description: the module docstring's first paragraph)."""
    return argparse.ArgumentParser(prog=f"jaxvit {command}", description=(doc or "").split("\n\n")[0],
                                   formatter_class=_Help)


class _Deprecated(argparse.Action):
    new = ""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated(ap: argparse.ArgumentParser, old: str, new: str, dest: str | None = None, **kwargs: Any) -> None:
    """`old` as a hidden alias of the flag `new` (same dest), warning when used."""
    action = type("Deprecated", (_Deprecated,), {"new": new})
    ap.add_argument(old, dest=dest or new.lstrip("-"), action=action, help=argparse.SUPPRESS, **kwargs)


def add_checkpoint(ap: argparse.ArgumentParser, default: str | None = "best", default_help: str = "") -> None:
    ap.add_argument("--checkpoint", default=default, type=lambda s: "latest" if s == "periodic" else s,
                    help="which weights: best (best validation metric) | best_<evaluator>_<metric> (a best of "
                         "checkpoint.also_best, e.g. best_val_f1_macro) | final (end of training) | latest (the "
                         "newest resume point; also 'periodic') | a step number" + default_help)


OVERRIDE_PREFIX = "--config.model.overrides."


def add_model_overrides(ap: argparse.ArgumentParser) -> None:
    """--config.model.overrides.FIELD=VALUE (ViTConfig fields, as in training configs); old: --override=k=v,..."""
    ap.set_defaults(override="")
    deprecated(ap, "--override", f"{OVERRIDE_PREFIX}FIELD=VALUE", dest="override")
    ap.add_argument_group("model overrides", f"{OVERRIDE_PREFIX}FIELD=VALUE (repeatable): ViTConfig fields, as "
                      f"config.model.overrides of a training config, e.g. {OVERRIDE_PREFIX}hidden_size=64 "
                      f"{OVERRIDE_PREFIX}depth=2")


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, with --config.model.overrides.FIELD=VALUE collected into args.override ("k=v,k=v")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len(OVERRIDE_PREFIX):] for a in argv if a.startswith(OVERRIDE_PREFIX)]
    args = ap.parse_args([a for a in argv if not a.startswith(OVERRIDE_PREFIX)])
    if overrides:
        if not hasattr(args, "override"):
            ap.error(f"{OVERRIDE_PREFIX}...: this command takes no model overrides")
        args.override = ",".join(filter(None, [args.override, *overrides]))
    return args


# ------------------------------------------------------------------------------------------- commands

def list_configs() -> str:
    """One line per shipped config: name and the first line of its docstring."""
    import ast

    from jaxvit.config import packaged_configs
    lines = []
    for name, path in packaged_configs().items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines.append(f"{name:18s} {doc.splitlines()[0] if doc else ''}")
    return "\n".join(lines)


def data(argv: list[str]) -> Any:
    """`jaxvit data NAME [flags]`: the builder NAME's command line (its --help lists its flags)."""
    rows = "\n".join(f"  {name:6s} {what}" for name, (_, what) in DATA_BUILDERS.items())
    ap = argparse.ArgumentParser(prog="jaxvit data", usage="jaxvit data NAME [flags]   (jaxvit data NAME --help: "
                                 "its flags)", description=f"{COMMANDS['data'][1]}.\n\nbuilders:\n{rows}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=DATA_BUILDERS, help="the data set to build")
    ap.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)  # --help, or a name it knows
    module, _ = DATA_BUILDERS[argv[0]]
    return importlib.import_module(module).main(argv[1:], prog=f"jaxvit data {argv[0]}")


def usage() -> str:
    rows = "\n".join(f"  {name:11s} {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: jaxvit COMMAND [flags]   (jaxvit COMMAND --help: its flags)\n\ncommands:\n{rows}\n\n"
            "Shared flags: --workdir, --output_dir, --checkpoint best|final|latest|STEP, --batch_size, --image_size, "
            "--data_dir,\n--config=NAME[:variant] | PATH and --config.KEY=VALUE (train), "
            "--config.model.overrides.FIELD=VALUE (probe, benchmark).")


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"error: unknown command {command!r}\n{usage()}")
    if command == "configs":
        print(list_configs())
        return None
    if command == "data":
        return data(rest)
    module = importlib.import_module(COMMANDS[command][0])
    if command == "train":
        return module.cli([f"jaxvit {command}", *rest])
    return module.main(rest)


if __name__ == "__main__":
    main()
