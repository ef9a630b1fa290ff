"""Task models: a ViT backbone (params under `backbone/`) with a head (params under `head/`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvit.models.vit import ViT, ViTConfig


def pool_features(out: dict, pool: str) -> jax.Array:
    """cls: the normed CLS token; cls_mean: CLS concatenated with the mean patch token (DINOv2's probe input)."""
    if pool == "cls":
        return out["pooler_output"]
    if pool == "cls_mean":
        return jnp.concatenate([out["pooler_output"], out["patch_tokens"].mean(axis=1)], axis=-1)
    raise ValueError(f"unknown pool {pool!r}; use 'cls' or 'cls_mean'")


class Head(nn.Module):
    """Dropout -> [Dense -> GELU -> Dropout]* -> Dense, in float32."""

    num_outputs: int
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        for i, width in enumerate(self.hidden):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = nn.gelu(nn.Dense(width, name=f"hidden_{i}")(x), approximate=False)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.truncated_normal(0.02), name="out")(x)


class Classifier(nn.Module):
    """Backbone + head; returns logits [B, num_outputs] (classes, or regression targets)."""

    backbone: ViTConfig
    num_outputs: int
    pool: str = "cls"
    head_hidden: tuple[int, ...] = ()
    head_dropout: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        out = ViT(self.backbone, name="backbone")(images, train=train)
        return Head(self.num_outputs, tuple(self.head_hidden), self.head_dropout, name="head")(
            pool_features(out, self.pool), train)
