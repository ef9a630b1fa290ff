"""Evaluation of a classifier on an image folder split: metrics JSON, confusion matrices, predictions CSV."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxvit import metrics, report
from jaxvit.data import pipeline
from jaxvit.data.sources import ImageFolder


def predict_probs(model, variables: dict, src: ImageFolder, cfg, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, K], readable mask [N]) for every image of `src`, in dataset order, on every process."""
    batch_sharding = NamedSharding(mesh, P("data"))
    apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x).astype(jnp.float32), -1),
                    in_shardings=(NamedSharding(mesh, P()), batch_sharding), out_shardings=batch_sharding)
    n = len(src)
    probs = np.zeros((n, model.num_outputs), np.float32)
    ok = np.zeros(n, bool)
    it = pipeline.eval_iterator(src, cfg.data, global_batch=cfg.eval.batch_size)
    for batch in it:
        images = jax.make_array_from_process_local_data(batch_sharding, batch["image"])
        p = multihost_utils.process_allgather(apply(variables, images), tiled=True)
        index = multihost_utils.process_allgather(batch["index"], tiled=True)
        mask = multihost_utils.process_allgather(batch["mask"], tiled=True)
        probs[index[mask]] = p[mask]
        ok[index[mask]] = True
    return probs, ok


def evaluate_source(model, variables: dict, src: ImageFolder, cfg, mesh, out_dir: Path | None = None) -> dict:
    """Metrics over the readable images of `src`; with `out_dir`, also the report files named
    `<split>_results.json`, `<split>_confusion_matrix{,_raw}.png`, `<split>_per_class_metrics.png`,
    `<split>_predictions.csv`."""
    probs, ok = predict_probs(model, variables, src, cfg, mesh)
    classes = list(src.classes)
    result = metrics.classification_metrics(probs[ok], src.labels[ok], classes)
    result["unreadable"] = [src.paths[i] for i in np.flatnonzero(~ok)]
    if out_dir is not None:
        write_report(out_dir, src.split, result, classes, [src.paths[i] for i in np.flatnonzero(ok)],
                     src.labels[ok], probs[ok])
    return result


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
