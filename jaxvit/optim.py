"""Trainable-set selection, layer-wise learning rates (optax.multi_transform) and schedules.

Every rule acts on "/"-joined variable paths such as `params/backbone/encoder/layer_3/mlp/fc1/kernel`,
`params/head/out/bias` or `lora/backbone/encoder/layer_3/attention/query/lora_a`.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

_LAYER = re.compile(r"/encoder/layer_(\d+)/")


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def layer_index(path: str) -> int | None:
    """Block index of a backbone path; -1 for the embeddings; None for anything else (final norm, head)."""
    m = _LAYER.search(path)
    if m:
        return int(m.group(1))
    return -1 if "/backbone/embeddings/" in path else None


def is_trainable(path: str, cfg, stage: int) -> bool:
    """Which variables get gradients. Stage 1 of two-stage training trains the head only."""
    if path.startswith("params/head/"):
        return True
    if stage == 1:
        return False
    if cfg.lora.enabled:
        return path.startswith("lora/")
    n, i = cfg.train.freeze_first_n_layers, layer_index(path)
    return not (n and i is not None and i < n)  # freezing N blocks freezes the embeddings too


def lr_multiplier(path: str, cfg, depth: int) -> float:
    """First matching `optim.lr_mults` rule (regex, multiplier), times layer decay for backbone blocks."""
    mult = 1.0
    for pattern, value in cfg.optim.lr_mults:
        if re.search(pattern, path):
            mult = float(value)
            break
    i = layer_index(path)
    decay = cfg.optim.layer_decay
    if decay != 1.0 and "/backbone/" in path:
        mult *= decay ** (depth - (i if i is not None else depth - 1))  # final norm decays like the last block
    return mult


def schedule(cfg, total_steps: int) -> optax.Schedule:
    o = cfg.optim
    warmup = o.warmup_steps or int(round(o.warmup_ratio * total_steps))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total_steps, 1),
                                                  end_value=o.lr * o.lr_min_ratio)
    if o.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(max(total_steps, 1), o.lr, pct_start=max(o.warmup_ratio, 1e-3))
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)],
                                    [warmup]) if warmup else optax.constant_schedule(o.lr)
    raise ValueError(f"optim.schedule={o.schedule!r}; use cosine, onecycle or constant")


def _decays(path: str, ndim: int) -> bool:
    """Weight decay on matrices (kernels, LoRA factors) only; not on biases, norms, tokens, LayerScale."""
    return ndim >= 2 and not re.search(r"/(cls_token|mask_token|register_tokens|position_embeddings)$", path)


def make_optimizer(cfg, trainable: dict, total_steps: int, depth: int) -> tuple[optax.GradientTransformation,
                                                                                 Callable[[int], float], dict]:
    """(optimizer over the trainable tree, base lr schedule, {path: lr multiplier})."""
    flat = traverse_util.flatten_dict(trainable)
    mults = {path_str(k): lr_multiplier(path_str(k), cfg, depth) for k in flat}
    labels = traverse_util.unflatten_dict({k: f"x{mults[path_str(k)]:.6g}" for k in flat})
    decay_mask = traverse_util.unflatten_dict({k: _decays(path_str(k), v.ndim) for k, v in flat.items()})
    base = schedule(cfg, total_steps)
    o = cfg.optim

    def group(mult: float) -> optax.GradientTransformation:
        return optax.adamw(lambda step: base(step) * mult, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask)

    transforms = {f"x{m:.6g}": group(m) for m in set(mults.values())}
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
    return optax.chain(*chain, optax.multi_transform(transforms, labels)), base, mults


def ema_update(ema: dict, new: dict, decay: float) -> dict:
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, new)


def split(tree: dict, predicate: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves whose path satisfies predicate, the rest), both nested dicts."""
    flat = traverse_util.flatten_dict(tree)
    yes = {k: v for k, v in flat.items() if predicate(path_str(k))}
    no = {k: v for k, v in flat.items() if not predicate(path_str(k))}
    return traverse_util.unflatten_dict(yes), traverse_util.unflatten_dict(no)


def combine(a: dict, b: dict) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)})

