"""Reading a training run's outputs: config, task, model and the weights of one checkpoint.

    run = load_run("runs/gz2", "best")     # or "final", "periodic" (newest resume point), or a step: 1200
    logits = run.model.apply(run.variables, images)

`variables` are the evaluation weights ({"params": {"backbone", "head"}[, "lora"][, other collections]}): the
EMA weights when the run used EMA, exactly as the train loop evaluates. Workdirs written before the task
redesign (checkpoints `best_acc` / `best_f1` / `final` with a full train state) load too; "best" finds their
`best_acc`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from flax import traverse_util

from jaxvit import checkpoint, lora, tasks
from jaxvit.config import MOVED, base_config
from jaxvit.errors import DataError, MissingDataError
from jaxvit.models import WeightLoadError
from jaxvit.tasks.base import Task

log = logging.getLogger("jaxvit")


@dataclasses.dataclass
class Run:
    workdir: Path
    cfg: mlc.ConfigDict
    task: Task
    model: Any
    variables: dict
    checkpoint: str  # "<name>/<step>", e.g. "best/1200"
    step: int
    ema: bool  # whether `variables` hold EMA weights

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    def backbone_params(self) -> dict:
        """The task's ViT params (`Task.backbone_variables`) with any LoRA adapters merged in: plain ViT weights."""
        v = self.task.backbone_variables(self.variables)
        if "lora" not in v:
            return v["params"]
        return lora.merge(v["params"], v["lora"], self.task.backbone_module(self.model).cfg.lora_alpha)


def setup_logging() -> None:
    """INFO logs for the command-line tools, without the libraries' chatter."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet(logger: logging.Logger, level: int):
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _update(cfg: mlc.ConfigDict, values: dict) -> None:
    free_form = not len(cfg)  # an empty section (model.overrides) takes any key
    for k, v in values.items():
        if k not in cfg and not free_form:
            log.warning("config.json key %r is not a config key any more; ignored", k)
        elif isinstance(v, dict) and isinstance(cfg.get(k), mlc.ConfigDict):
            _update(cfg[k], v)
        else:
            cfg[k] = tuple(v) if isinstance(v, list) else v


_RENAMED = {("eval", "test_checkpoint"): {"best_acc": "best", "best_f1": "best"}}


def load_config(workdir: str | Path) -> mlc.ConfigDict:
    """The run's resolved config (`config.json`) over today's defaults, so keys added since still exist."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise MissingDataError(f"{path} not found: is {workdir} a jaxvit run directory?")
    saved = json.loads(path.read_text())
    cfg = base_config(saved["task"]) if "task" in saved else base_config()
    for (section, key), renames in _RENAMED.items():
        value = saved.get(section, {}).get(key)
        if value in renames:
            saved[section][key] = renames[value]
    for old, new in MOVED.items():  # keys moved since the run was written
        (section, key), (new_section, sub, _) = old.split("."), new.split(".")
        if key in saved.get(section, {}) and new_section in cfg:
            saved.setdefault(new_section, {}).setdefault(sub, {})[key] = saved[section].pop(key)
    _update(cfg, saved)
    return cfg


def build_for_run(cfg: mlc.ConfigDict, task: Task) -> tuple[Any, dict]:
    """The run's model, built as training built it, and the shapes of its variables (abstract: nothing is
    initialised or compiled). Where the pretrained weights are not available here, the architecture comes from
    `model.arch` + `model.overrides` instead (the weights come from the checkpoint either way; a mismatch is
    then reported by shape)."""
    def build(t: Task) -> tuple[Any, dict]:
        built = {}

        def variables():
            built["model"], v = t.build(jax.random.key(t.cfg.seed))
            return v
        with _quiet(log, logging.WARNING):  # build's "initialised fresh ..." is about the template only
            shapes = jax.eval_shape(variables)
        return built["model"], shapes

    try:
        return build(task)
    except (WeightLoadError, FileNotFoundError) as e:
        log.warning("pretrained weights %r not available (%s); using the architecture of model.arch=%r",
                    cfg.model.pretrained, e, cfg.model.arch)
        cfg = cfg.copy_and_resolve_references()
        cfg.model.pretrained = ""
        return build(tasks.create(cfg, task.workdir))


def _check_matches(template: dict, variables: dict, where: str) -> None:
    want = {k: v.shape for k, v in traverse_util.flatten_dict(template).items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}
    problems = [f"missing {'/'.join(k)}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {'/'.join(k)}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{'/'.join(k)}: checkpoint {got[k]}, model {want[k]}" for k in sorted(want.keys() & got.keys())
                 if want[k] != got[k]]
    if problems:
        raise DataError(f"{where} does not match the model its config.json describes:\n  "
                         + "\n  ".join(problems[:20]))


def load_run(workdir: str | Path, checkpoint_name: str | int = "best", data_dir: str | None = None) -> Run:
    """Config, task, model and evaluation variables of a checkpoint (see `jaxvit.checkpoint.find`).
    `data_dir` replaces the data directory recorded in the config."""
    workdir = Path(workdir).absolute()
    cfg = load_config(workdir)
    if data_dir:
        cfg.data.data_dir = str(data_dir)
    cfg.data.demo = ""  # never re-write a data set when only reading a run
    task = tasks.create(cfg, workdir)
    name, step, directory = checkpoint.find(workdir, checkpoint_name)
    model, template = build_for_run(cfg, task)
    variables, step, ema = checkpoint.read_variables(directory)
    _check_matches(template, variables, str(directory))
    log.info("loaded %s (%s, step %d%s)", workdir, name, step, ", EMA weights" if ema else "")
    return Run(workdir, cfg, task, model, variables, f"{name}/{step}", step, ema)


def describe(run: Run) -> dict[str, Any]:
    """What identifies the weights used, for result files."""
    return {"workdir": str(run.workdir), "checkpoint": run.checkpoint, "ema": run.ema}
