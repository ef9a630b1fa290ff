"""Trainable-set selection, layer-wise learning rates (optax.multi_transform) and schedules.

Every rule acts on "/"-joined variable paths such as `params/backbone/encoder/layer_3/mlp/fc1/kernel`,
`params/head/out/bias` or `lora/backbone/encoder/layer_3/attention/query/lora_a`.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import optax
from flax import traverse_util

from jaxvit.models import rules

def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def trainable_rule(spec: str | Sequence[str], cfg, head: str) -> Callable[[str], bool]:
    """Which variables a phase trains. "head": the task's head (`head`, a regex); "all": the head plus what
    the config fine-tunes (LoRA adapters when lora.enabled, else every block from
    train.freeze_first_n_layers on; freezing N blocks freezes the embeddings too); or a tuple of regexes."""
    if isinstance(spec, str) and spec == "head":
        return lambda p: bool(re.search(head, p))
    if isinstance(spec, str) and spec == "all":
        n = cfg.train.freeze_first_n_layers

        def rule(p: str) -> bool:
            if re.search(head, p):
                return True
            if cfg.lora.enabled:
                return p.startswith("lora/")
            i = rules.layer_index(p)
            return not (n and i is not None and i < n)
        return rule
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return lambda p: any(re.search(r, p) for r in patterns)


def lr_multiplier(path: str, cfg, depth: int, lr_mults: Sequence = ()) -> float:
    """First matching rule of `lr_mults` (a phase's) or else `optim.lr_mults`, (regex, multiplier), times
    layer decay for backbone blocks."""
    mult = 1.0
    for pattern, value in lr_mults or cfg.optim.lr_mults:
        if re.search(pattern, path):
            mult = float(value)
            break
    i = rules.decay_index(path, depth)
    if cfg.optim.layer_decay != 1.0 and i is not None:
        mult *= cfg.optim.layer_decay ** (depth - i)
    return mult


def schedule(cfg, total_steps: int, lr: float | None = None) -> optax.Schedule:
    """Warmup then `optim.schedule` over `total_steps`, peaking at `lr` (default optim.lr)."""
    o, peak, n = cfg.optim, cfg.optim.lr if lr is None else lr, max(total_steps, 1)
    warmup = o.warmup_steps or int(round(o.warmup_ratio * total_steps))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, n, end_value=peak * o.lr_min_ratio)
    if o.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(n, peak, pct_start=max(o.warmup_ratio, 1e-3))
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup]) if warmup else optax.constant_schedule(peak)
    raise ValueError(f"optim.schedule={o.schedule!r}; use cosine, onecycle or constant")


def _decays(path: str, ndim: int) -> bool:
    """Weight decay on matrices (kernels, LoRA factors) only; not on biases, norms, tokens, LayerScale."""
    return ndim >= 2 and not re.search(r"/(cls_token|mask_token|register_tokens|position_embeddings)$", path)


def make_optimizer(cfg, trainable: dict, total_steps: int, depth: int, lr: float | None = None,
                   lr_mults: Sequence = ()) -> tuple[optax.GradientTransformation, Callable[[int], float], dict]:
    """(optimizer over the trainable tree, base lr schedule, {path: lr multiplier}); `lr` and `lr_mults`
    default to optim.lr and optim.lr_mults (a phase may set its own)."""
    flat = traverse_util.flatten_dict(trainable)
    mults = {path_str(k): lr_multiplier(path_str(k), cfg, depth, lr_mults) for k in flat}
    labels = traverse_util.unflatten_dict({k: f"x{mults[path_str(k)]:.6g}" for k in flat})
    decay_mask = traverse_util.unflatten_dict({k: _decays(path_str(k), v.ndim) for k, v in flat.items()})
    base = schedule(cfg, total_steps, lr)
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

