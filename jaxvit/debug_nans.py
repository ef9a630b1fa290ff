"""`train.debug_nans`: stop at the first non-finite value of a training step and say where it came from.

JAX's `jax_debug_nans` re-runs a jitted step that produced a NaN operation by operation and raises at the first
primitive whose output is not finite (its traceback points into the model or loss code). This module turns that
into one readable error: the step, the operation and the jaxvit source line that called it, and the paths of
the parameters whose gradient (or value) is not finite at that step. Slow: for debugging only.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxvit import optim
from jaxvit.errors import UserError


def checked_step(step_fn: Callable, state: dict, batch: dict, task: Any, model: Any, step: int):
    """step_fn(state, batch) with NaN checking; raises a UserError describing the first non-finite value."""
    before = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its input state
    jax.config.update("jax_debug_nans", True)
    try:
        new, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
    except FloatingPointError as e:
        jax.config.update("jax_debug_nans", False)
        raise UserError(report(before, batch, task, model, step, e)) from None
    finally:
        jax.config.update("jax_debug_nans", False)
    return new, metrics


def _non_finite(tree: dict) -> list[str]:
    flat = traverse_util.flatten_dict(jax.device_get(tree))
    return ["/".join(k) for k, v in flat.items() if not np.all(np.isfinite(np.asarray(v, np.float32)))]


def report(state: dict, batch: dict, task: Any, model: Any, step: int, error: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/jaxvit/" in f.filename
              and not f.filename.endswith(("debug_nans.py", "train.py"))]
    where = f" at {frames[-1].filename.split('/jaxvit/')[-1]}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    operation = str(error).strip().splitlines()[0]

    def loss_fn(trainable):
        variables = optim.combine(optim.combine(trainable, state["frozen"]), state.get("mutable", {}))
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        return task.loss(model, variables, batch, rng, step=state["step"])[0].mean()

    grads = jax.jit(jax.grad(loss_fn))(state["trainable"])
    bad_grads, bad_params = _non_finite(grads), _non_finite({"trainable": state["trainable"],
                                                             "frozen": state["frozen"]})
    lines = [f"train.debug_nans: step {step + 1} produced a non-finite value: {operation}{where}",
             f"non-finite gradients ({len(bad_grads)}): {', '.join(bad_grads[:20]) or 'none'}",
             f"non-finite parameters before the step ({len(bad_params)}): {', '.join(bad_params[:20]) or 'none'}"]
    return "\n".join(lines)
