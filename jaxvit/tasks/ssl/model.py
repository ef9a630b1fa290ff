"""The SSL model: a ViT backbone with a DINO head (on the [CLS] token) and an iBOT head (on patch tokens).

`DINOHead` is the official head (dinov2/dinov3 `layers/dino_head.py`): Linear(D, hidden) - GELU - ... -
Linear(hidden, bottleneck), L2-normalised, then prototypes Linear(bottleneck, K, bias=False); DINOv2 weight-
normalises the prototypes (`weight_norm`, weight_g filled with 1 and trained), DINOv3 does not. Parameter names
follow the PyTorch modules' order (`mlp_{i}` is the i-th Linear of `mlp`, `kernel` [+ `weight_g`] the
prototypes, torch's `last_layer.weight`.T [+ `weight_g`]); parity is tested against `dinov2.layers.DINOHead` in tests/test_ssl_task.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvit.models.vit import ViT, ViTConfig, gelu

_INIT = nn.initializers.truncated_normal(0.02)  # the official _init_weights: trunc_normal(std=0.02), bias 0


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    weight_norm: bool = False  # True: DINOv2's weight-normalised prototypes; False: DINOv3's plain Linear
    use_bn: bool = False  # BatchNorm after each hidden Linear (the official `use_bn`, DINO v1's use_bn_in_head)


class BatchStandardize(nn.Module):
    """BatchNorm in training mode without running statistics: (x - batch mean) / batch std * scale + bias."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        x = (x - x.mean(axes)) * jax.lax.rsqrt(x.var(axes) + 1e-5)
        return x * self.param("scale", nn.initializers.ones, x.shape[-1:]) + self.param(
            "bias", nn.initializers.zeros, x.shape[-1:])


class DINOHead(nn.Module):
    cfg: HeadConfig
    dtype: str = "float32"  # matmul compute dtype (the backbone's); the L2 norm and the logits are float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] features -> [..., K] prototype logits (float32)."""
        c, dtype = self.cfg, jnp.dtype(self.dtype)
        widths = [c.hidden_dim] * (max(c.nlayers, 1) - 1) + [c.bottleneck_dim]
        for i, width in enumerate(widths):
            x = nn.Dense(width, kernel_init=_INIT, dtype=dtype, name=f"mlp_{i}")(x)
            if i < len(widths) - 1:
                if c.use_bn:  # batch statistics always (student and teacher heads run in training mode)
                    x = BatchStandardize(name=f"bn_{i}")(x.astype(jnp.float32)).astype(dtype)
                x = gelu(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        v = self.param("kernel", _INIT, (c.bottleneck_dim, c.n_prototypes))  # [in, out] (torch's weight.T)
        if c.weight_norm:  # w = g * v / ||v||, the norm per prototype (torch weight_norm, dim=0 of [out, in])
            g = self.param("weight_g", nn.initializers.ones, (c.n_prototypes,))
            v = v * (g / jnp.linalg.norm(v, axis=0))
        return jnp.dot(x.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)


class SSLModel(nn.Module):
    """Backbone (params under `backbone/`, its ViTConfig in `backbone` as the classifier's), `dino_head/` and,
    when separate, `ibot_head/`. `model.apply(v, images)` runs the backbone (its output dict: pooler_output,
    patch_tokens, ...); `head="dino"` / `"ibot"` applies a head to features; `init_all` creates every parameter."""

    backbone: ViTConfig
    dino_cfg: HeadConfig
    ibot_cfg: HeadConfig
    separate_ibot_head: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, head: str = "", train: bool = False, mask: jax.Array | None = None,
                 return_attention: bool = False):
        if head == "dino" or (head == "ibot" and not self.separate_ibot_head):
            return DINOHead(self.dino_cfg, self.backbone.dtype, name="dino_head")(x)
        if head == "ibot":
            return DINOHead(self.ibot_cfg, self.backbone.dtype, name="ibot_head")(x)
        return ViT(self.backbone, name="backbone")(x, train=train, mask=mask, return_attention=return_attention)

    def init_all(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = self(images)
        return self(out["pooler_output"], head="dino"), self(out["patch_tokens"], head="ibot")
