"""Image regression: one or more real-valued targets per image from CSV files, MSE or smooth-L1 on
standardised targets, R^2 / RMSE / MAE; the best checkpoint has the highest validation R^2.

Data: `<data.data_dir>/{train,val,test}.csv`, each with an image-path column (relative to the CSV) and one
column per target. The targets' train-split mean and std are written to `target_stats.json`; the model
predicts standardised values and every output of the task is in the targets' own units. With eval.tta, evaluation
and prediction average the outputs over the test-time views (only sensible for targets the views leave unchanged).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvit import metrics, tta
from jaxvit.data.sources import CsvSource, load_image
from jaxvit.data.transforms import RGBExample, TransformConfig
from jaxvit.tasks.base import Task, apply_train, build_head_model, check_files, finish_score


class Regression(Task):
    name = "regression"
    best_metric = "val/r2"
    best_mode = "max"
    history_metrics = ("loss", "r2", "rmse", "mae")

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.image_column = "image_path"
        c.targets = ("target",)  # CSV columns to predict
        c.loss = "mse"  # mse | smooth_l1 (on standardised targets)
        return c

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        if cfg.regression.loss not in ("mse", "smooth_l1"):
            return [f"regression.loss={cfg.regression.loss!r}: use 'mse' or 'smooth_l1'"]
        return []

    def __init__(self, cfg, workdir: str | Path | None = None):
        super().__init__(cfg, workdir)
        self.names = list(cfg.regression.targets)
        saved = Path(workdir) / "target_stats.json" if workdir else None
        self._stats = json.loads(saved.read_text()) if saved is not None and saved.exists() else None

    @property
    def stats(self) -> dict[str, list[float]]:
        """Train-split mean and std of each target (saved with the run)."""
        if self._stats is None:
            t = self.source(self.cfg.data.train_split).targets
            self._stats = {"mean": t.mean(0).tolist(), "std": np.maximum(t.std(0), 1e-8).tolist()}
        return self._stats

    # -- data
    def source(self, split: str) -> CsvSource:
        r = self.cfg.regression
        src = CsvSource(Path(self.cfg.data.data_dir) / f"{split}.csv", r.image_column, tuple(r.targets))
        src.split = split  # names the report files
        return src

    def train_transform(self) -> RGBExample:
        return RGBExample(TransformConfig.from_config(self.cfg.data), self.cfg.data.cache_dir)

    eval_transform = train_transform

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        paths = [p for s in splits for p in self.source(s).paths]
        check_files(self.cfg, paths, load_image, manifest)

    def run_files(self) -> dict[str, Any]:
        return {"target_stats.json": {"targets": self.names, **self.stats}}

    # -- model and loss
    def build(self, rng: jax.Array):
        return build_head_model(self.cfg, len(self.names), rng)

    def _standardise(self, targets: jax.Array) -> jax.Array:
        return (targets - jnp.asarray(self.stats["mean"])) / jnp.asarray(self.stats["std"])

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array, step=None):
        out, updates = apply_train(model, variables, batch["image"], rng)
        err = out.astype(jnp.float32) - self._standardise(batch["targets"])
        per_target = err ** 2 if self.cfg.regression.loss == "mse" else optax.huber_loss(err, delta=1.0)
        return per_target.mean(-1), {"abs_error_std": jnp.abs(err).mean(-1)}, updates

    # -- evaluation and prediction
    def predict_fn(self, model) -> Callable:
        mean, std = jnp.asarray(self.stats["mean"]), jnp.asarray(self.stats["std"])
        views = tuple(self.cfg.eval.tta)
        return lambda variables, images: tta.average(
            lambda x: model.apply(variables, x).astype(jnp.float32), images, views) * std + mean

    def score(self, outputs: np.ndarray, ok: np.ndarray, src, out_dir: Path | None = None,
              extra: dict | None = None) -> dict:
        true = src.targets[ok]
        result = metrics.regression_metrics(outputs[ok], true, self.names)
        std = np.asarray(self.stats["std"])
        result["loss"] = float((((outputs[ok] - true) / std) ** 2).mean())  # MSE in standardised units
        kept = [src.paths[i] for i in np.flatnonzero(ok)]
        return finish_score(result, src, ok, extra, out_dir, "predictions",
                            lambda path: self.write_predictions(path, kept, outputs[ok], true))

    def describe_prediction(self, output: np.ndarray) -> dict:
        return {"targets": {n: float(v) for n, v in zip(self.names, output)}}

    def write_predictions(self, path: Path, paths: list[str], outputs: np.ndarray,
                          true: np.ndarray | None = None) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", *(f"pred_{n}" for n in self.names), *(f"true_{n}" for n in self.names if
                                                                     true is not None)])
            for i, (p, row) in enumerate(zip(paths, outputs)):
                w.writerow([p, *(repr(float(v)) for v in row),
                            *(repr(float(v)) for v in (true[i] if true is not None else ()))])
