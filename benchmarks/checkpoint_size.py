"""Checkpoint bytes of a LoRA run before/after lean checkpoints, from abstract shapes (nothing is allocated).

    python benchmarks/checkpoint_size.py        # configs/gz2_lora.py (LoRA r16 on q/k/v/dense), ViT-S/14 and ViT-L/14

"before" stores the whole train state (checkpoint.store_frozen=True, as every jaxvit checkpoint did); "after" drops
the weights no phase trains (the LoRA base). Array bytes only: orbax adds a few kB of metadata per checkpoint.
"""
import jax
import jax.numpy as jnp
from flax import traverse_util

from configs.gz2_lora import get_config
from jaxvit import checkpoint, optim, train
from jaxvit.models import get_config as model_config
from jaxvit.tasks.base import build_head_model


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def sizes(arch: str, num_classes: int = 5) -> dict:
    cfg = get_config()
    cfg.model.arch, cfg.model.pretrained = arch, ""  # the pretrained checkpoint's shapes, not its values
    variables = jax.eval_shape(lambda: build_head_model(cfg, num_classes, jax.random.key(0))[1])
    rules = [optim.trainable_rule(p.trainable, cfg, r"^params/head/") for p in train.phases(cfg)]
    trainable, frozen, mutable = train.partition(variables, rules[-1])
    tx, _, _ = optim.make_optimizer(cfg, trainable, 1000, model_config(arch).depth)
    state = dict(step=jnp.int32(0), rng=jax.ShapeDtypeStruct((2,), jnp.uint32), trainable=trainable,
                 frozen=jax.eval_shape(lambda f: checkpoint.cast_frozen(f, cfg.model.frozen_dtype), frozen),
                 opt_state=jax.eval_shape(tx.init, trainable), mutable=mutable)
    never = [k for k in traverse_util.flatten_dict(frozen) if not any(r(optim.path_str(k)) for r in rules)]
    lean = dict(state, frozen=traverse_util.unflatten_dict(
        {k: v for k, v in traverse_util.flatten_dict(state["frozen"]).items() if k not in never}))
    return dict(before=nbytes(state), after=nbytes(lean), trainable=nbytes(trainable))


if __name__ == "__main__":
    for arch in ("dinov2_vits14", "dinov2_vitl14"):
        s = sizes(arch)
        print(f"{arch}: before {s['before'] / 1e6:.1f} MB, after {s['after'] / 1e6:.1f} MB "
              f"({s['before'] / s['after']:.0f}x smaller; trainable {s['trainable'] / 1e6:.1f} MB)")
