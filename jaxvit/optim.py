"""Trainable-set selection, layer-wise learning rates (optax.multi_transform) and schedules.

Every rule acts on "/"-joined variable paths such as `params/backbone/encoder/layer_3/mlp/fc1/kernel`,
`params/head/out/bias` or `lora/backbone/encoder/layer_3/attention/query/lora_a`.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxvit.errors import ConfigError
from jaxvit.models import rules

def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def trainable_rule(spec: str | Sequence[str], cfg, head: str, frozen: str = "") -> Callable[[str], bool]:
    """Which variables a phase trains. "head": the task's head (`head`, a regex); "all": the head plus what
    the config fine-tunes (LoRA adapters when lora.enabled, else every block from
    train.freeze_first_n_layers on; freezing N blocks freezes the embeddings too); or a tuple of regexes.
    Variables matching `frozen` (the task's never-trained parts, e.g. a depth model) are never trained."""
    if frozen:
        inner = trainable_rule(spec, cfg, head)
        return lambda p: inner(p) and not re.search(frozen, p)
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


def lr_multiplier(path: str, cfg, depth: int, lr_mults: Sequence = (), base_lr: float | None = None) -> float:
    """optim.backbone_lr / base lr for backbone variables when backbone_lr is set, else the first matching rule of
    `lr_mults` (a phase's) or else `optim.lr_mults`, (regex, multiplier); times layer decay for backbone blocks."""
    mult = 1.0
    if cfg.optim.get("backbone_lr", 0.0) and path.startswith("params/backbone/"):
        mult = cfg.optim.backbone_lr / (base_lr or cfg.optim.lr)
    else:
        for pattern, value in lr_mults or cfg.optim.lr_mults:
            if re.search(pattern, path):
                mult = float(value)
                break
    i = rules.decay_index(path, depth)
    if cfg.optim.layer_decay != 1.0 and i is not None:
        mult *= cfg.optim.layer_decay ** (depth - i)
    return mult


def lr_scale(cfg) -> float:
    """optim.lr_scaling's factor for the global batch: none 1; sqrt_wrt_1024 4 * sqrt(B / 1024) (DINOv2/DINOv3's
    `sqrt_wrt_1024`, their base lr being quoted for batch 1024 / 4); linear_wrt_256 B / 256."""
    b, rule = cfg.train.batch_size, cfg.optim.lr_scaling
    factors = {"none": 1.0, "sqrt_wrt_1024": 4 * math.sqrt(b / 1024), "linear_wrt_256": b / 256}
    if rule not in factors:
        raise ValueError(f"optim.lr_scaling={rule!r}; use one of {', '.join(factors)}")
    return factors[rule]


def schedule(cfg, total_steps: int, lr: float | None = None) -> optax.Schedule:
    """Warmup then `optim.schedule` over `total_steps`, peaking at `lr` (default optim.lr) x `lr_scale`."""
    o, n = cfg.optim, max(total_steps, 1)
    peak = (o.lr if lr is None else lr) * lr_scale(cfg)
    warmup = o.warmup_steps or int(round(o.warmup_ratio * total_steps))
    if o.schedule == "cosine" and warmup >= n:
        raise ConfigError(f"optim.warmup_steps={warmup} leaves no steps of the {n}-step cosine schedule: lower it "
                          "(or optim.warmup_ratio) or train longer")
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


def cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, start: float = 0.0) -> optax.Schedule:
    """The official DINO `CosineScheduler`: linspace(start, base, warmup) inclusive, then a cosine from base to
    final over the remaining steps; final from total_steps on."""
    n = max(total_steps - warmup_steps, 1)

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warm = start + (base - start) * step / max(warmup_steps - 1, 1)
        cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * (step - warmup_steps) / n))
        return jnp.where(step < warmup_steps, warm, jnp.where(step < total_steps, cos, final))
    return fn


def scheduled_weight_decay(weight_decay: optax.Schedule, mask: dict) -> optax.GradientTransformation:
    """optax.add_decayed_weights with a weight decay that follows a schedule (of the update count)."""
    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        wd = weight_decay(state.count)
        updates = jax.tree_util.tree_map(lambda u, p: u + wd * p, updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
    return optax.masked(optax.GradientTransformation(init, update), mask)


def clip_per_module(max_norm: float) -> optax.GradientTransformation:
    """Clips each module's gradient (the subtrees two levels down, e.g. params/backbone, params/dino_head) to
    `max_norm` on its own, as DINOv2/DINOv3 clip the student's backbone and heads separately."""
    def update(updates, state, params=None):
        clipped = {c: {m: optax.clip_by_global_norm(max_norm).update(sub, optax.EmptyState())[0]
                       for m, sub in tree.items()} for c, tree in updates.items()}
        return clipped, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, trainable: dict, total_steps: int, depth: int, lr: float | None = None,
                   lr_mults: Sequence = (), lr_gates: Sequence = ()
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float], dict]:
    """(optimizer over the trainable tree, base lr schedule, {path: lr multiplier}); `lr` and `lr_mults`
    default to optim.lr and optim.lr_mults (a phase may set its own). `lr_gates` ((regex, step), ...) hold the
    lr of matching variables at 0 until that step (DINO's last layer in its first epoch). With
    optim.weight_decay_end >= 0 the weight decay follows a cosine from optim.weight_decay to it."""
    flat = traverse_util.flatten_dict(trainable)
    mults = {path_str(k): lr_multiplier(path_str(k), cfg, depth, lr_mults, lr) for k in flat}
    gates = {path_str(k): next((int(s) for r, s in lr_gates if re.search(r, path_str(k))), 0) for k in flat}
    label = lambda p: f"x{mults[p]:.6g}" + (f"@{gates[p]}" if gates[p] else "")
    labels = traverse_util.unflatten_dict({k: label(path_str(k)) for k in flat})
    decay_mask = traverse_util.unflatten_dict({k: _decays(path_str(k), v.ndim) for k, v in flat.items()})
    base = schedule(cfg, total_steps, lr)
    o = cfg.optim
    if o.weight_decay_end >= 0:
        wd = cosine(o.weight_decay, o.weight_decay_end, total_steps)

    def group(mult: float, gate: int) -> optax.GradientTransformation:
        lr_fn = lambda step: base(step) * mult * (step >= gate)
        if o.weight_decay_end < 0:
            return optax.adamw(lr_fn, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
        return optax.chain(optax.scale_by_adam(o.b1, o.b2, o.eps), scheduled_weight_decay(wd, decay_mask),
                           optax.scale_by_learning_rate(lr_fn))

    transforms = {label(p): group(mults[p], gates[p]) for p in mults}
    chain = []
    if o.grad_clip:
        chain.append(clip_per_module(o.grad_clip) if o.clip_per_module else optax.clip_by_global_norm(o.grad_clip))
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

