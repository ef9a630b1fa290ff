"""Classification: soft-target cross-entropy, label smoothing, MixUp / CutMix inside the jitted step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    one_hot = jax.nn.one_hot(labels, num_classes)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def mix(images: jax.Array, soft: jax.Array, rng: jax.Array, mixup_alpha: float, cutmix_alpha: float):
    """MixUp or CutMix (one of them, chosen per batch when both are on) with the batch rolled by one."""
    if not (mixup_alpha or cutmix_alpha):
        return images, soft
    k_choice, k_lam, k_box = jax.random.split(rng, 3)
    partner_images, partner_soft = jnp.roll(images, 1, axis=0), jnp.roll(soft, 1, axis=0)

    def mixup(_):
        lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
        return lam * images + (1 - lam) * partner_images, lam

    def cutmix(_):
        b, h, w, _ = images.shape
        lam = jax.random.beta(k_lam, cutmix_alpha, cutmix_alpha)
        cut_h, cut_w = (h * jnp.sqrt(1 - lam)).astype(jnp.int32), (w * jnp.sqrt(1 - lam)).astype(jnp.int32)
        cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
        lam = 1 - ((y1 - y0) * (x1 - x0)) / (h * w)  # the area actually kept
        return jnp.where(box, partner_images, images), lam

    if mixup_alpha and cutmix_alpha:
        mixed, lam = jax.lax.cond(jax.random.bernoulli(k_choice), mixup, cutmix, None)
    else:
        mixed, lam = (mixup if mixup_alpha else cutmix)(None)
    lam = lam.astype(soft.dtype)
    return mixed.astype(images.dtype), lam * soft + (1 - lam) * partner_soft


def loss(logits: jax.Array, soft_targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against soft targets, in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), soft_targets)
