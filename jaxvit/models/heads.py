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


_ACTIVATIONS = {"gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}


class Head(nn.Module):
    """Dropout(dropout) -> [Dense -> BatchNorm? -> act -> Dropout]* -> Dense, in float32.

    Hidden layer i is followed by Dropout(hidden_dropout[i]) (default: `dropout`). norm="batch" adds
    BatchNorm after each hidden Dense (statistics in the `batch_stats` collection; PyTorch's BatchNorm1d
    defaults: momentum 0.1, eps 1e-5), as in the CIFAR-10 recipe's Linear-BN-ReLU-Dropout blocks.
    """

    num_outputs: int
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    norm: str = "none"  # none | batch
    act: str = "gelu"  # gelu | relu
    hidden_dropout: tuple[float, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dropout(self.dropout, deterministic=not train)(x.astype(jnp.float32))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"hidden_{i}")(x)
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"norm_{i}")(x)
            rate = self.hidden_dropout[i] if self.hidden_dropout else self.dropout
            x = nn.Dropout(rate, deterministic=not train)(_ACTIVATIONS[self.act](x))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.truncated_normal(0.02), name="out")(x)


class Classifier(nn.Module):
    """Backbone + head; returns logits [B, num_outputs] (classes, or regression targets). With a BatchNorm
    head, training applies need mutable=["batch_stats"]."""

    backbone: ViTConfig
    num_outputs: int
    pool: str = "cls"
    head_hidden: tuple[int, ...] = ()
    head_dropout: float = 0.0
    head_norm: str = "none"
    head_act: str = "gelu"
    head_hidden_dropout: tuple[float, ...] = ()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        out = ViT(self.backbone, name="backbone")(images, train=train)
        return Head(self.num_outputs, tuple(self.head_hidden), self.head_dropout, self.head_norm, self.head_act,
                    tuple(self.head_hidden_dropout), name="head")(pool_features(out, self.pool), train)
