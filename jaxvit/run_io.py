"""Reading a training run's outputs: config, task, model and the weights of one checkpoint.

    run = load_run("runs/gz2", "best")     # or "final", "latest" (newest checkpoint), or a step: 1200
    logits = run.model.apply(run.variables, images)

`variables` are the evaluation weights ({"params": {"backbone", "head"}[, "lora"][, other collections]}): the
EMA weights when the run used EMA, exactly as the train loop evaluates; weights frozen for the whole run come
from their source (model.pretrained), checked against the checkpoint's fingerprint (`jaxvit.checkpoint.read`).
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
    checkpoint: str  # "<which>/<step>", e.g. "best/1200", "step/600"
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


def log_to_file(workdir: str | Path) -> Path:
    """Also append the log to WORKDIR/log.txt (kept across resumes): process 0's INFO and above, every other
    process's warnings and errors, each line marked with its process. Starts jax's backends."""
    path = Path(workdir) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    index = jax.process_index()
    handler = logging.FileHandler(path, mode="a")
    handler.setLevel(logging.INFO if index == 0 else logging.WARNING)
    handler.setFormatter(logging.Formatter(f"%(asctime)s p{index} %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("jaxvit").setLevel(logging.INFO)  # reaches the file whatever the root logger's level
    logging.captureWarnings(True)  # Python warnings (deprecations, ...) go to the log too
    return path


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


def _task_of(workdir: Path, data_dir: str | None = None) -> tuple[mlc.ConfigDict, Task]:
    cfg = load_config(workdir)
    if data_dir:
        cfg.data.data_dir = str(data_dir)
    cfg.data.demo = ""  # never re-write a data set when only reading a run
    return cfg, tasks.create(cfg, workdir)


def _source(cfg: mlc.ConfigDict, task: Task) -> checkpoint.Source:
    def build() -> dict:
        with _quiet(log, logging.WARNING):
            return task.build(jax.random.key(cfg.seed))[1]
    return checkpoint.Source(build, checkpoint.frozen_source(cfg), cfg.model.frozen_dtype)


def source_of(workdir: str | Path) -> checkpoint.Source:
    """What the run started from (pretrained weights, the seed's initialisation), for `checkpoint.read`."""
    return _source(*_task_of(Path(workdir).absolute()))


def load_run(workdir: str | Path, which: str | int = "best", data_dir: str | None = None) -> Run:
    """Config, task, model and evaluation variables of a checkpoint (best | final | latest | a step, see
    `jaxvit.checkpoint.read`). `data_dir` replaces the data directory recorded in the config."""
    workdir = Path(workdir).absolute()
    cfg, task = _task_of(workdir, data_dir)
    saved = checkpoint.read(workdir, which, _source(cfg, task))
    model, template = build_for_run(cfg, task)
    variables = saved.variables()
    _check_matches(template, variables, str(saved.directory))
    log.info("loaded %s (%s, step %d%s)", workdir, saved.which, saved.step, ", EMA weights" if saved.ema else "")
    return Run(workdir, cfg, task, model, variables, f"{saved.which}/{saved.step}", saved.step, saved.ema)


def describe(run: Run) -> dict[str, Any]:
    """What identifies the weights used, for result files."""
    return {"workdir": str(run.workdir), "checkpoint": run.checkpoint, "ema": run.ema}
