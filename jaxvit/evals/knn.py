"""Weighted k-NN classification on frozen features (DINO's protocol): the k most cosine-similar training rows
vote, each with weight exp(similarity / temperature) (temperature 0: one vote each, a majority vote)."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("k", "temperature", "num_classes"))
def _knn_votes(train: jax.Array, train_y: jax.Array, query: jax.Array, k: int, temperature: float,
               num_classes: int) -> jax.Array:
    """Class votes [Q, k, C] of the k most cosine-similar training rows, cumulated over neighbours."""
    sim, idx = jax.lax.top_k(query @ train.T, k)
    weight = jnp.exp((sim - 1.0) / temperature) if temperature > 0 else jnp.ones_like(sim)  # exp(sim/T), rescaled
    return jnp.cumsum(jax.nn.one_hot(train_y[idx], num_classes) * weight[..., None], axis=1)


def knn_votes(train_f: np.ndarray, train_y: np.ndarray, query_f: np.ndarray, ks: Sequence[int],
              temperature: float, num_classes: int, chunk: int = 1024) -> dict[int, np.ndarray]:
    """{k: class votes [Q, C] of the query rows, normalised to sum 1} (what an ensemble averages)."""
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    train, kmax = jnp.asarray(unit(train_f)), min(max(ks), len(train_f))
    query = unit(query_f)
    votes = np.concatenate([np.asarray(_knn_votes(train, jnp.asarray(train_y), jnp.asarray(query[i:i + chunk]),
                                                  kmax, temperature, num_classes))
                            for i in range(0, len(query), chunk)])
    out = {}
    for k in ks:
        v = votes[:, min(k, kmax) - 1]
        out[k] = v / np.maximum(v.sum(-1, keepdims=True), 1e-30)
    return out


def knn_predict(train_f: np.ndarray, train_y: np.ndarray, query_f: np.ndarray, ks: Sequence[int],
                temperature: float, num_classes: int, chunk: int = 1024) -> dict[int, np.ndarray]:
    """Predicted labels of the query rows for each k (ties: the lowest class)."""
    return {k: v.argmax(-1) for k, v in knn_votes(train_f, train_y, query_f, ks, temperature, num_classes,
                                                   chunk).items()}
