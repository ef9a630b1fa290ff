"""Evaluation of classifiers on an image-folder split: metrics JSON, confusion matrices, per-class metrics plot,
predictions CSV; ensembles of runs; the training-curve plot.

    python -m jaxvit.evaluate --workdir=W --split=test [--checkpoint=best_acc|best_f1|final|periodic|STEP]
        [--output_dir=D] [--batch_size=N] [--data_dir=DIR]
    python -m jaxvit.evaluate --workdir=W1 --workdir=W2 ...      # ensemble: the runs' probabilities averaged

Writes `<split>_results.json`, `<split>_confusion_matrix.png` (row-normalised), `<split>_confusion_matrix_raw.png`,
`<split>_per_class_metrics.png` and `<split>_predictions.csv` to `W/eval_<split>/` (ensembles:
`W1/eval_<split>_ensemble/`), and `W/training_curves.png` from `W/training_history.csv`.
"""
from __future__ import annotations

import functools

import argparse
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxvit import metrics, report, run_io, sharding, xla_options
from jaxvit.config import base_config
from jaxvit.data import pipeline
from jaxvit.data.sources import ImageFolder


def _mesh_config(cfg=None):
    return (cfg if cfg is not None and "mesh" in cfg else base_config()).mesh


def run_mesh(cfg=None) -> Mesh:
    """The device mesh of a config's `mesh` section (the train loop's layout); default: data parallel over all."""
    return sharding.make_mesh(_mesh_config(cfg))


def place(variables: dict, mesh: Mesh, cfg=None) -> dict:
    """Variables laid out on `mesh` as the train loop lays them out (FSDP / tensor parallel from `cfg.mesh`)."""
    return jax.device_put(variables, sharding.state_shardings(variables, mesh, _mesh_config(cfg).fsdp_min_size))


