"""Maths of the CSIRO Image2Biomass pasture workload: the long-CSV pivot, the official metric and the losses.

Five dry-mass targets in grams, always in the order of `TARGETS`, with the identities
GDM = Green + Clover and Total = GDM + Dead = Green + Dead + Clover.

Metrics are numpy and return plain floats. Losses are jax.numpy on batches [B, 5] (computed in float32) and
return one value per example [B], for the training loop to average. A NaN target (an image where that mass is
missing, see `pivot_long(allow_missing=True)`) adds nothing to any loss, and its gradient is zero, not NaN.
"""
from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvit.errors import DataError

TARGETS = ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g", "GDM_g", "Dry_Total_g")
SHORT = ("green", "dead", "clover", "gdm", "total")
WEIGHTS = (0.1, 0.1, 0.1, 0.2, 0.5)
GREEN, DEAD, CLOVER, GDM, TOTAL = range(5)
METADATA = ("Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm")
NUMERIC_METADATA = ("Pre_GSHH_NDVI", "Height_Ave_cm")


# ---------------------------------------------------------------------------------------------------- metrics


def _pairs(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    if t.shape != p.shape or t.ndim != 2 or t.shape[1] != len(TARGETS):
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must both be [N, {len(TARGETS)}]")
    return t, p


def _r2(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    """1 - sum w (t - p)^2 / sum w (t - mean_w t)^2; a constant t gives 1.0 if p == t, else 0.0 (as sklearn)."""
    num = np.sum(w * (t - p) ** 2)
    den = np.sum(w * (t - np.sum(w * t) / np.sum(w)) ** 2)
    if den == 0:
        return 1.0 if num == 0 else 0.0
    return float(1.0 - num / den)


def weighted_r2(y_true: Any, y_pred: Any) -> float:
    """Official metric: R2 = 1 - sum_i w_i (y_i - p_i)^2 / sum_i w_i (y_i - ybar_w)^2 over all (image, target) rows.

    Raw grams; w_i = WEIGHTS[target of row i]; ybar_w = sum w y / sum w. Rows whose y_true is NaN are dropped."""
    t, p = _pairs(y_true, y_pred)
    w = np.broadcast_to(np.asarray(WEIGHTS), t.shape)
    keep = np.isfinite(t)
    return _r2(t[keep], p[keep], w[keep])


def target_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """{'weighted_r2', and per target r2_<short> = 1 - SSE/SST, rmse_<short> = sqrt(mean e^2), mae_<short> = mean |e|}.

    Short names are green, dead, clover, gdm, total; each target's NaN rows are dropped (NaN if none is left)."""
    t, p = _pairs(y_true, y_pred)
    out = {"weighted_r2": weighted_r2(t, p)}
    for j, short in enumerate(SHORT):
        keep = np.isfinite(t[:, j])
        tj, pj = t[keep, j], p[keep, j]
        if tj.size == 0:
            out.update({f"r2_{short}": math.nan, f"rmse_{short}": math.nan, f"mae_{short}": math.nan})
            continue
        out[f"r2_{short}"] = _r2(tj, pj, np.ones_like(tj))
        out[f"rmse_{short}"] = float(np.sqrt(np.mean((tj - pj) ** 2)))
        out[f"mae_{short}"] = float(np.mean(np.abs(tj - pj)))
    return out


# ------------------------------------------------------------------------------------- completing the outputs


def complete(raw: Any, train_dead: bool = False, train_clover: bool = True) -> jax.Array:
    """[B, 5] from raw [B, 5] heads: Dead := Total - GDM unless train_dead; Clover := GDM - Green unless train_clover.

    The model always has five heads in TARGETS order; a derived column's head is ignored (overwritten), so its
    output is consistent with the identities by construction. Green, GDM and Total are always trained directly."""
    raw = jnp.asarray(raw)
    cols = [raw[:, j] for j in range(len(TARGETS))]
    if not train_dead:
        cols[DEAD] = cols[TOTAL] - cols[GDM]
    if not train_clover:
        cols[CLOVER] = cols[GDM] - cols[GREEN]
    return jnp.stack(cols, axis=1)


def loss_weights(train_dead: bool = False, train_clover: bool = True) -> np.ndarray:
    """WEIGHTS with 0 for the derived targets (seed: Green 0.1, Dead 0, Clover 0.1, GDM 0.2, Total 0.5)."""
    w = np.asarray(WEIGHTS, np.float32).copy()
    if not train_dead:
        w[DEAD] = 0.0
    if not train_clover:
        w[CLOVER] = 0.0
    return w


# ----------------------------------------------------------------------------------------------------- losses


def _masked(pred: Any, true: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pred, true, mask) in float32, mask = isfinite(true) and true's NaN entries set to 0 (callers apply mask)."""
    pred, true = jnp.asarray(pred, jnp.float32), jnp.asarray(true, jnp.float32)
    mask = jnp.isfinite(true)
    return pred, jnp.where(mask, true, 0.0), mask


def _smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    """Elementwise 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta (beta = 0: |x|)."""
    a = jnp.abs(x)
    if beta == 0:
        return a
    return jnp.where(a < beta, 0.5 * x * x / beta, a - 0.5 * beta)


def smooth_l1(pred: Any, true: Any, weights: Any, beta: float = 1.0) -> jax.Array:
    """[B]: sum_j weights_j * SmoothL1_beta(pred_j - true_j), PyTorch's SmoothL1; derived targets take weight 0."""
    pred, true, mask = _masked(pred, true)
    loss = jnp.where(mask, _smooth_l1(pred - true, beta), 0.0)
    return jnp.sum(jnp.asarray(weights, jnp.float32) * loss, axis=-1)


def mse(pred: Any, true: Any, weights: Any) -> jax.Array:
    """[B]: sum_j weights_j * (pred_j - true_j)^2 (the original's loss with --no-smoothl1)."""
    pred, true, mask = _masked(pred, true)
    return jnp.sum(jnp.where(mask, (pred - true) ** 2, 0.0) * jnp.asarray(weights), -1)


def presence_bce(logits: Any, true: Any) -> jax.Array:
    """[B]: mean over the known targets of the binary cross-entropy of `logits` against mass > 0 (presence heads)."""
    logits, true, mask = _masked(logits, true)
    bce = optax.sigmoid_binary_cross_entropy(logits, (true > 0).astype(jnp.float32))
    return jnp.sum(jnp.where(mask, bce, 0.0), -1) / jnp.maximum(mask.sum(-1), 1)


def huber(pred: Any, true: Any, delta: float = 5.0) -> jax.Array:
    """Elementwise 0.5 x^2 if |x| < delta else delta (|x| - 0.5 delta), x = pred - true (PyTorch's HuberLoss).

    Meant for one column ([B] -> [B]), e.g. Dead with the seed's --use-huber --huber-delta 5.0."""
    pred, true, mask = _masked(pred, true)
    return jnp.where(mask, delta * _smooth_l1(pred - true, delta), 0.0)


def _relative(residual: jax.Array, *terms: jax.Array) -> jax.Array:
    """residual / (1 + sg(sum |terms|)), sg = stop_gradient: in (-1, 1) for a residual of those terms."""
    return residual / (1.0 + jax.lax.stop_gradient(sum(jnp.abs(t) for t in terms)))


def compositional(pred: Any) -> jax.Array:
    """[B]: r1^2 + r2^2 with r1 = GDM - (Green + Clover), r2 = Total - (GDM + Dead), each relative (see `_relative`).

    Each residual is divided by 1 + the (constant) sum of the magnitudes of its own terms, so a 10 % imbalance
    costs about the same on a 5 g and a 500 g image and the model cannot shrink the penalty by inflating its
    outputs. Exactly 0 when both identities hold."""
    p = jnp.asarray(pred, jnp.float32)
    g, d, c, gdm, tot = (p[..., j] for j in range(5))
    r1 = _relative(gdm - (g + c), gdm, g, c)
    r2 = _relative(tot - (gdm + d), tot, gdm, d)
    return r1 ** 2 + r2 ** 2


def cosine_distance(pred: Any, true: Any, eps: float = 1e-8) -> jax.Array:
    """[B]: 1 - <p, t> / (max(|p|, eps) max(|t|, eps)) over the 5 targets in grams (missing targets left out)."""
    pred, true, mask = _masked(pred, true)
    p, t = jnp.where(mask, pred, 0.0), jnp.where(mask, true, 0.0)
    norm = lambda v: jnp.maximum(jnp.linalg.norm(v, axis=-1), eps)  # noqa: E731
    return 1.0 - jnp.sum(p * t, axis=-1) / (norm(p) * norm(t))


def planthydra(pred: Any, true: Any, weights: Any, cosine_weight: float = 0.4,
               compositional_weight: float = 0.1, beta: float = 1.0) -> jax.Array:
    """[B]: smooth_l1(log1p(relu(pred)), log1p(true), weights) + cw * cosine_distance + kw * compositional(pred).

    cw = cosine_weight, kw = compositional_weight; the seed's --use-planthydra-loss. The regression term is
    SmoothL1 (as the seed's main loss) in log1p space, where a unit error is a factor e, so small and large images
    count alike. The cosine term compares the raw
    (unclipped) 5-vectors in grams, so it is 0 for any prediction proportional to the truth and still gives a
    gradient to negative outputs; the compositional term is `compositional(pred)`."""
    pred = jnp.asarray(pred, jnp.float32)
    log_term = smooth_l1(jnp.log1p(jnp.maximum(pred, 0.0)), jnp.log1p(jnp.asarray(true, jnp.float32)), weights, beta)
    return (log_term + cosine_weight * cosine_distance(pred, true)
            + compositional_weight * compositional(pred))


def mass_balance(pred: Any) -> jax.Array:
    """[B]: ((Green + Dead + Clover - Total) / (1 + |Green| + |Dead| + |Clover| + |Total|))^2, the scale held constant.

    Relative, hence in [0, 1) and comparable across image sizes; 0 when the balance holds."""
    p = jnp.asarray(pred, jnp.float32)
    g, d, c, tot = p[..., GREEN], p[..., DEAD], p[..., CLOVER], p[..., TOTAL]
    return _relative((g + c) + d - tot, g, d, c, tot) ** 2  # as GDM + Dead


def gaussian_nll(mean: Any, log_var: Any, true: Any) -> jax.Array:
    """[B]: sum_j 0.5 (log_var + (true - mean)^2 / exp(log_var) + log 2pi), i.e. -sum_j log N(true_j; mean_j, var_j)."""
    mean, true, mask = _masked(mean, true)
    log_var = jnp.asarray(log_var, jnp.float32)
    nll = 0.5 * (log_var + (true - mean) ** 2 * jnp.exp(-log_var) + math.log(2 * math.pi))
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=-1)


def plausible_max(train_targets: Any, factor: float = 1.5) -> np.ndarray:
    """[5]: factor * the train split's per-target max (NaN ignored), the upper bound for `qc_plausibility`."""
    return factor * np.nanmax(np.asarray(train_targets, np.float64), axis=0).astype(np.float32)


def qc_plausibility(pred: Any, max_mass: Any = None) -> jax.Array:
    """[B]: sum_j relu(-pred_j)^2 + relu(pred_j - max_mass_j)^2, in grams^2: zero inside [0, max_mass_j].

    max_mass: [5] (or a scalar), usually `plausible_max(train targets)`; None checks only non-negativity.
    Grams squared are large: weight this term accordingly (e.g. 1e-3)."""
    p = jnp.asarray(pred, jnp.float32)
    out = jax.nn.relu(-p) ** 2
    if max_mass is not None:
        out = out + jax.nn.relu(p - jnp.asarray(max_mass, jnp.float32)) ** 2
    return jnp.sum(out, axis=-1)


# ------------------------------------------------------------------------------------------------ long -> wide


def _number(value: Any, what: str, at: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{at}: {what} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{at}: {what} {value!r} is not a finite number")
    return x


def pivot_long(rows: Iterable[Mapping[str, Any]], where: str, allow_missing: bool = False) -> dict[str, dict]:
    """Long rows (one per image and target) -> {image_path: {'targets', 'sample_ids', 'metadata'}} in first-seen order.

    rows: dicts with sample_id, image_path, target_name and (labelled splits) target, as csv.DictReader gives
    them from the competition's train.csv / test.csv; the first row decides whether the split is labelled.
    'targets': float32 [5] in TARGETS order (NaN where absent, only with allow_missing), or None for a split
    without a target column. 'sample_ids': {target_name: sample_id} for the rows present (the submission keys).
    'metadata': the optional METADATA columns present (NDVI and height as floats), which must agree across an
    image's rows. where: the CSV's path, for messages; line numbers count the header as line 1.
    Raises DataError for a missing column, an unknown target_name, a duplicate (image, target), an image lacking
    a target (unless allow_missing), a negative or non-numeric mass, or no rows at all."""
    images: dict[str, dict] = {}
    labelled = None
    for line, row in enumerate(rows, start=2):
        at = f"{where} line {line}"
        if labelled is None:
            labelled = "target" in row
        required = ("sample_id", "image_path", "target_name") + (("target",) if labelled else ())
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{at}: missing column(s) {', '.join(missing)} (need {', '.join(required)})")
        path, name = row["image_path"], row["target_name"]
        if not path:
            raise DataError(f"{at}: empty image_path")
        if name not in TARGETS:
            raise DataError(f"{at}: unknown target_name {name!r} (expected one of {', '.join(TARGETS)})")
        meta = {k: row[k] for k in METADATA if k in row}
        for k in NUMERIC_METADATA:
            if k in meta and meta[k] not in ("", None):
                meta[k] = _number(meta[k], k, at)
        rec = images.setdefault(path, {"targets": np.full(len(TARGETS), np.nan, np.float32) if labelled else None,
                                       "sample_ids": {}, "metadata": meta, "_line": line})
        if name in rec["sample_ids"]:
            raise DataError(f"{at}: duplicate row for image {path!r} and target {name} (first at line "
                            f"{rec['sample_ids'][name][1]})")
        if meta != rec["metadata"]:
            raise DataError(f"{at}: metadata of image {path!r} differ from its line {rec['_line']}: "
                            f"{meta} vs {rec['metadata']}")
        rec["sample_ids"][name] = (row["sample_id"], line)
        if labelled:
            mass = _number(row["target"], f"target ({name})", at)
            if mass < 0:
                raise DataError(f"{at}: negative mass {mass} for {name} of image {path!r}")
            rec["targets"][TARGETS.index(name)] = mass
    if not images:
        raise DataError(f"{where}: no rows")
    for path, rec in images.items():
        lacking = [t for t in TARGETS if t not in rec["sample_ids"]]
        if lacking and not allow_missing:
            raise DataError(f"{where}: image {path!r} (line {rec['_line']}) has no row for {', '.join(lacking)}")
        rec["sample_ids"] = {t: sid for t, (sid, _) in rec["sample_ids"].items()}
        del rec["_line"]
    return images


def read_long_csv(path: str | Path, allow_missing: bool = False) -> dict[str, dict]:
    """`pivot_long` of a long CSV file (train.csv or test.csv of the competition)."""
    with open(path, newline="") as f:
        return pivot_long(csv.DictReader(f), str(path), allow_missing)


def score_submission(submission: str | Path, solution: str | Path) -> dict[str, float]:
    """`target_metrics` of a submission CSV (sample_id, target) against a solution CSV of the same columns (the
    competition's hidden labels); every solution sample_id must be in the submission."""
    def read(path):
        with open(path, newline="") as f:
            return {r["sample_id"]: _number(r["target"], "target", str(path)) for r in csv.DictReader(f)}
    pred, true = read(submission), read(solution)
    missing = sorted(set(true) - set(pred))
    if missing:
        raise DataError(f"{submission}: {len(missing)} sample_ids of {solution} are missing, e.g. {missing[:3]}")
    images = sorted({sid.split("__")[0] for sid in true})
    grid = lambda d: np.asarray([[d.get(f"{i}__{t}", np.nan) for t in TARGETS] for i in images], np.float32)  # noqa: E731
    return target_metrics(grid(true), grid(pred))


# ---------------------------------------------------------------------------------------------------- folds

_SEASONS = {12: "summer", 1: "summer", 2: "summer", 3: "autumn", 4: "autumn", 5: "autumn",
            6: "winter", 7: "winter", 8: "winter", 9: "spring", 10: "spring", 11: "spring"}  # southern hemisphere


def season(date: str) -> str:
    """Austral season of a Sampling_Date such as '2015/9/4' ('' when the date is missing or unreadable)."""
    parts = str(date or "").replace("-", "/").split("/")
    try:
        return _SEASONS[int(parts[1])]
    except (IndexError, KeyError, ValueError):
        return ""


def group_folds(metadata: list[Mapping[str, Any]], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold per image [N]: whole State x Season x Species groups go to one fold (the seed's `group_location`
    strategy), largest groups first, each to the fold with the fewest images so far (ties: a seeded order)."""
    keys = [(str(m.get("State", "")), season(m.get("Sampling_Date", "")), str(m.get("Species", ""))) for m in metadata]
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    if len(groups) < n_folds:
        raise DataError(f"only {len(groups)} State x Season x Species groups for {n_folds} folds: use fewer folds "
                        "(cv.n_folds) or a fold CSV (cv.fold_csv)")
    tie = lambda k: np.random.default_rng([seed, zlib.crc32("|".join(k).encode())]).random()  # stable across hosts
    order = sorted(groups, key=lambda k: (-len(groups[k]), tie(k)))
    folds, sizes = np.zeros(len(keys), np.int32), np.zeros(n_folds, np.int64)
    for k in order:
        f = int(np.argmin(sizes))
        folds[groups[k]] = f
        sizes[f] += len(groups[k])
    return folds


def stratified_folds(metadata: list[Mapping[str, Any]], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold per image [N]: each State x Season x Species stratum spread over the folds (the original's
    `trainfold_group_location.csv` is stratified on these), its images in a seeded order dealt out one per fold,
    starting at the fold with the fewest images so far; strata in a seeded order."""
    keys = [(str(m.get("State", "")), season(m.get("Sampling_Date", "")), str(m.get("Species", ""))) for m in metadata]
    strata: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    folds, sizes = np.zeros(len(keys), np.int32), np.zeros(n_folds, np.int64)
    for k in sorted(strata, key=lambda k: zlib.crc32(f"{seed}|{'|'.join(k)}".encode())):
        members = strata[k]
        order = np.random.default_rng([seed, zlib.crc32("|".join(k).encode())]).permutation(len(members))
        start = int(np.argmin(sizes))
        for j, m in enumerate(order):
            f = (start + j) % n_folds
            folds[members[m]] = f
            sizes[f] += 1
    return folds


def read_fold_csv(path: str | Path, image_paths: list[str]) -> np.ndarray:
    """Fold per image from a CSV with a `fold` column and `image_path`, `image_id` or `sample_id` (<id>__<target>)."""
    ids = {Path(p).stem: i for i, p in enumerate(image_paths)}
    folds = np.full(len(image_paths), -1, np.int32)
    with open(path, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            key = next((k for k in ("image_path", "image_id", "sample_id") if k in row), None)
            if key is None or "fold" not in row:
                raise DataError(f"{path}: need a fold column and one of image_path, image_id, sample_id")
            image = Path(row[key]).stem if key == "image_path" else row[key].split("__")[0]
            if image in ids:
                folds[ids[image]] = int(_number(row["fold"], "fold", f"{path} line {line}"))
    if (folds < 0).any():
        missing = [image_paths[i] for i in np.flatnonzero(folds < 0)[:3]]
        raise DataError(f"{path}: {int((folds < 0).sum())} train images have no fold, e.g. {missing}")
    return folds
