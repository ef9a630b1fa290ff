"""Cross-validation (`config.cv.folds`): each listed fold trains into WORKDIR/fold_<k> with that fold of the train
split held out for validation (the task decides the folds: `cv.fold_csv` or its own grouping), then

  WORKDIR/cv_results.json       per fold: the best checkpoint's validation metrics and the test metrics; the mean
                                and std over folds of each validation metric
  WORKDIR/oof_predictions.csv   every held-out image predicted by the best checkpoint of its fold (the task's
                                prediction layout, e.g. the biomass submission format)
  WORKDIR/submission.csv        with cv.predict_split: that split (e.g. the competition's unlabelled test.csv)
                                predicted by the mean of the folds' best checkpoints (the task's submission layout)

Each fold is an ordinary run: re-running the command resumes the fold that was interrupted.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from jaxvit import inference, run_io
from jaxvit.errors import DataError
from jaxvit.train import Trainer

log = logging.getLogger("jaxvit")


def run(cfg, workdir: str | Path) -> dict:
    workdir = Path(workdir)
    per_fold, paths, outputs, ensemble = {}, [], [], []
    for k in cfg.cv.folds:
        c = cfg.copy_and_resolve_references()
        c.cv.folds, c.cv.fold = (), int(k)
        log.info("cross-validation: fold %d of %s", k, tuple(cfg.cv.folds))
        test = Trainer(c, workdir / f"fold_{k}").run()
        fold_run = run_io.load_run(workdir / f"fold_{k}", "best")
        mesh = inference.run_mesh(fold_run.cfg)
        task = fold_run.task
        src = task.source(fold_run.cfg.eval.val_split)
        out, ok = task.outputs(fold_run.model, inference.place(fold_run.variables, mesh, fold_run.cfg), src, mesh)
        val = task.score(out, ok, src)
        per_fold[int(k)] = {"best_step": fold_run.step, "images": int(ok.sum()),
                            "val": {m: val[m] for m in task.history_metrics},
                            "test": {m: test[m] for m in task.history_metrics if m in test}}
        paths += [src.paths[i] for i in np.flatnonzero(ok)]
        outputs.append(out[ok])
        if cfg.cv.predict_split:
            target = task.source(cfg.cv.predict_split)
            ensemble.append(task.outputs(fold_run.model, inference.place(fold_run.variables, mesh, fold_run.cfg),
                                         target, mesh))
    names = list(task.history_metrics)
    values = {m: [f["val"][m] for f in per_fold.values()] for m in names}
    result = {"best_metric": task.best_metric, "folds": per_fold,
              "mean": {m: float(np.mean(v)) for m, v in values.items()},
              "std": {m: float(np.std(v)) for m, v in values.items()}}
    if jax.process_index() == 0:
        (workdir / "cv_results.json").write_text(json.dumps(result, indent=2) + "\n")
        task.write_predictions(workdir / "oof_predictions.csv", paths, np.concatenate(outputs))
        if ensemble:
            _write_ensemble(task, target, ensemble, workdir / "submission.csv")
    key = task.best_metric.split("/", 1)[1]
    log.info("cross-validation over folds %s: %s %.4f +- %.4f", tuple(per_fold), key, result["mean"][key],
             result["std"][key])
    return result


def _write_ensemble(task, src, per_fold: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """The folds' mean outputs on `src` -> the task's submission file; every example must have been read."""
    ok = np.logical_and.reduce([k for _, k in per_fold])
    if not ok.all():
        bad = [src.paths[i] for i in np.flatnonzero(~ok)[:3]]
        raise DataError(f"cv.predict_split={src.split!r}: {int((~ok).sum())} images could not be read (e.g. {bad});"
                        " a submission needs them all: fix or replace those files")
    task.write_submission(path, src, np.mean([out for out, _ in per_fold], axis=0))
    log.info("%s: the mean of %d folds' predictions of split %r", path, len(per_fold), src.split)

