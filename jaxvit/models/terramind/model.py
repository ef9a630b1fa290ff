"""TerraMind v1 (IBM / ESA, terratorch `terramind.py`) in Flax: a 4M-style multimodal encoder-decoder.

The encoder reads the concatenated tokens of every input modality (token + position + modality embeddings);
the decoder reads, for each position of the target's token grid, the mask token + position + modality
embedding, attends to itself and (cross-attention) to `decoder_proj_context(encoder output) + input
embeddings`, and predicts the target's token ids with the tied token table. This is the forward of terratorch's
training and ROAR/MaskGIT generation steps for image-token targets. Dropped tokens (`input_masks`,
`target_mask`; True = dropped, as terratorch's input_mask / target_mask) are zeroed and excluded as attention
keys instead of gathered away, which gives the kept tokens the same outputs with static shapes.

Parameter paths mirror the checkpoint keys: `encoder/layer_3/attn/qkv`, `decoder/layer_3/cross_attn/kv`,
`encoder_embeddings/untok_sen1grd@224/proj`, `decoder_embeddings/tok_sen2l2a@224/token_emb`, `mod_emb/<key>`.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxvit.errors import ConfigError
from jaxvit.models.layers import Linear
from jaxvit.models.terramind.blocks import Decoder, Encoder, layer_norm
from jaxvit.models.terramind.config import IMAGE, SEQUENCE, TOKENS, ModalitySpec, TerraMindConfig, resolve
from jaxvit.models.terramind.embeddings import (Embeddings, ModalityEmbeddings, image_positions,
                                                sequence_positions)

Array = jax.Array


def _grid(cfg: TerraMindConfig, spec: ModalitySpec, name: str, value) -> tuple[int, int] | None:
    """The token grid of an input, after checking its shape; None for sequences."""
    shape, key = tuple(value.shape), name if name == spec.key else f"{name} ({spec.key})"
    if spec.kind == IMAGE:
        p = cfg.patch_size
        if len(shape) != 4 or shape[-1] != spec.size or shape[1] % p or shape[2] % p:
            raise ConfigError(f"input {key!r} has shape {shape}; expected [B, H, W, {spec.size}] (NHWC, "
                              f"{spec.size} bands) with H and W multiples of {p}")
        return shape[1] // p, shape[2] // p
    if spec.kind == TOKENS:
        if len(shape) != 3:
            raise ConfigError(f"input {key!r} has shape {shape}; expected token ids [B, h, w]")
        return shape[1], shape[2]
    if len(shape) != 2 or shape[1] > spec.max_length:
        raise ConfigError(f"input {key!r} has shape {shape}; expected token ids [B, L] with L <= {spec.max_length}")
    return None


def _dummy(cfg: TerraMindConfig, spec: ModalitySpec) -> np.ndarray:
    if spec.kind == IMAGE:
        return np.zeros((1, cfg.patch_size, cfg.patch_size, spec.size), np.float32)
    return np.zeros((1, 1, 1) if spec.kind == TOKENS else (1, 1), np.int32)


def _mask(mask, shape: tuple[int, int], what: str) -> Array | None:
    if mask is None:
        return None
    if tuple(mask.shape) != shape and mask.size != shape[0] * shape[1]:
        raise ConfigError(f"{what} has shape {tuple(mask.shape)}; expected {shape} (True = dropped)")
    return jnp.asarray(mask, bool).reshape(shape)


class TerraMind(nn.Module):
    """Call with `inputs` {modality: array} (images [B, H, W, C] float, normalised with the TerraMind statistics;
    token grids [B, h, w] int; sequences [B, L] int) and an image-token `target` ("S2L2A" = tok_sen2l2a@224).

    Returns a dict: encoder_output [B, N, D] (after encoder_norm, inputs concatenated in `inputs` order),
    encoder_keep [B, N]; with a target also decoder_output [B, h*w, D] and float32 logits [B, h*w, V] for every
    position of the target grid (`target_grid`, default: the grid of the first image-like input).
    Modality names: terratorch keys or short names (`jaxvit.models.terramind.config.resolve`).
    """

    cfg: TerraMindConfig

    @nn.compact
    def __call__(self, inputs: Mapping[str, Array], target: str | None = None, *,
                 input_masks: Mapping[str, Array] | None = None, target_mask: Array | None = None,
                 target_grid: tuple[int, int] | None = None, train: bool = False) -> dict[str, Array]:
        mod_emb = ModalityEmbeddings(self.cfg.dim, name="mod_emb")
        h, emb, keep, grid = self._encode(inputs, input_masks or {}, mod_emb, train)
        out = dict(encoder_output=h, encoder_keep=jnp.ones(h.shape[:2], bool) if keep is None else keep)
        if target is not None:
            out.update(self._decode(h, emb, keep, target, target_mask, target_grid or grid, mod_emb, train))
        return out

    def _encode(self, inputs, input_masks, mod_emb, train: bool):
        """(encoder output after encoder_norm, input embeddings, kept tokens or None, grid of the first
        image-like input or None)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if not inputs:
            raise ConfigError("TerraMind needs at least one input modality")
        embed = Embeddings(cfg, "encoder", name="encoder_embeddings")
        masks = {resolve(k, "encoder"): v for k, v in input_masks.items()}
        xs, embs, drops, grid = [], [], [], None
        for name, value in inputs.items():
            key = resolve(name, "encoder")
            spec = cfg.spec(key, "encoder")
            g = _grid(cfg, spec, name, value)
            x = embed(key, value)
            drop = _mask(masks.pop(key, None), x.shape[:2], f"input_masks[{name!r}]")
            if spec.kind == SEQUENCE:
                pos = sequence_positions(cfg.dim, x.shape[1], drop)
            else:
                grid = grid or g
                pos = jnp.asarray(image_positions(cfg.dim, cfg.grid, g))[None]
            xs.append(x)
            embs.append(jnp.broadcast_to(pos.astype(dtype) + mod_emb(key).astype(dtype), x.shape))
            drops.append(drop)
        if masks:
            raise ConfigError(f"input_masks for modalities that are not inputs: {sorted(masks)}")
        if self.is_initializing():  # create the embeddings of every modality, not only those of the example
            for spec in cfg.encoder_modalities:
                embed(spec.key, _dummy(cfg, spec))
                mod_emb(spec.key)
        x, emb, keep = jnp.concatenate(xs, axis=1).astype(dtype), jnp.concatenate(embs, axis=1), None
        if any(d is not None for d in drops):  # without masks nothing is dropped and attention is unmasked
            drop = jnp.concatenate([jnp.zeros(xi.shape[:2], bool) if d is None else d for xi, d in zip(xs, drops)], 1)
            x, emb, keep = jnp.where(drop[..., None], 0, x), jnp.where(drop[..., None], 0, emb), ~drop
        h = layer_norm(cfg, "encoder_norm")(Encoder(cfg, not train, name="encoder")(x + emb, keep))
        return h, emb, keep, grid

    def _decode(self, h, emb, keep, target: str, target_mask, grid, mod_emb, train: bool) -> dict[str, Array]:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        key = resolve(target, "decoder")
        spec = cfg.spec(key, "decoder")
        if spec.kind != TOKENS:
            raise ConfigError(f"target {target!r} is a {spec.kind} modality; only image-token targets are "
                              "supported (sequences are decoded autoregressively, which jaxvit does not implement)")
        if grid is None:
            raise ConfigError("pass target_grid=(h, w): no image-like input gives the target's token grid")
        b, m = h.shape[0], grid[0] * grid[1]
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, cfg.dim))
        pos = jnp.asarray(image_positions(cfg.dim, cfg.grid, tuple(grid)))[None]
        y = jnp.broadcast_to((mask_token + mod_emb(key)).astype(dtype) + pos.astype(dtype), (b, m, cfg.dim))
        drop = _mask(target_mask, (b, m), "target_mask")
        if drop is not None:
            y = jnp.where(drop[..., None], 0, y)
        context = Linear(cfg.dim, True, dtype, cfg.lora_alpha, cfg.lora_dropout, not train,
                         name="decoder_proj_context")(h) + emb
        y = Decoder(cfg, not train, name="decoder")(y, context, None if drop is None else ~drop, keep)
        y = layer_norm(cfg, "decoder_norm")(y)
        embed = Embeddings(cfg, "decoder", name="decoder_embeddings")
        if self.is_initializing():
            for s in cfg.decoder_modalities:
                embed(s.key, y[:, :1])
                mod_emb(s.key)
        return dict(decoder_output=y, logits=embed(key, y))


