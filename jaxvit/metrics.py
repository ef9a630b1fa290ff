"""Classification metrics in plain numpy.

Definitions follow scikit-learn (``zero_division=0``, rows of the confusion
matrix are true classes, one-vs-rest macro ROC AUC with tie-aware ranks) so
that results can be checked against it, without depending on it at runtime.
Every value returned by :func:`classification_metrics` is a plain Python
object, so the dict can be dumped to JSON as-is.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ECE_BINS = 15


def _as_labels(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class ids")
    return arr.astype(np.int64)


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; entry [i, j] = samples of true class i predicted as j."""
    y, p = _as_labels(labels, "labels"), _as_labels(preds, "preds")
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and preds {p.shape} differ in length")
    for arr, name in ((y, "labels"), (p, "preds")):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    flat = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _prf_from_cm(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)  # tp + fp
    support = cm.sum(axis=1)  # tp + fn
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, predicted + support)  # == 2PR / (P + R)
    return precision, recall, f1, support


def accuracy(labels: Any, preds: Any) -> float:
    """Fraction of exact matches (0.0 for empty input)."""
    y, p = np.asarray(labels), np.asarray(preds)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and preds {p.shape} differ in shape")
    return float(np.mean(y == p)) if y.size else 0.0


def macro_f1(labels: Any, preds: Any, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over all ``num_classes`` classes."""
    _, _, f1, _ = _prf_from_cm(confusion_matrix(labels, preds, num_classes))
    return float(f1.mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def binary_roc_auc(is_pos: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic.

    Equals the trapezoidal area of the exact ROC curve, so tied scores count
    one half, as in ``sklearn.metrics.roc_auc_score``.
    """
    is_pos = np.asarray(is_pos, bool)
    n_pos = int(is_pos.sum())
    n_neg = is_pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative samples")
    ranks = _average_ranks(np.asarray(scores, np.float64))
    u = ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the top-1 prediction over ``n_bins`` equal-width bins.

    Bin b holds confidences in (b/n, (b+1)/n]; ECE = sum_b |B|/N * |acc(B) - conf(B)|.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(
        bins, weights=conf, minlength=n_bins
    )
    # sum_b |B|/N * |sum_B(correct - conf)| / |B|  ==  sum_b |sum_B(...)| / N
    return float(np.abs(gap).sum() / conf.size)


def error_analysis(probs: np.ndarray, labels: np.ndarray, cm: np.ndarray, names: Sequence[str],
                   most: int = 5) -> dict[str, Any]:
    """The DINOv2 CIFAR-10 project's error analysis: the `most` most confused (true, predicted) pairs with their
    counts, and the top-1 confidence of right and of wrong predictions (mean, median)."""
    off = cm.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(i), int(j)) for i, j in zip(*np.unravel_index(np.argsort(-off, axis=None, kind="stable"), off.shape))]
    confused = [{"true": names[i], "predicted": names[j], "count": int(off[i, j])} for i, j in pairs[:most]
                if off[i, j] > 0]
    confidence, right = probs.max(axis=1), probs.argmax(axis=1) == labels
    stats = lambda x: {"mean": float(x.mean()), "median": float(np.median(x)), "count": int(x.size)} if x.size \
        else {"mean": None, "median": None, "count": 0}  # noqa: E731
    return {"most_confused": confused, "confidence_correct": stats(confidence[right]),
            "confidence_wrong": stats(confidence[~right])}


def classification_metrics(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    loss: float | None = None,
    topk: Sequence[int] = (1, 2, 3, 5),
) -> dict[str, Any]:
    """All evaluation metrics for (N, K) class probabilities and (N,) labels.

    The prediction is the arg-max class (first index on ties). Macro averages
    run over all K classes. ``loss`` defaults to the mean cross-entropy of
    ``probs`` (clipped to [eps, 1 - eps] like sklearn's ``log_loss``).
    ROC AUC skips classes with no positive (or no negative) sample, lists them
    under ``roc_auc_skipped_classes``, and is ``None`` if every class is skipped.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = _as_labels(labels, "labels")
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, K), got shape {p.shape}")
    n, k = p.shape
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} probability columns")
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} rows of probs")
    if n == 0:
        raise ValueError("no samples")

    preds = p.argmax(axis=1)
    cm = confusion_matrix(y, preds, k)  # also checks labels are in [0, K)
    precision, recall, f1, support = _prf_from_cm(cm)
    weights = support / n

    out: dict[str, Any] = {"num_samples": int(n), "accuracy": accuracy(y, preds)}
    # Top-k: the true class is among the k best (stable order, so top-1 == accuracy).
    order = np.argsort(-p, axis=1, kind="stable")
    for kk in sorted(set(int(t) for t in topk)):
        if 1 <= kk < k:
            out[f"top{kk}_accuracy"] = float(np.mean(np.any(order[:, :kk] == y[:, None], axis=1)))

    out.update(
        precision_macro=float(precision.mean()),
        recall_macro=float(recall.mean()),
        f1_macro=float(f1.mean()),
        precision_weighted=float(weights @ precision),
        recall_weighted=float(weights @ recall),
        f1_weighted=float(weights @ f1),
    )

    auc: dict[str, float] = {}
    skipped: list[str] = []
    for c, name in enumerate(names):
        is_pos = y == c
        if is_pos.all() or not is_pos.any():
            skipped.append(name)
        else:
            auc[name] = binary_roc_auc(is_pos, p[:, c])
    out["roc_auc_ovr_macro"] = float(np.mean(list(auc.values()))) if auc else None
    out["roc_auc_per_class"] = auc
    out["roc_auc_skipped_classes"] = skipped

    out["ece"] = expected_calibration_error(p, y)
    if loss is None:
        eps = np.finfo(np.float64).eps
        loss = -np.mean(np.log(np.clip(p[np.arange(n), y], eps, 1.0 - eps)))
    out["loss"] = float(loss)

    out["error_analysis"] = error_analysis(p, y, cm, names)
    out["confusion_matrix"] = cm.tolist()
    out["per_class"] = {
        name: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c, name in enumerate(names)
    }
    return out


def regression_metrics(pred: Any, true: Any, names: Sequence[str]) -> dict[str, Any]:
    """R^2 (1 - SS_res / SS_tot, as sklearn's r2_score), RMSE and MAE per target and averaged over targets
    (`r2` is the unweighted mean of the per-target R^2). pred, true: [N, T]."""
    p, y = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if p.shape != y.shape or p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"pred {p.shape} and true {y.shape} must both be [N, {len(names)}]")
    ss_res = ((y - p) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 0.0)
    rmse, mae = np.sqrt(((y - p) ** 2).mean(0)), np.abs(y - p).mean(0)
    return {"r2": float(r2.mean()), "rmse": float(rmse.mean()), "mae": float(mae.mean()),
            "per_target": {n: {"r2": float(a), "rmse": float(b), "mae": float(c)}
                           for n, a, b, c in zip(names, r2, rmse, mae)}}
