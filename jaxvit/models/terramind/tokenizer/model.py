"""TerraMind image tokenizer (terratorch `DiVAE`) in Flax: encode images to FSQ token ids, decode ids or soft
codes back to images through the diffusion decoder.

Images are NHWC and standardised as TerraMind standardises them before tokenising. Tokens are [B, h, w] int32
(h = H / 16), flattened row-major where TerraMind's sequence needs them. Parameter tree: `encoder`,
`quant_proj` (the 1x1 conv to the FSQ latent) and `decoder` (the patched UNet), as the torch modules.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from jaxvit.models.layers import Linear
from jaxvit.models.terramind.tokenizer import fsq
from jaxvit.models.terramind.tokenizer.config import TokenizerConfig
from jaxvit.models.terramind.tokenizer.ddim import ddim_sample
from jaxvit.models.terramind.tokenizer.encoder import TokenizerEncoder, sincos_grid
from jaxvit.models.terramind.tokenizer.unet import PatchedUNet

Array = jax.Array


class Tokenizer(nn.Module):
    cfg: TokenizerConfig

    def setup(self):
        self.encoder = TokenizerEncoder(self.cfg)
        self.quant_proj = Linear(self.cfg.latent_dim)
        self.decoder = PatchedUNet(self.cfg)

    def __call__(self, images: Array, noise: Array) -> Array:
        """One decoder pass at t = num_train_timesteps - 1 on the encoded codes (touches every parameter)."""
        codes, _ = self.encode(images)
        return self.denoise(noise, jnp.float32(self.cfg.num_train_timesteps - 1), codes)

    def latents(self, images: Array) -> Array:
        """Pre-quantisation latents [B, h, w, latent_dim] (float32)."""
        return self.quant_proj(self.encoder(images)).astype(jnp.float32)

    def encode(self, images: Array) -> tuple[Array, Array]:
        """(codes [B, h, w, latent_dim] in [0, 1], straight-through; token ids [B, h, w] int32)."""
        return fsq.quantize(self.latents(images), self.cfg.levels)

    def denoise(self, sample: Array, t: Array, codes: Array) -> Array:
        """The decoder network's output for noisy `sample` at timestep t, conditioned on `codes`."""
        return self.decoder(sample, t, codes)


def param_shapes(cfg: TokenizerConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (no computation)."""
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return jax.eval_shape(lambda x: Tokenizer(cfg).init(jax.random.key(0), x, x), images)["params"]


def init_params(cfg: TokenizerConfig, seed: int = 0) -> dict:
    """Random parameters for tests and synthetic runs (real use loads released weights, `load_tokenizer`):
    kernels N(0, 1/fan_in), biases 0, norm scales 1, the encoder's fixed sin-cos grid. Drawn in numpy: a Flax
    init of the UNet takes tens of seconds of XLA compilation on a CPU."""
    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], leaf) -> np.ndarray:
        if path[-1] == "pos_emb":
            return sincos_grid(*leaf.shape)
        if path[-1] == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return (rng.standard_normal(leaf.shape, np.float32) / math.sqrt(fan_in)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)

    flat = traverse_util.flatten_dict(param_shapes(cfg))
    return traverse_util.unflatten_dict({k: jnp.asarray(draw(k, v)) for k, v in flat.items()})


def encode_ids(model: Tokenizer, params: dict, images: Array) -> Array:
    """Token ids [B, h, w] of standardised images [B, H, W, C]."""
    return model.apply({"params": params}, images, method=Tokenizer.encode)[1]


def decode(model: Tokenizer, params: dict, codes: Array, noise: Array, timesteps: int = 50,
           spacing: str = "trailing", remat: bool = False) -> Array:
    """Images [B, H, W, C] from codes [B, h, w, latent_dim] by DDIM from `noise` [B, H, W, C] in `timesteps`
    denoising steps. Deterministic given the noise and differentiable w.r.t. codes (and params); `remat`
    recomputes each step in the backward pass instead of storing its activations."""
    cfg = model.cfg
    b, h, w, d = codes.shape
    if d != cfg.latent_dim or noise.shape[0] != b or noise.shape[-1] != cfg.channels:
        raise ValueError(f"codes {tuple(codes.shape)} / noise {tuple(noise.shape)}: expected codes "
                         f"[B, h, w, {cfg.latent_dim}] and noise [B, H, W, {cfg.channels}] with the same B")

    def denoise(x, t):
        return model.apply({"params": params}, x, t, codes, method=Tokenizer.denoise)

    return ddim_sample(denoise, noise, cfg, timesteps, spacing, remat)


def decode_ids(model: Tokenizer, params: dict, ids: Array, noise: Array, **kw) -> Array:
    """Images from token ids [B, h, w]; noise is [B, h * patch, w * patch, C]. See `decode`."""
    p = model.cfg.patch_size
    if noise.shape[1:3] != (ids.shape[1] * p, ids.shape[2] * p):
        raise ValueError(f"noise {tuple(noise.shape)} must be [B, {ids.shape[1] * p}, {ids.shape[2] * p}, C] for "
                         f"{ids.shape[1]}x{ids.shape[2]} tokens of patch {p}")
    return decode(model, params, fsq.ids_to_codes(ids, model.cfg.levels), noise, **kw)


def decode_probs(model: Tokenizer, params: dict, probs: Array, noise: Array, **kw) -> Array:
    """Images from a distribution over token ids [B, h, w, vocab] through the expected codes: the
    differentiable path from predicted token probabilities to pixels. See `decode`."""
    return decode(model, params, fsq.expected_codes(probs, model.cfg.levels), noise, **kw)
