"""Depth Anything (V1/V2) in Flax: a DINOv2 `ViT` backbone, the DPT neck and the depth head.

Follows transformers' `DepthAnythingForDepthEstimation` numerically. Parameter paths mirror its module names:
`backbone/...` (the ViT's own paths), `neck/reassemble_{i}/{projection,resize}`, `neck/conv_{i}`,
`neck/fusion_{i}/{projection,residual_layer1,residual_layer2}`, `head/{conv1,conv2,conv3}`.

Input: NHWC images scaled to [0, 1] and normalised with the ImageNet mean/std (`IMAGENET_MEAN/STD` of
`jaxvit.data.transforms`), height and width multiples of the patch size (14). The published models were trained
at 518 px on the shorter side; `input_size` gives the size transformers' image processor resizes to
(bicubic, aspect ratio kept, multiples of 14). Output: depth [B, H, W] at the input resolution (relative models:
inverse-depth-like disparity, larger is nearer; metric models: metres in (0, max_depth)).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxvit.models.vit import ViT, ViTConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DepthAnythingConfig:
    """Field names follow transformers' DepthAnythingConfig; the backbone is a DINOv2 `ViTConfig`."""

    backbone: ViTConfig
    out_indices: tuple[int, ...] = (3, 6, 9, 12)  # backbone hidden-state indices (0 = embeddings, i = block i)
    apply_layernorm: bool = True  # the backbone's final norm on each chosen block's tokens
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    neck_hidden_sizes: tuple[int, ...] = (48, 96, 192, 384)
    fusion_hidden_size: int = 64
    head_in_index: int = -1
    head_hidden_size: int = 32
    depth_estimation_type: str = "relative"  # relative: ReLU | metric: sigmoid; both scaled by max_depth
    max_depth: float = 1.0

    def __post_init__(self):
        if self.depth_estimation_type not in ("relative", "metric"):
            raise ValueError(f"depth_estimation_type={self.depth_estimation_type!r}: use 'relative' or 'metric'")
        if not len(self.out_indices) == len(self.reassemble_factors) == len(self.neck_hidden_sizes):
            raise ValueError(f"out_indices {self.out_indices}, reassemble_factors {self.reassemble_factors} and "
                             f"neck_hidden_sizes {self.neck_hidden_sizes} must have the same length")
        if min(self.out_indices) < 1 or max(self.out_indices) > self.backbone.depth:
            raise ValueError(f"out_indices {self.out_indices} must lie in 1..{self.backbone.depth} (block outputs; "
                             "0, the embeddings, is not supported)")
        for f in self.reassemble_factors:
            if not (f >= 1 and f == int(f)) and not (f < 1 and 1 / f == int(1 / f)):
                raise ValueError(f"reassemble factor {f}: use an integer >= 1 or 1/integer")

    @property
    def return_layers(self) -> tuple[int, ...]:
        """The ViT block indices (0-based) whose outputs the neck reads."""
        return tuple(i - 1 for i in self.out_indices)


# ------------------------------------------------------------------------------------------------ resizing

def _bilinear_taps(in_size: int, out_size: int, align_corners: bool):
    """Source indices (i0, i1) and weights of i1 for each output pixel, in float32 as PyTorch computes them."""
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
        src = scale * dst
    else:
        src = np.maximum(np.float32(in_size / out_size) * (dst + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, np.clip(src - i0, 0, 1).astype(np.float32)


def bilinear_resize(x: Array, size: tuple[int, int], align_corners: bool) -> Array:
    """Resize [B, H, W, C] to `size` like torch's `F.interpolate(mode="bilinear", align_corners=...)`
    (no antialias): two gathers and a lerp per axis. `jax.image.resize` matches neither corner mode."""
    for axis, out in ((1, size[0]), (2, size[1])):
        if x.shape[axis] == out:
            continue
        i0, i1, lam = _bilinear_taps(x.shape[axis], out, align_corners)
        shape = [1] * x.ndim
        shape[axis] = out
        lam = jnp.asarray(lam.reshape(shape), x.dtype)
        x = jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam
    return x


def input_size(height: int, width: int, size: int = 518, multiple: int = 14) -> tuple[int, int]:
    """(h, w) that transformers' Depth Anything image processor resizes an image to: scale both sides by the
    factor of the side that changes least towards `size`, round each to a multiple of `multiple`."""
    scale_h, scale_w = size / height, size / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return tuple(max(round(s * scale / multiple), 1) * multiple for s in (height, width))


# ------------------------------------------------------------------------------------------------ modules

def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1, bias: bool = True) -> nn.Conv:
    """torch Conv2d(kernel, stride, padding=kernel // 2) in NHWC."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=bias,
                   dtype=dtype, name=name)


class ConvTranspose(nn.Module):
    """torch ConvTranspose2d with kernel_size == stride (no overlap): each pixel becomes a factor x factor patch.
    Kernel (factor, factor, in, out)."""

    features: int
    factor: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        f, (b, h, w, c) = self.factor, x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (f, f, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.einsum("bhwi,pqio->bhpwqo", x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(self.dtype)
        return y.reshape(b, h * f, w * f, self.features) + bias.astype(self.dtype)


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))) with 3x3 convs (pre-activation)."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _conv(self.features, 3, "convolution1", self.dtype)(nn.relu(x))
        return x + _conv(self.features, 3, "convolution2", self.dtype)(nn.relu(h))


class FusionLayer(nn.Module):
    """Adds the residual-unit-refined skip feature, refines, upsamples (align_corners=True) and projects 1x1."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, size: tuple[int, int] | None) -> Array:
        skip_unit = ResidualConvUnit(self.features, self.dtype, name="residual_layer1")
        if skip is not None:
            if skip.shape != x.shape:
                skip = bilinear_resize(skip, x.shape[1:3], align_corners=False)
            x = x + skip_unit(skip)
        elif self.is_initializing():
            skip_unit(x)  # unused by the deepest layer, but present in every checkpoint
        x = ResidualConvUnit(self.features, self.dtype, name="residual_layer2")(x)
        x = bilinear_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)
        return _conv(self.features, 1, "projection", self.dtype)(x)


