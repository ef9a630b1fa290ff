"""The task interface: what a workload gives the training loop, the evaluation tools and export.

The loop (`jaxvit.train`) owns optimisation, sharding, phases, EMA, checkpoints and logs; a task owns the
model, the data fields, the loss, evaluation and prediction. Adding a workload is a subclass of `Task` in
`jaxvit/tasks/<name>.py`, an entry in `jaxvit.tasks.TASKS` and a config file.
"""
from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvit import inference, lora, report
from jaxvit import demos
from jaxvit.data import pipeline, preflight
from jaxvit.errors import ConfigError, DataError, UserError
from jaxvit.models import ViT, get_config, load_pretrained
from jaxvit.models.heads import Classifier

log = logging.getLogger("jaxvit")

# train_transform(example, rng) -> dict of arrays; eval_transform(example) -> dict of arrays (see data.pipeline)
TrainTransform = Callable[[dict, np.random.Generator], dict]
EvalTransform = Callable[[dict], dict]


class Task:
    """Subclasses set the class attributes and implement the methods that raise NotImplementedError."""

    name = ""
    best_metric = "val/loss"  # "<evaluator>/<metric>" (jaxvit.evals; "val": the default): picks `best`
    best_mode = "min"  # "min" | "max"
    history_metrics: tuple[str, ...] = ("loss",)  # evaluate() results written to training_history.csv
    # metric -> a second history column name that the original project's scripts read (train_<alias>, val_<alias>)
    history_aliases: dict[str, str] = {}
    default_export_checkpoint = "best"  # what `jaxvit export` reads without --checkpoint
    head = r"^params/head/"  # regex of the variables a head-only phase trains
    frozen = ""  # regex of variables no phase trains (e.g. a feature model), stored in model.frozen_dtype
    export_refusal = ""  # non-empty: no PyTorch export, refused in one line saying what to use instead
    supports_cv = False  # cross-validation (cv.folds): the source honours cv.fold and write_predictions the folds
    classifier = False  # class_probabilities gives [B, K] (the robustness report)
    class_labels = False  # sources carry integer labels and class names (k-NN and linear-probe evaluators)

    @classmethod
    def dry_run_config(cls, cfg):
        """The config a dry run (`jaxvit train --dry_run`) checks: the run's own, unless the task would first spend
        minutes on a preparation a real run does once (then the dry run skips it and says so)."""
        return cfg

    def __init__(self, cfg, workdir: str | Path | None = None):
        self.cfg, self.workdir = cfg, workdir
        if problems := self.config_problems(cfg):
            raise ConfigError("\n".join(problems))

    # -- config
    @staticmethod
    def default_config() -> ml_collections.ConfigDict | None:
        """The task's own config section (`config.<name>`), or None when it has none."""
        return None

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        """One line per bad value of the task's config (its own section, or the shared keys it needs); collected
        with the shared checks by `jaxvit.config.problems`."""
        return []

    # -- data
    def source(self, split: str) -> Any:
        """Random-access source of `split`: __len__ and __getitem__(i) -> dict of cheap fields."""
        raise NotImplementedError

    def train_transform(self) -> TrainTransform:
        raise NotImplementedError

    def eval_transform(self) -> EvalTransform:
        raise NotImplementedError

    def split_transform(self, split: str) -> EvalTransform:
        """The evaluation transform of `split`'s examples (evaluators on frozen features, attention maps)."""
        return self.eval_transform()

    def prepare(self) -> None:
        """Put the data in place before anything reads them (process 0 only): the demo set of `data.demo`."""
        demos.write(self.cfg.data.demo, self.cfg.data.data_dir, self.cfg.seed)

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        """Check the data of `splits` before training (counts, readability: `check_files`); raise a UserError
        on problems. `manifest` is None on processes other than 0."""

    def run_files(self) -> dict[str, Any]:
        """JSON files the task writes into the workdir (name -> content), e.g. the class names."""
        return {}

    # -- model
    def build(self, rng: jax.Array) -> tuple[Any, dict]:
        """(model, variables) with pretrained weights loaded; variables are collections {"params", ...}."""
        raise NotImplementedError

    def steps_per_epoch(self, n_examples: int, batch_size: int) -> int:
        """Steps of one "epoch" (train.epochs, evaluation points, epoch-based schedules): one pass over the data;
        SSL counts official epochs of a fixed length instead."""
        return pipeline.steps_per_epoch(n_examples, batch_size)

    def set_run_length(self, total_steps: int, steps_per_epoch: int) -> None:
        """Told by the loop before building the step (tasks with step-dependent schedules keep them)."""
        self.total_steps, self.epoch_steps = total_steps, steps_per_epoch

    def batch_transform(self) -> Callable[[dict, np.random.Generator], dict] | None:
        """fn(local batch, rng) -> batch, run on each process's batch before the step (e.g. iBOT masks, which
        are stratified over a batch); the rng is a function of (seed, step, process). None: no such step."""
        return None

    def lr_gates(self, steps_per_epoch: int) -> tuple[tuple[str, int], ...]:
        """((regex over variable paths, step), ...): those variables' lr is 0 before that step of a phase."""
        return ()

    def after_update(self, params: dict, mutable: dict, step: jax.Array) -> dict:
        """Task state after the optimizer step (inside the jitted step): `params` are the updated parameter
        collections, `step` the step just taken; returns the new mutable collections (e.g. an EMA teacher)."""
        return mutable

    def depth(self, model: Any) -> int:
        """Blocks of the backbone (layer-wise learning-rate decay)."""
        return model.backbone.depth

    def loss(self, model: Any, variables: dict, batch: dict, rng: jax.Array, step: jax.Array
             ) -> tuple[jax.Array, dict, dict]:
        """(per-example loss [B], per-example metrics {name: [B]}, updated mutable collections {name: tree});
        `step` is the train step (an int32 array) for step-dependent schedules."""
        raise NotImplementedError

    # -- evaluation and prediction
    @classmethod
    def default_evals(cls, cfg) -> dict[str, dict]:
        """The evaluators (`jaxvit.evals`) of a config that declares no `evals`: the task's own metrics on
        eval.val_split, named "val" (history columns val_<metric>, best metric "val/<metric>")."""
        return {"val": dict(type="task")} if cfg.eval.val_split else {}

    def evaluate(self, model: Any, variables: dict, split: str, mesh: Any, out_dir: Path | None = None,
                 extra: dict | None = None) -> dict:
        """Metrics of `split` (a JSON-able dict with at least the keys of history_metrics, plus `extra`); with
        `out_dir`, also the task's report files. Every process calls it; only process 0 passes out_dir."""
        src = self.source(split)
        outputs, ok = self.outputs(model, variables, src, mesh)
        return self.score(outputs, ok, src, out_dir, {"tta": list(self.cfg.eval.tta)} | (extra or {}))

    def outputs(self, model: Any, variables: dict, src: Any, mesh: Any) -> tuple[np.ndarray, np.ndarray]:
        """(predict_fn's outputs [N, ...], readable mask [N]) over a source, in its order (ensembles average these)."""
        return inference.map_source(_batch_fn(self, model), variables, src, self.eval_transform(), self.cfg.data,
                                    self.cfg.eval.batch_size, mesh)

    def ensemble_outputs(self, members: list[tuple[Task, Any, dict]], src: Any, mesh: Any
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, readable mask) of an ensemble of (task, model, variables) runs of this task over `src`: the
        mean of the members' `outputs`, each member preprocessing with its own config. Tasks whose outputs are
        reduced per batch (dense maps) average the members inside the batch instead."""
        total, ok = None, None
        for task, model, variables in members:
            out, member_ok = task.outputs(model, variables, src, mesh)
            total = out if total is None else total + out
            ok = member_ok if ok is None else ok & member_ok
        return total / len(members), ok

    def score(self, outputs: np.ndarray, ok: np.ndarray, src: Any, out_dir: Path | None = None,
              extra: dict | None = None) -> dict:
        """Metrics (and, with out_dir, report files) of outputs against the source's targets."""
        raise NotImplementedError

    def predict_fn(self, model: Any) -> Callable[[dict, jax.Array], jax.Array]:
        """fn(variables, images) -> per-example outputs (probabilities, regression values, ...), with eval.tta."""
        raise NotImplementedError

    def predict_files(self, model: Any, variables: dict, paths: list[Path], output: Path, batch_size: int
                      ) -> list[dict] | None:
        """Tasks whose outputs are images (dense or generative): write each input's output files into the
        directory `output` and return one record per input. None (the default): `jaxvit.predict` uses predict_fn."""
        return None

    def describe_prediction(self, output: np.ndarray) -> dict:
        """One example's output as a JSON-able record."""
        return {"output": np.asarray(output).tolist()}

    def class_probabilities(self, model: Any, variables: dict, images: jax.Array) -> jax.Array:
        """Class probabilities [B, K] of normalised images without test-time views (tasks with `classifier`)."""
        raise UserError(f"the {self.name} task has no class probabilities (robustness measures a classifier)")

    # -- the ViT inside the model (attention maps, the probe's features, the standard export)
    def backbone_module(self, model: Any) -> ViT | None:
        """The ViT whose attention maps and features the tools read; None: the model has none."""
        return ViT(model.backbone)

    def backbone_variables(self, variables: dict) -> dict:
        """That ViT's variables for `ViT.apply` (LoRA adapters kept separate), from the model's variables."""
        return {col: tree["backbone"] for col, tree in variables.items() if "backbone" in tree}

    # -- export (`python -m jaxvit.export`)
    def export(self, run: Any, out: Path) -> Path | None:
        """Write the task's PyTorch export into `out` (a loaded `jaxvit.run_io.Run`); None (the default): the
        standard one, backbone + head (+ PEFT adapter) of `jaxvit.export`. Raise a UserError to refuse."""
        return None

    def export_extra(self, run: Any, out: Path) -> None:
        """Files the standard export adds for this task (e.g. a transformers classifier); none by default."""

    def check_export(self, run: Any, out: Path, images: np.ndarray) -> dict[str, float] | None:
        """{name: largest relative difference} of the export in `out` reloaded against the run's model on
        `images` [N, S, S, C]; None: the standard check of `jaxvit.export`."""
        return None
    def write_submission(self, path: Path, src: Any, outputs: np.ndarray) -> None:
        """The file a cross-validation ensemble's predictions of `src` go to (cv.predict_split)."""
        self.write_predictions(path, src.paths, outputs)

    def write_predictions(self, path: Path, paths: list[str], outputs: np.ndarray) -> None:
        """A CSV of outputs [N, K], one row per image path."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", *(f"output_{i}" for i in range(outputs.shape[1]))])
            w.writerows([p, *(repr(float(v)) for v in row)] for p, row in zip(paths, outputs))


def build_head_model(cfg, num_outputs: int, rng: jax.Array, make_model: Callable[..., Any] = Classifier
                     ) -> tuple[Any, dict]:
    """Backbone + pooled head ({"params": {"backbone", "head"}[, "lora"]}), pretrained weights loaded, LoRA
    adapters added when lora.enabled. Used by the classification, regression and biomass tasks; `make_model`
    takes the Classifier's fields (a model with the same `backbone/` and `head/` paths)."""
    runtime = dict(dtype=cfg.model.dtype, remat=cfg.model.remat, drop_path=cfg.model.drop_path,
                   lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, **cfg.model.overrides.to_dict())
    if cfg.model.pretrained:
        backbone, backbone_params = load_pretrained(cfg.model.pretrained, **runtime)
        vit_cfg = backbone.cfg
    else:
        vit_cfg, backbone_params = get_config(cfg.model.arch, **runtime), None
    m = cfg.model
    model = make_model(vit_cfg, num_outputs, m.pool, tuple(m.head_hidden), m.head_dropout, m.head_norm, m.head_act,
                       tuple(m.head_hidden_dropout))
    size = cfg.data.image_size
    init_rng, lora_rng = jax.random.split(rng)
    variables = jax.jit(model.init)(init_rng, jnp.zeros((1, size, size, vit_cfg.num_channels)))
    variables = {k: dict(v) for k, v in variables.items()}  # params [+ batch_stats of a BatchNorm head]
    fresh = ["params/head"]
    if backbone_params is not None:
        variables["params"]["backbone"] = backbone_params
    else:
        fresh.append("params/backbone")
    if cfg.lora.enabled:
        variables["lora"] = {"backbone": lora.init_adapters(variables["params"]["backbone"], cfg.lora.targets,
                                                            cfg.lora.rank, lora_rng)}
        fresh.append("lora (B = 0: starts equal to the base model)")
    log.info("initialised fresh (not in any checkpoint): %s", ", ".join(fresh))
    return model, variables


