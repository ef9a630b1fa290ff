"""LoRA as a transform of the parameter tree.

Adapters live in their own `lora` collection, at the same paths as the Linear layers they adapt:
`lora/backbone/encoder/layer_3/attention/query/{lora_a (in, r), lora_b (r, out)}`. `jaxvit.models.vit.Linear`
adds `dropout(x) @ A @ B * alpha / r` when an adapter is present, so the base weights are never copied and
no weight gradient of the frozen base is formed. `merge` folds adapters into the kernels for inference/export.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util


def module_paths(params: dict) -> list[tuple[str, ...]]:
    """Paths of every Linear-like module: those owning a 2-D `kernel`."""
    flat = traverse_util.flatten_dict(params)
    return [k[:-1] for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 2]


def matches(path: tuple[str, ...] | str, targets: Sequence[str]) -> bool:
    """A target is a regex over the "/"-joined module path, anchored at a path-component boundary on the
    left and at the end: "query" matches ".../attention/query"; ".*/layer_(1[2-9])/attention/dense" works too."""
    s = path if isinstance(path, str) else "/".join(path)
    return any(re.search(rf"(^|/)(?:{t})$", s) for t in targets)


def init_adapters(params: dict, targets: Sequence[str], rank: int, rng: jax.Array) -> dict:
    """Adapters for every Linear whose path matches `targets`: A ~ U(+-1/sqrt(in)) (PEFT's Kaiming-uniform
    default bound for a=sqrt(5)), B = 0, so the adapted model starts equal to the base model."""
    every = module_paths(params)
    paths = [p for p in every if matches(p, targets)]
    if not paths:
        raise ValueError(f"LoRA targets {list(targets)} match no Linear layer; module paths look like "
                         f"{'/'.join(every[0]) if every else '(none)'}")
    flat_params = traverse_util.flatten_dict(params)
    out = {}
    for i, p in enumerate(sorted(paths)):
        d_in, d_out = flat_params[p + ("kernel",)].shape
        bound = 1.0 / d_in ** 0.5
        out[p + ("lora_a",)] = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, rank), jnp.float32,
                                                  -bound, bound)
        out[p + ("lora_b",)] = jnp.zeros((rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def merge(params: dict, adapters: dict, alpha: float) -> dict:
    """Base params with W <- W + (alpha / r) A @ B for every adapted kernel."""
    flat = dict(traverse_util.flatten_dict(params))
    ad = traverse_util.flatten_dict(adapters)
    for path, a in ad.items():
        if path[-1] == "lora_a":
            k = path[:-1] + ("kernel",)
            flat[k] = flat[k] + (alpha / a.shape[-1]) * (a @ ad[path[:-1] + ("lora_b",)])
    return traverse_util.unflatten_dict(flat)


def count(tree: dict) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))
