"""Workloads. `create(cfg)` builds the task named by `config.task`; `config_section(name)` is its part of the
config (added by `jaxvit.config.base_config(task)`)."""
from __future__ import annotations

import importlib
from pathlib import Path

import ml_collections

from jaxvit.errors import ConfigError
from jaxvit.tasks.base import Task

TASKS = {  # config.task -> "module:class"
    "classification": "jaxvit.tasks.classification:Classification",
    "regression": "jaxvit.tasks.regression:Regression",
    "biomass": "jaxvit.tasks.biomass.task:Biomass",
    "ssl": "jaxvit.tasks.ssl.task:SSL",
    "cell_distance": "jaxvit.tasks.cell_distance.task:CellDistance",
    "sar_grounding": "jaxvit.tasks.sar_grounding.task:SarGrounding",
}


def task_class(name: str):
    """The Task subclass registered as `name` (a ConfigError naming the known ones otherwise)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not a jaxvit task; use one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create(cfg, workdir: str | Path | None = None) -> Task:
    return task_class(cfg.task)(cfg, workdir)


def config_section(name: str) -> ml_collections.ConfigDict | None:
    """The task's own config keys (under `config.<task name>`), or None when it has none."""
    return task_class(name).default_config()