def finish_score(result: dict, src: Any, ok: np.ndarray, extra: dict | None, out_dir: Path | None, kind: str,
                 write: Callable[[Path], None]) -> dict:
    """Adds the unreadable paths and `extra` to a task's metrics; with out_dir, writes `<split>_results.json` and
    `<split>_<kind>.csv` (through `write(path)`). For tasks whose report is these two files."""
    result["unreadable"] = [src.paths[i] for i in np.flatnonzero(~ok)]
    result.update(extra or {})
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        report.write_results_json(Path(out_dir) / f"{report.stem(src.split)}_results.json", result)
        write(Path(out_dir) / f"{report.stem(src.split)}_{kind}.csv")
    return result


def apply_train(model, variables: dict, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
    """(outputs, updated mutable collections) of a training forward pass: collections other than params and
    lora (e.g. a BatchNorm head's batch_stats) are updated and returned for the train state."""
    mutable = [k for k in variables if k not in ("params", "lora")]
    if not mutable:
        return model.apply(variables, images, train=True, rngs={"dropout": rng}), {}
    out, updates = model.apply(variables, images, train=True, rngs={"dropout": rng}, mutable=mutable)
    return out, dict(updates)


def check_files(cfg, paths: list[str], decode: Callable[[str], Any], manifest: Path | None) -> None:
    """The readability part of the pre-flight check (`data.preflight`, cached in `manifest`). Only process 0
    reads the files: the others pass manifest=None and skip it. Unreadable files end the run before training
    when data.skip_bad_images is False (otherwise training replaces them and counts them)."""
    if manifest is None:
        return
    report = preflight.check_files(paths, cfg.data.preflight, decode, manifest, sample=cfg.data.preflight_sample,
                                   seed=cfg.seed)
    if report.unreadable and not cfg.data.skip_bad_images:
        raise DataError(f"{len(report.unreadable)} unreadable files (data.skip_bad_images=False): "
                        + "; ".join(f"{p}: {r}" for p, r in report.unreadable[:20]))


@functools.lru_cache(maxsize=32)
def _batch_fn(task: Task, model: Any) -> Callable:
    """One function object per (task, model), so every validation reuses one compiled program."""
    predict = task.predict_fn(model)
    return lambda variables, batch: predict(variables, batch["image"])
