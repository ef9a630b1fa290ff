"""DINOCell's model: a ViT backbone whose chosen blocks' patch-token grids (through the final norm) feed a U-Net
style decoder regressing a distance map at the input resolution.

Decoder (after DINOCell's `DINOv3UNetDecoder`): a lateral 1x1 conv per feature map, deepest first, to
channels[0], channels[1], ...; from the deepest, each up block is a stride-2 2x2 transposed conv to the next
width, concatenation with the next (shallower) lateral resized bilinearly to the new size, and two 3x3
conv-BN-ReLU blocks. The features all lie on the patch grid (stride p), so after len(layers) - 1 up blocks the
map is at stride p / 2^(len - 1); further transposed-conv + conv-BN-ReLU stages (halving the width) double it
until it reaches the input size or passes it (patch sizes that are not powers of two: then resized bilinearly
down to the input size); a 1x1 conv and a sigmoid give the map. DINOCell's code concatenates the skip and feeds
2 x width channels to a conv built for width (a bug); here the first conv takes both. BatchNorm statistics live
in the `batch_stats` collection (PyTorch's BatchNorm2d defaults: momentum 0.1, eps 1e-5).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvit.models.vit import ViT, ViTConfig

CHANNELS = (256, 128, 64, 32)  # DINOCell's decoder widths, deepest feature first
_KNOWN_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}  # DINOCell's choices (ViT-S/B, L, 7B)


def default_layers(depth: int) -> tuple[int, ...]:
    """Blocks whose outputs feed the decoder: DINOCell's for 12, 24 and 40 blocks, else the last block of each
    quarter of the depth (blocks repeat for depths below 4)."""
    return _KNOWN_LAYERS.get(depth, tuple(max(depth * (k + 1) // 4 - 1, 0) for k in range(4)))


class ConvBNReLU(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.relu(x)


def _upsample(features: int) -> nn.ConvTranspose:
    return nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")


class DistanceDecoder(nn.Module):
    """Feature maps [B, h, w, D_i] (shallow to deep, as the backbone returns them) -> map [B, H, W] in (0, 1)."""

    channels: tuple[int, ...] = CHANNELS
    out_size: tuple[int, int] = (224, 224)

    @nn.compact
    def __call__(self, features: list[jax.Array], train: bool = False) -> jax.Array:
        if len(features) != len(self.channels):
            raise ValueError(f"{len(features)} feature maps but {len(self.channels)} decoder widths")
        feats = [f.astype(jnp.float32) for f in features[::-1]]  # deepest first
        laterals = [nn.Conv(c, (1, 1), name=f"lateral_{i}")(f) for i, (c, f) in enumerate(zip(self.channels, feats))]
        x = laterals[0]
        for i, (width, skip) in enumerate(zip(self.channels[1:], laterals[1:])):
            x = _upsample(width)(x)
            skip = jax.image.resize(skip, (*x.shape[:3], skip.shape[3]), "bilinear")
            x = jnp.concatenate([x, skip], axis=-1)
            x = ConvBNReLU(width, name=f"up_{i}_conv1")(x, train)
            x = ConvBNReLU(width, name=f"up_{i}_conv2")(x, train)
        height, width = self.out_size
        scale = max(height / x.shape[1], width / x.shape[2])
        extra = math.ceil(math.log2(scale)) if scale > 1 else 0
        channels = self.channels[-1]
        for i in range(extra):
            channels = max(channels // 2, 8)
            x = _upsample(channels)(x)
            x = ConvBNReLU(channels, name=f"final_{i}_conv")(x, train)
        if x.shape[1:3] != (height, width):
            x = jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")
        return jax.nn.sigmoid(nn.Conv(1, (1, 1), name="out")(x)[..., 0])


class CellDistanceModel(nn.Module):
    """Backbone (params under `backbone/`) + decoder (under `head/`): normalised images [B, H, W, C] -> distance
    map [B, H, W] (float32, in (0, 1)). With a BatchNorm decoder, training applies need mutable=["batch_stats"]."""

    backbone: ViTConfig
    layers: tuple[int, ...]
    channels: tuple[int, ...] = CHANNELS
    norm_layers: bool = True  # the blocks' tokens through the backbone's final norm (DINOCell: norm=True)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        out = ViT(self.backbone, name="backbone")(images, train=train, return_layers=tuple(self.layers),
                                                  norm_layers=self.norm_layers)
        decoder = DistanceDecoder(tuple(self.channels), tuple(images.shape[1:3]), name="head")
        return decoder(out["feature_maps"], train)
