"""Evaluators declared in the config, each run by the training loop on its own schedule and shared with the
command-line tools (`evaluate`, `probe`, `robustness`, `predict`); docs/evaluators.md.

    config.evals.<name> = dict(type=..., every_steps=0, split="", **the type's keys)

type: task (the task's own metrics: `Task.evaluate`, outputs -> score), knn, linear_probe, robustness, attention.
every_steps: 0 = at the loop's evaluation points (eval.every_steps, else each epoch); N = every N steps; every
evaluator also runs at the last step (and at step 0 with eval.at_start). split: "" = eval.val_split.
Results go to training_history.csv as `<name>_<metric>` and to TensorBoard as `<name>/<metric>`; the best
checkpoint follows checkpoint.best_metric = "<name>/<metric>". A config without `evals` gets the task's
`default_evals` (its own metrics on eval.val_split as "val": history columns val_<metric>, as before).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxvit import metrics
from jaxvit.errors import ConfigError
from jaxvit.evals import features, knn, linear, robustness

class Evaluator:
    """One declared evaluator: its keys (with defaults), the scalar metrics it reports and their direction."""

    keys: dict[str, Any] = {}  # the type's own keys and their defaults
    mode = "max"  # direction of its metrics for the best checkpoint (checkpoint.best_mode overrides)

    def __init__(self, name: str, spec: dict, cfg: Any):
        self.name, self.cfg, self.kind = name, cfg, spec["type"]
        self.opts = {**self.keys, **{k: v for k, v in spec.items() if k not in COMMON}}
        self.every_steps = int(spec.get("every_steps", 0))
        self.split = spec.get("split") or cfg.eval.val_split

    def metrics(self, task_cls: type) -> tuple[str, ...]:
        """Scalar results written to the history and TensorBoard (and usable as checkpoint.best_metric)."""
        return ()

    def splits(self) -> dict[str, str]:
        """{key: split} of every split the evaluator reads (checked against the config's splits)."""
        return {"split": self.split}

    def problems(self, task_cls: type) -> list[str]:
        """Type-specific bad values, one line each."""
        return []

    def due(self, step: int, default_every: int, total: int) -> bool:
        return step % (self.every_steps or default_every) == 0 or step == total

    def run(self, task: Any, model: Any, variables: dict, mesh: Any, workdir: Path | None) -> dict:
        """Metrics of the model (a dict with at least `metrics()`); `workdir` (process 0 only) for files."""
        raise NotImplementedError


class TaskMetrics(Evaluator):
    """The task's own metrics (`Task.evaluate`: outputs -> score) on `split`."""

    def metrics(self, task_cls: type) -> tuple[str, ...]:
        return tuple(task_cls.history_metrics)

    def run(self, task, model, variables, mesh, workdir):
        return task.evaluate(model, variables, self.split, mesh)


class _Labelled(Evaluator):
    """Evaluators on frozen backbone features of a task with class labels (classification, ssl)."""

    def splits(self) -> dict[str, str]:
        return {"split": self.split, "train_split": self.opts["train_split"] or self.cfg.data.train_split}

    def metrics(self, task_cls: type) -> tuple[str, ...]:
        return ("accuracy", "f1_macro")

    def problems(self, task_cls: type) -> list[str]:
        out = [] if task_cls.class_labels else [
            f"evals.{self.name}.type={self.kind!r}: the {task_cls.name} task has no class labels"]
        if self.opts["pool"] not in ("cls", "cls_mean"):
            out.append(f"evals.{self.name}.pool={self.opts['pool']!r}: use 'cls' or 'cls_mean'")
        return out

    def _features(self, task, model, variables, mesh, split: str, limit: int = 0):
        return features.labelled_features(task, model, variables, split, mesh, self.opts["pool"], limit,
                                          self.cfg.seed)

    def _scores(self, y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
        return {"accuracy": metrics.accuracy(y, pred), "f1_macro": metrics.macro_f1(y, pred, n_classes),
                "examples": int(len(y))}


class KNN(_Labelled):
    """Weighted k-NN (`evals.knn`) of `split` against a bank of `train_split` features."""

    keys = dict(train_split="", k=20, temperature=0.07, pool="cls", max_train=20000)

    def problems(self, task_cls: type) -> list[str]:
        out = super().problems(task_cls)
        if not (isinstance(self.opts["k"], int) and self.opts["k"] >= 1):
            out.append(f"evals.{self.name}.k={self.opts['k']!r}: must be an integer >= 1")
        return out

    def run(self, task, model, variables, mesh, workdir):
        o = self.opts
        train_f, train_y = self._features(task, model, variables, mesh, self.splits()["train_split"],
                                          o["max_train"])
        f, y = self._features(task, model, variables, mesh, self.split)
        n = len(task.source(self.split).classes)
        pred = knn.knn_predict(train_f, train_y, f, [o["k"]], o["temperature"], n)[o["k"]]
        return self._scores(y, pred, n) | {"k": o["k"], "train_examples": int(len(train_y))}


class LinearProbe(_Labelled):
    """Logistic regression (`evals.linear`) fitted on `train_split` features, L2 chosen on `val_split`."""

    keys = dict(train_split="", val_split="", pool="cls", l2=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2), steps=300,
                max_train=20000)

    def splits(self) -> dict[str, str]:
        return super().splits() | ({"val_split": self.opts["val_split"]} if self.opts["val_split"] else {})

    def run(self, task, model, variables, mesh, workdir):
        o = self.opts
        train = self._features(task, model, variables, mesh, self.splits()["train_split"], o["max_train"])
        val = self._features(task, model, variables, mesh, o["val_split"]) if o["val_split"] else None
        f, y = self._features(task, model, variables, mesh, self.split)
        n = len(task.source(self.split).classes)
        pred, info = linear.linear_probe(train, f, n, [float(v) for v in o["l2"]], val, o["steps"])
        return self._scores(y, pred, n) | {"l2": info["l2"]}


class Robustness(Evaluator):
    """Accuracy under corruptions (`evals.robustness`) of a classification model on `split`."""

    keys = dict(corruptions=tuple(robustness.SEVERITY), severities=(1, 2, 3, 4, 5))

    def metrics(self, task_cls: type) -> tuple[str, ...]:
        return ("clean", "mean_corrupted", *(f"mean_{c}" for c in self.opts["corruptions"]))

    def problems(self, task_cls: type) -> list[str]:
        out = [] if task_cls.classifier else [
            f"evals.{self.name}.type='robustness': measures a classifier's accuracy; the {task_cls.name} task "
            "is not one"]
        unknown = sorted(set(self.opts["corruptions"]) - set(robustness.SEVERITY))
        if unknown:
            out.append(f"evals.{self.name}.corruptions: unknown {unknown}; use some of "
                       + ", ".join(robustness.SEVERITY))
        if not all(s in (1, 2, 3, 4, 5) for s in self.opts["severities"]):
            out.append(f"evals.{self.name}.severities={tuple(self.opts['severities'])}: each in 1..5")
        return out

    def run(self, task, model, variables, mesh, workdir):
        r = robustness.corruption_accuracies(task, model, variables, task.source(self.split), mesh,
                                             tuple(self.opts["corruptions"]), tuple(self.opts["severities"]))
        return {"clean": r["clean"], "mean_corrupted": r["mean_corrupted"],
                **{f"mean_{c}": m for c, m in r["mean"].items()}, "accuracy": r["accuracy"]}


class Attention(Evaluator):
    """The last block's [CLS] attention maps of the first `images` images of `split`, drawn into
    `<workdir>/<name>_<split>.png` (the teacher's for an SSL run). No metrics."""

    keys = dict(images=4)

    def problems(self, task_cls: type) -> list[str]:
        n = self.opts["images"]
        return [] if isinstance(n, int) and n >= 1 else [f"evals.{self.name}.images={n!r}: must be an integer >= 1"]

    def run(self, task, model, variables, mesh, workdir):
        if workdir is None:
            return {}
        from jaxvit import report
        vit = task.backbone_module(model)
        if vit is None:
            raise ConfigError(f"evals.{self.name}.type='attention': the {task.name} model has no ViT backbone")
        src = task.source(self.split)
        transform = task.split_transform(self.split)
        images = np.stack([transform(src[i])["image"] for i in range(min(self.opts["images"], len(src)))])
        maps = np.asarray(features.attention_fn(vit.cfg)(task.backbone_variables(variables), images))
        d = task.cfg.data
        report.plot_attention_maps(images, maps, tuple(d.mean), tuple(d.std),
                                   Path(workdir) / f"{self.name}_{report.stem(self.split)}.png")
        return {}


TYPES = {"task": TaskMetrics, "knn": KNN, "linear_probe": LinearProbe, "robustness": Robustness,
         "attention": Attention}
COMMON = ("type", "every_steps", "split")


def specs(cfg: Any) -> dict[str, dict]:
    """{name: spec} of config.evals, or the task's default evaluators when it declares none."""
    from jaxvit import tasks
    declared = cfg.get("evals")
    if declared:
        return {name: dict(spec) if hasattr(spec, "keys") else spec for name, spec in declared.items()}
    return tasks.task_class(cfg.task).default_evals(cfg)


def problems(cfg: Any) -> list[str]:
    """One line per bad evaluator (unknown type or key, a split the config does not have, a bad schedule) and a
    checkpoint.best_metric that no evaluator reports."""
    from jaxvit import tasks
    task_cls, out, made = tasks.task_class(cfg.task), [], {}
    known = {s for s in (cfg.data.train_split, cfg.eval.val_split, cfg.eval.test_split) if s}
    for name, spec in specs(cfg).items():
        if not isinstance(spec, dict):
            out.append(f"evals.{name}={spec!r}: must be a dict(type=..., ...)")
            continue
        if "/" in name or name == "train":
            out.append(f"evals.{name}: an evaluator name may not contain '/' or be 'train'")
        kind = spec.get("type")
        if kind not in TYPES:
            out.append(f"evals.{name}.type={kind!r}: use one of {', '.join(repr(t) for t in TYPES)}")
            continue
        unknown = sorted(set(spec) - set(COMMON) - set(TYPES[kind].keys))
        if unknown:
            out.append(f"evals.{name}.{unknown[0]}: not a key of a {kind!r} evaluator; use "
                       + ", ".join((*COMMON, *TYPES[kind].keys)))
            continue
        every = spec.get("every_steps", 0)
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
            out.append(f"evals.{name}.every_steps={every!r}: must be an integer >= 0 (0 = the loop's evaluation "
                       "points)")
            continue
        e = made[name] = TYPES[kind](name, spec, cfg)
        for key, split in e.splits().items():
            if split not in known:
                out.append(f"evals.{name}.{key}={split!r}: not a split of this config; use one of "
                           f"{', '.join(repr(s) for s in sorted(known))} (data.train_split, eval.val_split, "
                           "eval.test_split)" if split else f"evals.{name}.{key} is empty and eval.val_split too")
        out += e.problems(task_cls)
    best = cfg.checkpoint.best_metric or task_cls.best_metric
    given = bool(cfg.checkpoint.best_metric or (made and cfg.eval.test_checkpoint == "best"))
    for key, (tag, _, mode), check in (("checkpoint.best_metric", (best, "", ""), given),
                                       *(("checkpoint.also_best", t.partition(":"), True)
                                         for t in cfg.checkpoint.also_best)):
        name, _, metric = tag.partition("/")
        if name in made and metric not in made[name].metrics(task_cls):
            out.append(f"{key}={tag!r}: evaluator {name!r} reports "
                       + (", ".join(f"{name}/{m}" for m in made[name].metrics(task_cls)) or "no metrics"))
        elif name not in made and check:
            out.append(f"{key}={tag!r}: no evaluator is named {name!r}; use '<evaluator>/<metric>' with one of "
                       f"{', '.join(made) or '(none declared)'}")
        if mode not in ("", "max", "min"):
            out.append(f"{key}: {tag}:{mode}: the direction after ':' is max or min")
    return out


def declared(cfg: Any) -> dict[str, Evaluator]:
    """The evaluators of a config (checked: ConfigError listing every problem)."""
    found = problems(cfg)
    if found:
        raise ConfigError("\n".join(found))
    return {name: TYPES[spec["type"]](name, spec, cfg) for name, spec in specs(cfg).items()}
