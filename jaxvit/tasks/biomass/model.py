"""The biomass model: backbone + head (the Classifier's paths `backbone/`, `head/`) and the seed's metadata
priors, whose few parameters live under `head_extra/` and train with the head:

- species prior (`--use-species-prior`): the masses are blended with the predicted species' mean masses of the
  train split (a PlantHydra-style lookup), mass = (1 - g) * head + g * p(species) @ table, with a learned gate g;
- AOS hallucination (`--use-aos-hallucination`): an extra output predicts the (lighting-invariant) GreenSeeker
  NDVI from the photo and the masses get a learned linear term in it, so the sensor the test images lack is
  "hallucinated" and used;
- state density scaling (`--use-state-scaling`): the masses are multiplied by sum_s p(state s) * exp(a_s) with a
  learned log-density a_s per state, p from a State classification output (the test photos come without State).

All three start at (the species gate near) the identity: g = sigmoid(-4), zero coefficients, a = 0.

Depth (`--use-depth`, `--depth-attention`): a Depth Anything V2 model (frozen params `depth/`) maps the same photo
(re-normalised to ImageNet statistics, resized to a multiple of 14); its relative depth, min-max normalised per
image (larger = nearer the camera = taller vegetation in a top-down photo), adds to the pooled features
- depth features: the map's mean, std and 10/50/90 % quantiles;
- depth attention: the patch tokens averaged with weights softmax(beta x depth of the patch), beta learned from 0
  (uniform) under `head_depth/`, so tiles are weighted by vegetation height.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxvit.models.depth_anything import DepthAnything, DepthAnythingConfig, bilinear_resize
from jaxvit.models.heads import Classifier, Head, pool_features
from jaxvit.models.vit import ViT

Layout = tuple[tuple[str, int, int], ...]  # (name, start, stop) of the head's output columns


def columns(layout: Layout, name: str) -> slice:
    return next(slice(a, b) for n, a, b in layout if n == name)


class MetadataPriors(nn.Module):
    """Adjusts the mass columns [B, 5] (train-split std units) of the head output with the enabled priors."""

    layout: Layout
    species_table: tuple[tuple[float, ...], ...] = ()  # [species, 5] mean masses in std units; () = off
    aos: bool = False

    @nn.compact
    def __call__(self, out: jax.Array) -> jax.Array:
        out, names = jnp.asarray(out), {n for n, _, _ in self.layout}
        mass = columns(self.layout, "mass")
        masses = out[:, mass]
        if self.aos:
            coef = self.param("aos_coef", nn.initializers.zeros, (masses.shape[-1],))
            masses = masses + out[:, columns(self.layout, "aos")] * coef
        if self.species_table:
            gate = jax.nn.sigmoid(self.param("species_gate", nn.initializers.constant(-4.0), ()))
            prior = jax.nn.softmax(out[:, columns(self.layout, "species")]) @ jnp.asarray(self.species_table)
            masses = (1 - gate) * masses + gate * prior
        if "state" in names:
            cols = columns(self.layout, "state")
            log_density = self.param("state_log_density", nn.initializers.zeros, (cols.stop - cols.start,))
            masses = masses * (jax.nn.softmax(out[:, cols]) @ jnp.exp(log_density))[:, None]
        return out.at[:, mass].set(masses)


def depth_input(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], patch: int) -> jax.Array:
    """Photos normalised with (mean, std) -> ImageNet-normalised, resized (bilinear) to multiples of `patch`."""
    x = images.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return bilinear_resize(x, tuple(max(round(s / patch), 1) * patch for s in x.shape[1:3]), align_corners=False)


class DepthFeatures(nn.Module):
    """Depth map [B, H', W'] (any positive scale) + the backbone's patch tokens [B, T, D] on `grid` -> [B, F]."""

    statistics: bool = True
    attention: bool = True

    @nn.compact
    def __call__(self, depth: jax.Array, patch_tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
        low, high = depth.min((1, 2), keepdims=True), depth.max((1, 2), keepdims=True)
        d = (depth - low) / (high - low + 1e-6)
        out = []
        if self.statistics:
            flat = d.reshape(d.shape[0], -1)
            out += [flat.mean(-1, keepdims=True), flat.std(-1, keepdims=True),
                    jnp.quantile(flat, jnp.asarray([0.1, 0.5, 0.9]), axis=-1).T]
        if self.attention:
            k = 4  # the tiles' depth: box means of the map resampled to 4 x 4 points per tile
            up = bilinear_resize(d[..., None], (grid[0] * k, grid[1] * k), align_corners=False)
            tiles = up.reshape(d.shape[0], grid[0], k, grid[1], k).mean((2, 4)).reshape(d.shape[0], -1)
            beta = self.param("beta", nn.initializers.zeros, ())
            weights = jax.nn.softmax(beta * tiles, axis=-1)
            out.append(jnp.einsum("bt,btd->bd", weights, patch_tokens.astype(jnp.float32)))
        return jnp.concatenate(out, -1)


class BiomassModel(Classifier):
    """The Classifier (backbone -> pooled features [+ depth features] -> head [B, K], K = the layout's columns),
    then the metadata priors. With `depth`, a frozen Depth Anything model (params `depth/`) sees the photo."""

    layout: Layout = ()
    species_table: tuple[tuple[float, ...], ...] = ()
    aos: bool = False
    depth: DepthAnythingConfig | None = None
    depth_statistics: bool = True
    depth_attention: bool = True
    data_mean: tuple[float, ...] = IMAGENET_MEAN  # the photos' normalisation (undone for the depth model)
    data_std: tuple[float, ...] = IMAGENET_STD

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        out = ViT(self.backbone, name="backbone")(images, train=train)
        features = [pool_features(out, self.pool)]
        if self.depth is not None:
            x = depth_input(images, self.data_mean, self.data_std, self.depth.backbone.patch_size)
            d = jax.lax.stop_gradient(DepthAnything(self.depth, name="depth")(x))
            p = self.backbone.patch_size
            features.append(DepthFeatures(self.depth_statistics, self.depth_attention, name="head_depth")(
                d, out["patch_tokens"], (images.shape[1] // p, images.shape[2] // p)))
        head = Head(self.num_outputs, tuple(self.head_hidden), self.head_dropout, self.head_norm, self.head_act,
                    tuple(self.head_hidden_dropout), name="head")(
            jnp.concatenate([f.astype(jnp.float32) for f in features], -1), train)
        return MetadataPriors(self.layout, self.species_table, self.aos, name="head_extra")(head)