def map_source(fn: Callable, variables, src: ImageFolder, cfg, mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """(outputs [N, ...], readable mask [N]) of `fn(variables, images, index)` over every image of `src` (eval
    transform of `cfg.data`, `cfg.eval.batch_size` images per step), in dataset order, on every process.
    `index` holds each row's dataset index (-1 for padding), e.g. to seed per-image randomness. Batches are
    split over the mesh's batch axes; `variables` keep the placement they have (see `place`)."""
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
    apply = _jit(fn)
    out, ok = None, np.zeros(len(src), bool)
    for batch in pipeline.eval_iterator(src, cfg.data, global_batch=cfg.eval.batch_size):
        images, index = (jax.make_array_from_process_local_data(batch_sharding, batch[k]) for k in ("image", "index"))
        y = multihost_utils.process_allgather(apply(variables, images, index), tiled=True)
        index, mask = (multihost_utils.process_allgather(batch[k], tiled=True) for k in ("index", "mask"))
        if out is None:
            out = np.zeros((len(src), *y.shape[1:]), y.dtype)
        out[index[mask]] = y[mask]
        ok[index[mask]] = True
    return out, ok


_jit = functools.lru_cache(maxsize=16)(xla_options.jit)  # the same fn object reuses its compiled program


@functools.lru_cache(maxsize=16)
def _softmax_fn(model) -> Callable:
    return lambda v, x, _: jax.nn.softmax(model.apply(v, x).astype(jnp.float32), -1)


def predict_probs(model, variables: dict, src: ImageFolder, cfg, mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, K], readable mask [N]) for every image of `src`, in dataset order, on every process.
    Per-epoch validation reuses one compiled program per model."""
    return map_source(_softmax_fn(model), variables, src, cfg, mesh)


def score(probs: np.ndarray, ok: np.ndarray, src: ImageFolder, out_dir: Path | None = None,
          extra: dict | None = None) -> dict:
    """Metrics over the readable images (plus `extra` entries); with `out_dir`, also the report files."""
    classes = list(src.classes)
    result = metrics.classification_metrics(probs[ok], src.labels[ok], classes)
    result["unreadable"] = [src.paths[i] for i in np.flatnonzero(~ok)]
    result.update(extra or {})
    if out_dir is not None:
        write_report(out_dir, src.split, result, classes, [src.paths[i] for i in np.flatnonzero(ok)],
                     src.labels[ok], probs[ok])
    return result


def evaluate_source(model, variables: dict, src: ImageFolder, cfg, mesh, out_dir: Path | None = None) -> dict:
    """Metrics over the readable images of `src`; with `out_dir`, also the report files named
    `<split>_results.json`, `<split>_confusion_matrix{,_raw}.png`, `<split>_per_class_metrics.png`,
    `<split>_predictions.csv`."""
    return score(*predict_probs(model, variables, src, cfg, mesh), src, out_dir)


def write_report(out_dir: Path, split: str, result: dict, classes: list[str], paths, labels, probs) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_results_json(out_dir / f"{split}_results.json", result)
    cm = np.asarray(result["confusion_matrix"])
    report.plot_confusion_matrix(cm, classes, out_dir / f"{split}_confusion_matrix.png", normalize=True,
                                 title=f"{split}: normalised confusion matrix")
    report.plot_confusion_matrix(cm, classes, out_dir / f"{split}_confusion_matrix_raw.png", normalize=False,
                                 title=f"{split}: confusion matrix (counts)")
    report.plot_per_class_metrics(result["per_class"], classes, out_dir / f"{split}_per_class_metrics.png",
                                  title=f"{split}: per-class precision / recall / F1")
    report.write_predictions_csv(out_dir / f"{split}_predictions.csv", paths, labels, probs, classes)


def write_training_curves(workdir: str | Path) -> Path | None:
    """`<workdir>/training_curves.png` from `<workdir>/training_history.csv` (None when there is no history)."""
    history = Path(workdir) / "training_history.csv"
    if not history.exists():
        return None
    out = Path(workdir) / "training_curves.png"
    report.plot_training_curves(history, out)
    return out


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count >= batch_size (so the batch splits evenly)."""
    return -(-batch_size // mesh.size) * mesh.size


def evaluate_runs(workdirs: Sequence[str | Path], split: str = "test", checkpoint: str | int = "best_acc",
                  output_dir: str | Path | None = None, batch_size: int | None = None,
                  data_dir: str | None = None) -> dict:
    """Evaluate one run, or an ensemble of runs (mean of their probabilities), on `split`; writes the report
    files on process 0 and returns the metrics. Each run preprocesses with its own data config."""
    total, ok, models, src = None, None, [], None
    for workdir in workdirs:
        run = run_io.load_run(workdir, checkpoint, data_dir)
        mesh = run_mesh(run.cfg)
        run.cfg.eval.batch_size = round_batch(batch_size or run.cfg.eval.batch_size, mesh)
        run_src = ImageFolder(run.cfg.data.data_dir, split, run.classes)
        if src is not None and (run_src.classes != src.classes or run_src.paths != src.paths):
            raise ValueError(f"{workdir}: classes or images of split {split!r} differ from {workdirs[0]}'s; "
                             "an ensemble needs runs over the same classes (pass --data_dir)")
        src = run_src
        probs, run_ok = predict_probs(run.model, place(run.variables, mesh, run.cfg), src, run.cfg, mesh)
        total = probs if total is None else total + probs
        ok = run_ok if ok is None else ok & run_ok
        models.append(run_io.describe(run))
    ensemble = len(models) > 1
    if output_dir is None:
        output_dir = Path(workdirs[0]) / (f"eval_{split}_ensemble" if ensemble else f"eval_{split}")
    is_main = jax.process_index() == 0
    result = score(total / len(models), ok, src, output_dir if is_main else None, dict(split=split, models=models))
    if is_main:
        for workdir in workdirs:
            write_training_curves(workdir)
    return result


def summary(result: dict) -> str:
    keys = ["accuracy", "top2_accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
            "roc_auc_ovr_macro", "ece", "loss"]
    lines = [f"{k:<18} {result[k]:.4f}" for k in keys if result.get(k) is not None]
    lines += ["", f"{'class':<28} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    lines += [f"{c:<28} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8d}"
              for c, m in result["per_class"].items()]
    if result["unreadable"]:
        lines += ["", f"{len(result['unreadable'])} unreadable images skipped:"] + result["unreadable"][:20]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jaxvit.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", action="append", required=True, help="run directory; repeat for an ensemble")
    ap.add_argument("--split", default="test")
    ap.add_argument("--checkpoint", default="best_acc", help="best_acc | best_f1 | final | periodic | a step")
    ap.add_argument("--output_dir", default=None, help="default: <workdir>/eval_<split>")
    ap.add_argument("--batch_size", type=int, default=None, help="default: the run's eval.batch_size")
    ap.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
    args = ap.parse_args(argv)
    run_io.setup_logging()
    result = evaluate_runs(args.workdir, args.split, args.checkpoint, args.output_dir, args.batch_size,
                           args.data_dir)
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
