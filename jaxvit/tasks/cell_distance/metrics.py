"""Instance-segmentation metrics (as StarDist / Cellpose count them): true and predicted cells are matched one
to one, maximising the number of pairs with IoU >= 0.5; at each IoU threshold t a matched pair with IoU >= t is a
true positive, the other predicted cells false positives, the other true cells false negatives.

  AP(t) = TP / (TP + FP + FN)     (the DSB 2018 "average precision" of cell segmentation)
  F1    = 2 TP / (2 TP + FP + FN)  at t = 0.5
  mean matched IoU: the mean IoU of the pairs matched at 0.5

Per image, `image_counts` gives a row of counts; the dataset metrics (`summarise`) are computed from the counts
summed over images, so batches and processes reduce by addition.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2).tolist())  # 0.5, 0.55, ..., 0.95
# One row of counts per image: TP, FP, FN at each threshold, then these.
EXTRA = ("n_true", "n_pred", "iou_sum", "sq_error", "pixels")
WIDTH = 3 * len(THRESHOLDS) + len(EXTRA)


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0 (background), 1..n; and n."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:  # no background pixel
        inverse = inverse + 1
        ids = np.concatenate([[0], ids])
    return inverse.reshape(labels.shape), len(ids) - 1


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU [n_true, n_pred] of every true and predicted cell (label images of one shape; cells in increasing id
    order, background 0 excluded)."""
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    t, nt = _consecutive(true)
    p, n_pred = _consecutive(pred)
    overlap = np.bincount((t * (n_pred + 1) + p).ravel(), minlength=(nt + 1) * (n_pred + 1))
    overlap = overlap.reshape(nt + 1, n_pred + 1).astype(np.float64)
    union = overlap.sum(1, keepdims=True) + overlap.sum(0, keepdims=True) - overlap
    return (overlap / np.maximum(union, 1))[1:, 1:]


def matched_ious(iou: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """IoUs of a one-to-one matching with the most pairs of IoU >= threshold (ties: the higher IoUs)."""
    rows, cols = np.nonzero(iou >= threshold)
    if rows.size == 0:
        return np.zeros(0)
    sub = iou[np.ix_(np.unique(rows), np.unique(cols))]  # only cells with a candidate partner
    cost = -(sub >= threshold).astype(np.float64) - sub / (2 * min(sub.shape))
    i, j = linear_sum_assignment(cost)
    found = sub[i, j]
    return found[found >= threshold]


def image_counts(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """float64 [WIDTH]: TP, FP, FN per threshold, n_true, n_pred, the sum of matched IoUs at 0.5, and zeros
    for the map error (filled by the caller)."""
    iou = iou_matrix(true, pred)
    n_true, n_pred = iou.shape
    matched = matched_ious(iou, THRESHOLDS[0])  # pairs above 0.5 are unique, so this matching serves every t
    tp = np.array([(matched >= t).sum() for t in THRESHOLDS], np.float64)
    return np.concatenate([tp, n_pred - tp, n_true - tp, [n_true, n_pred, matched.sum(), 0.0, 0.0]])


def _ratio(num: float, den: float, empty: float = 1.0) -> float:
    """num / den; `empty` when den is 0 (AP, F1: nothing to find and nothing found is perfect)."""
    return float(num / den) if den else empty


def summarise(counts: np.ndarray) -> dict:
    """Dataset metrics from per-image count rows [N, WIDTH] (or their sum [WIDTH])."""
    c = np.asarray(counts, np.float64)
    c = c.sum(0) if c.ndim == 2 else c
    k = len(THRESHOLDS)
    tp, fp, fn = c[:k], c[k:2 * k], c[2 * k:3 * k]
    extra = dict(zip(EXTRA, c[3 * k:]))
    ap = [_ratio(a, a + b + d) for a, b, d in zip(tp, fp, fn)]
    return {
        "ap50": ap[0], "ap75": ap[THRESHOLDS.index(0.75)], "ap": float(np.mean(ap)),
        "f1": _ratio(2 * tp[0], 2 * tp[0] + fp[0] + fn[0]),
        "precision": _ratio(tp[0], tp[0] + fp[0], 0.0), "recall": _ratio(tp[0], tp[0] + fn[0], 0.0),
        "mean_iou": float(extra["iou_sum"] / tp[0]) if tp[0] else 0.0,
        "mse": float(extra["sq_error"] / extra["pixels"]) if extra["pixels"] else 0.0,
        "n_true": int(extra["n_true"]), "n_pred": int(extra["n_pred"]),
        "ap_per_threshold": {f"{t:.2f}": a for t, a in zip(THRESHOLDS, ap)},
    }
