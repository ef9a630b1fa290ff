"""Accuracy of a classifier under synthetic corruptions (ImageNet-C's parameters per severity 1..5), computed
inside the jitted forward pass on the evaluation image in [0, 1] RGB; noise seeded per image (runs repeat)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import inference, metrics

SEVERITY = {  # ImageNet-C (Hendrycks & Dietterich 2019) parameters for severities 1..5
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
}


def _blur_matrix(n: int, sigma: jax.Array) -> jax.Array:
    """(n, n) matrix of a 1-D Gaussian blur with mirrored borders (rows sum to 1); sigma may be traced."""
    taps = jnp.arange(-(n - 1), n)
    w = jnp.exp(-0.5 * (taps / sigma) ** 2)
    w = w / w.sum()
    rows = jnp.arange(n)[:, None]
    cols = jnp.mod(rows + taps[None, :], 2 * n)
    cols = jnp.where(cols >= n, 2 * n - 1 - cols, cols)  # -1 -> 0, n -> n - 1 (edge repeated)
    return jnp.zeros((n, n), jnp.float32).at[jnp.broadcast_to(rows, cols.shape), cols].add(
        jnp.broadcast_to(w, cols.shape))


def corrupt(x: jax.Array, name: str, s: jax.Array, keys: jax.Array) -> jax.Array:
    """Corrupted copy of images x [B, H, W, 3] in [0, 1] with parameter `s` (see SEVERITY); `keys` [B] seed
    the per-image noise."""
    if name == "gaussian_noise":
        y = x + s * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    elif name == "brightness":
        y = x + s
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        y = (x - mean) * s + mean
    elif name == "blur":
        h, w = x.shape[1:3]
        y = jnp.einsum("ij,bjwc->biwc", _blur_matrix(h, s * h / 224), x)
        y = jnp.einsum("kw,biwc->bikc", _blur_matrix(w, s * w / 224), y)
    else:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(SEVERITY)}")
    return jnp.clip(y, 0.0, 1.0)


def corrupted_probs(task, model, mean: Sequence[float], std: Sequence[float], name: str | None, seed: int = 0
                    ) -> Callable:
    """fn((variables, parameter), batch) -> probabilities of batch["image"] (normalised), corrupted in [0, 1]
    space first. The parameter is an input, so all severities of a corruption share one compiled program."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def fn(inputs, batch):
        (variables, s), x = inputs, batch["image"]
        if name is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch["index"])
            x = (corrupt(x * std + mean, name, s, keys) - mean) / std
        return task.class_probabilities(model, variables, x)
    return fn


def corruption_accuracies(task: Any, model: Any, variables: dict, src: Any, mesh: Any, corruptions: Sequence[str],
                          severities: Sequence[int]) -> dict:
    """{"clean": accuracy, "accuracy": {corruption: {severity: accuracy}}, "mean", "drop", "mean_corrupted",
    "severity_parameters"} of a classification task's model over the readable images of `src`."""
    unknown = sorted(set(corruptions) - set(SEVERITY))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(SEVERITY)}")
    d = task.cfg.data
    batch_size = inference.round_batch(task.cfg.eval.batch_size, mesh)

    def accuracies(name: str | None, params: Sequence[float]) -> list[float]:
        fn = corrupted_probs(task, model, d.mean, d.std, name)
        out = []
        for s in params:
            probs, ok = inference.map_source(fn, (variables, np.float32(s)), src, task.eval_transform(), d,
                                             batch_size, mesh)
            out.append(metrics.accuracy(src.labels[ok], probs[ok].argmax(-1)))
        return out

    clean = accuracies(None, [0.0])[0]
    table = {c: dict(zip(map(int, severities), accuracies(c, [SEVERITY[c][s - 1] for s in severities])))
             for c in corruptions}
    means = {c: float(np.mean(list(v.values()))) for c, v in table.items()}
    return dict(clean=clean, accuracy=table, mean=means, drop={c: clean - m for c, m in means.items()},
                mean_corrupted=float(np.mean(list(means.values()))) if means else None,
                severity_parameters={c: SEVERITY[c] for c in corruptions})
