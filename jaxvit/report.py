"""Evaluation artefacts: PNG plots, a predictions CSV and a results JSON.

Plots use matplotlib's object API (``Figure`` renders through Agg), so no
pyplot state or display is touched and the global backend is left alone.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxvit.files import atomic_write_text

PathLike = str | os.PathLike


def stem(split: str) -> str:
    """A split name made safe for file names ("test[5000:]" -> "test_5000")."""
    return re.sub(r"[^A-Za-z0-9_.%-]+", "_", split).strip("_") or "split"


def _save(fig: Figure, path: PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_confusion_matrix(
    cm: Any,
    class_names: Sequence[str],
    path: PathLike,
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> None:
    """Heat map of a (K, K) confusion matrix (rows = true, columns = predicted).

    With ``normalize`` each row is divided by its total (recall on the diagonal).
    """
    counts = np.asarray(cm, dtype=np.float64)
    k = counts.shape[0]
    if counts.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(class_names)} classes")
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows != 0)
        vmax, fmt = 1.0, "{:.2f}"
    else:
        values = counts
        vmax, fmt = max(float(counts.max()), 1.0), "{:.0f}"

    side = max(5.0, 1.0 + 0.9 * k)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ticks = np.arange(k)
    ax.set_xticks(ticks, labels=[str(c) for c in class_names], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=[str(c) for c in class_names])
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    fontsize = 10 if k <= 10 else 7
    for i in range(k):
        for j in range(k):
            # Dark text on light cells, white text on dark cells.
            colour = "white" if values[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", color=colour, fontsize=fontsize)
    fig.tight_layout()
    _save(fig, path)


def plot_per_class_metrics(
    per_class: Mapping[str, Mapping[str, float]],
    class_names: Sequence[str],
    path: PathLike,
    title: str = "Per-class metrics",
) -> None:
    """Grouped bars of precision, recall and F1 for each class."""
    keys = ("precision", "recall", "f1")
    x = np.arange(len(class_names))
    width = 0.8 / len(keys)
    fig = Figure(figsize=(max(6.0, 1.3 * len(class_names) + 2.0), 4.5))
    ax = fig.add_subplot()
    for i, key in enumerate(keys):
        vals = [float(per_class[str(c)][key]) for c in class_names]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, label=key if key != "f1" else "F1")
    # Show the support under each class name when it is known.
    labels = [
        f"{c}\n(n={per_class[str(c)]['support']})" if "support" in per_class[str(c)] else str(c)
        for c in class_names
    ]
    ax.set_xticks(x, labels=labels, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)


def _read_history(path: PathLike) -> dict[str, np.ndarray]:
    """CSV columns as float arrays; blank or unparsable cells become NaN."""

    def to_float(s: str | None) -> float:
        try:
            return float(s) if s not in (None, "") else math.nan
        except ValueError:
            return math.nan

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = rows[0].keys() if rows else []
    return {c.strip(): np.array([to_float(r.get(c)) for r in rows]) for c in cols if c}


def plot_training_curves(history_csv_path: PathLike, path: PathLike, aliases: Iterable[str] = ()) -> None:
    """Loss, the task's other metrics (every other train_* / val_* column), learning-rate and throughput panels
    against epoch. Columns absent from the CSV are skipped, as are panels with nothing to show, and columns
    train_<alias> / val_<alias> that repeat another (`aliases`: the task's `history_aliases` names).
    """
    hist = _read_history(history_csv_path)
    n = len(next(iter(hist.values()))) if hist else 0
    epoch = hist.get("epoch", np.arange(1, n + 1, dtype=np.float64))
    repeated = {f"{split}_{a}" for a in aliases for split in ("train", "val")}
    others = [c for c in hist if c.startswith(("train_", "val_")) and c not in ("train_loss", "val_loss", *repeated)]
    panels = [
        ("Loss", [("train_loss", "train"), ("val_loss", "val")]),
        ("Metrics", [(c, c.replace("_", " ", 1)) for c in others]),
        ("Learning rate", [("lr", "lr")]),
        ("Throughput (images/s)", [("images_per_s", "images/s")]),
    ]
    shown = [(t, [(c, lab) for c, lab in series if c in hist and np.isfinite(hist[c]).any()]) for t, series in panels]
    shown = [(t, series) for t, series in shown if series]

    ncols = len(shown) if len(shown) <= 3 else 2
    nrows = math.ceil(len(shown) / ncols) if shown else 1
    fig = Figure(figsize=(5.0 * max(ncols, 1), 4.0 * nrows))
    if not shown:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center")
        ax.set_axis_off()
    for i, (title, series) in enumerate(shown):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for col, label in series:
            ok = np.isfinite(hist[col]) & np.isfinite(epoch)
            ax.plot(epoch[ok], hist[col][ok], marker="o", markersize=3, label=label)
        if title == "Learning rate":
            lr = hist["lr"][np.isfinite(hist["lr"])]
            if lr.size and (lr > 0).all() and lr.max() / lr.min() > 20:
                ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_attention_maps(images: np.ndarray, maps: np.ndarray, mean: Sequence[float], std: Sequence[float],
                        path: PathLike, max_heads: int = 6) -> None:
    """One row per image: the (de-normalised) image, then one attention map [h, w] per head (up to max_heads)."""
    n, heads = maps.shape[0], min(maps.shape[1], max_heads)
    fig = Figure(figsize=(1.6 * (heads + 1), 1.6 * n))
    axes = fig.subplots(n, heads + 1, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(np.clip(images[i] * np.asarray(std) + np.asarray(mean), 0, 1))
        for j in range(heads):
            axes[i, j + 1].imshow(maps[i, j], cmap="inferno")
            if i == 0:
                axes[i, j + 1].set_title(f"head {j}", fontsize=8)
        for ax in axes[i]:
            ax.set_axis_off()
    _save(fig, path)

def write_predictions_csv(
    path: PathLike,
    paths: Sequence[str],
    labels: Any,
    probs: Any,
    class_names: Sequence[str],
) -> None:
    """One row per sample: path, true and predicted class names, confidence, probabilities.

    ``labels`` may be ``None`` or hold -1 for samples with unknown class; their
    ``true`` cell is left empty. Floats are written with full precision.
    """
    p = np.asarray(probs, dtype=np.float64)
    names = [str(c) for c in class_names]
    y = np.full(len(p), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    if p.ndim != 2 or p.shape[1] != len(names) or not len(paths) == len(y) == len(p):
        raise ValueError(
            f"inconsistent inputs: {len(paths)} paths, {len(y)} labels, probs {p.shape}, {len(names)} classes"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "confidence", *(f"prob_{c}" for c in names)])
        for src, t, row in zip(paths, y, p):
            best = int(row.argmax())
            true = names[t] if 0 <= t < len(names) else ""
            w.writerow([str(src), true, names[best], repr(float(row[best])), *(repr(float(v)) for v in row)])


def _json_default(obj: Any) -> Any:
    """Let numpy scalars and arrays through json.dump."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_results_json(path: PathLike, metrics: Mapping[str, Any]) -> None:
    """Write ``metrics`` as indented JSON atomically (`jaxvit.files.atomic_write`)."""
    atomic_write_text(path, json.dumps(metrics, indent=2, default=_json_default) + "\n")
