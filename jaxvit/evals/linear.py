"""Linear probe on frozen features: multinomial logistic regression on standardised features (L-BFGS, optax),
its L2 penalty chosen on a validation split."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvit import metrics


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_logistic(x: jax.Array, y: jax.Array, l2: float, num_classes: int, steps: int = 300) -> dict:
    """Multinomial logistic regression: mean cross-entropy + l2 * |W|^2 minimised by L-BFGS."""
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}

    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
        return ce + l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), state), value

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params


def linear_probe(train: tuple[np.ndarray, np.ndarray], test_f: np.ndarray, num_classes: int,
                 l2s: Sequence[float], val: tuple[np.ndarray, np.ndarray] | None = None,
                 steps: int = 300) -> tuple[np.ndarray, dict]:
    """(test predictions, {l2, sweep: {l2: val accuracy}}): features standardised with the train statistics;
    the L2 penalty with the best val accuracy (without a val split: the middle value of `l2s`)."""
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6
    norm = lambda f: jnp.asarray((f - mean) / std)
    predict = lambda p, f: np.asarray(jnp.argmax(norm(f) @ p["w"] + p["b"], -1))
    fit = lambda l2: fit_logistic(norm(train[0]), jnp.asarray(train[1]), l2, num_classes, steps)
    if val is not None and len(l2s) > 1:
        fits = {float(l2): fit(l2) for l2 in l2s}
        sweep = {l2: metrics.accuracy(val[1], predict(p, val[0])) for l2, p in fits.items()}
        best = max(sweep, key=sweep.get)
    else:
        best, sweep = float(sorted(l2s)[len(l2s) // 2]), {}
        fits = {best: fit(best)}
    return predict(fits[best], test_f), {"l2": best, "sweep": sweep}