def param_shapes(cfg: TerraMindConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of every parameter of `cfg` (traced, nothing computed)."""
    source = cfg.encoder_modalities[0]
    target = next((s.key for s in cfg.decoder_modalities if s.kind == TOKENS), None)
    if target is None:
        raise ConfigError("the config has no image-token decoder modality")
    shapes = jax.eval_shape(lambda: TerraMind(cfg).init(jax.random.key(0), {source.key: _dummy(cfg, source)},
                                                        target, target_grid=(1, 1))["params"])
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def init_params(cfg: TerraMindConfig, seed: int = 0) -> dict:
    """Random float32 parameters of every module and modality of `cfg`, initialised as terratorch does
    (xavier-uniform Linears, qkv / kv per part; N(0, 0.02) embeddings and mask token; unit norms, zero biases).
    Drawn with numpy: no XLA compilation."""
    rng, flat = np.random.default_rng(seed), {}
    for path, shape in param_shapes(cfg).items():
        if path[-1] == "scale":
            flat[path] = np.ones(shape, np.float32)
        elif path[-1] == "bias":
            flat[path] = np.zeros(shape, np.float32)
        elif path[-1] == "kernel":
            fan_out = shape[1] // {"qkv": 3, "kv": 2}.get(path[-2], 1)
            bound = (6.0 / (shape[0] + fan_out)) ** 0.5
            flat[path] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            flat[path] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