class Reassemble(nn.Module):
    """1x1 projection, then resampling by `factor`: transposed conv (> 1), identity (1) or strided 3x3 conv (< 1)."""

    features: int
    factor: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _conv(self.features, 1, "projection", self.dtype)(x)
        if self.factor > 1:
            return ConvTranspose(self.features, int(self.factor), self.dtype, name="resize")(x)
        if self.factor < 1:
            return _conv(self.features, 3, "resize", self.dtype, stride=round(1 / self.factor))(x)
        return x


class Neck(nn.Module):
    """DPT neck: reassemble each [B, h, w, D] map, 3x3 conv (no bias) to the fusion width, then fuse from the
    deepest map up, each fused map upsampled to the next map's size (the last one by 2); returns the fused maps,
    deepest first."""

    cfg: DepthAnythingConfig

    @nn.compact
    def __call__(self, maps: list[Array]) -> list[Array]:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.backbone.dtype)
        feats = []
        for i, (x, width, factor) in enumerate(zip(maps, cfg.neck_hidden_sizes, cfg.reassemble_factors)):
            x = Reassemble(width, factor, dtype, name=f"reassemble_{i}")(x)
            feats.append(_conv(cfg.fusion_hidden_size, 3, f"conv_{i}", dtype, bias=False)(x))
        feats = feats[::-1]
        fused, out = None, []
        for i, x in enumerate(feats):
            size = feats[i + 1].shape[1:3] if i + 1 < len(feats) else None
            layer = FusionLayer(cfg.fusion_hidden_size, dtype, name=f"fusion_{i}")
            fused = layer(x, None, size) if fused is None else layer(fused, x, size)
            out.append(fused)
        return out


class Head(nn.Module):
    """3x3 conv to half width, bilinear (align_corners=True) to the patch-grid resolution in pixels, 3x3 conv,
    ReLU, 1x1 conv to one channel; ReLU (relative) or sigmoid (metric), times max_depth."""

    cfg: DepthAnythingConfig

    @nn.compact
    def __call__(self, fused: list[Array], size: tuple[int, int]) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.backbone.dtype)
        x = _conv(cfg.fusion_hidden_size // 2, 3, "conv1", dtype)(fused[cfg.head_in_index])
        x = bilinear_resize(x, size, align_corners=True)
        x = nn.relu(_conv(cfg.head_hidden_size, 3, "conv2", dtype)(x))
        x = _conv(1, 1, "conv3", dtype)(x)[..., 0].astype(jnp.float32)
        x = nn.relu(x) if cfg.depth_estimation_type == "relative" else nn.sigmoid(x)
        return x * cfg.max_depth


class DepthAnything(nn.Module):
    """Depth Anything: normalised NHWC images [B, H, W, C] (H, W multiples of the patch size) -> depth
    [B, H, W] float32. The neck and head compute in the backbone's dtype."""

    cfg: DepthAnythingConfig

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> Array:
        cfg = self.cfg
        out = ViT(cfg.backbone, name="backbone")(images, train=train, return_layers=cfg.return_layers,
                                                 norm_layers=cfg.apply_layernorm)
        fused = Neck(cfg, name="neck")(out["feature_maps"])
        p = cfg.backbone.patch_size
        return Head(cfg, name="head")(fused, (images.shape[1] // p * p, images.shape[2] // p * p))


@functools.partial(jax.jit, static_argnums=0)
def depth(model: DepthAnything, params: dict, images: Array) -> Array:
    """Depth maps [B, H, W] (float32) of normalised NHWC images; see the module docstring for the input."""
    return model.apply({"params": params}, images)
