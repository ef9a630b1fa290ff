"""Deterministic DDIM sampling (eta = 0) as TerraMind's tokenizers decode (terratorch `DDIMScheduler`).

Linear betas over `num_train_timesteps`, optionally rescaled to zero terminal SNR (Lin et al. 2023); inference
timesteps spaced "trailing" (default), "leading" or "linspace"; each step turns the model output into x0 and
epsilon, thresholds/clips x0, and moves to the previous timestep (alpha_prev = 1 after the last). The loop is a
`lax.scan`, differentiable w.r.t. everything the denoiser closes over (e.g. the conditioning codes).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.errors import ConfigError
from jaxvit.models.terramind.tokenizer.config import TokenizerConfig

Array = jax.Array


def alphas_cumprod(cfg: TokenizerConfig) -> np.ndarray:
    """Cumulative products of (1 - beta) [num_train_timesteps], float32 as upstream computes them."""
    betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=np.float32)
    if cfg.zero_terminal_snr:
        root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        bar = root ** 2
        betas = 1.0 - np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return np.cumprod(1.0 - betas, dtype=np.float32)


def inference_timesteps(cfg: TokenizerConfig, steps: int, spacing: str = "trailing") -> np.ndarray:
    """The timesteps visited, in order (upstream `set_timesteps`; trailing may give more than `steps` when
    steps does not divide num_train_timesteps, as upstream does)."""
    n = cfg.num_train_timesteps
    if not 1 <= steps <= n:
        raise ConfigError(f"timesteps={steps}: use 1 to {n} denoising steps")
    ratio = n // steps
    if spacing == "trailing":
        return np.arange(n, 0, -ratio).round().astype(np.int64) - 1
    if spacing == "leading":
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64)
    if spacing == "linspace":
        return np.linspace(n, 1, steps).round().astype(np.int64) - 1
    raise ConfigError(f"timestep spacing {spacing!r}: use trailing, leading or linspace")


def _threshold(x0: Array, cfg: TokenizerConfig) -> Array:
    if cfg.thresholding:  # Imagen's dynamic thresholding: s = clamp(quantile(|x0|), 1, sample_max_value)
        if cfg.sample_max_value <= 1.0:  # s is the constant sample_max_value (1.0 as released: a clip)
            s = cfg.sample_max_value
        else:
            flat = jnp.abs(x0.reshape(x0.shape[0], -1))
            s = jnp.clip(jnp.quantile(flat, cfg.dynamic_thresholding_ratio, axis=1), 1.0, cfg.sample_max_value)
            s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s
    if cfg.clip_sample:
        return jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


def ddim_step(cfg: TokenizerConfig, output: Array, sample: Array, a_t: Array, a_prev: Array) -> Array:
    """x_{t_prev} from the model output at x_t; a_t, a_prev are alphas_cumprod at t and the previous step."""
    b_t = 1.0 - a_t
    if cfg.prediction_type == "sample":
        x0 = output
        eps = (sample - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    elif cfg.prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(b_t) * output) / jnp.sqrt(a_t)
        eps = output
    else:  # v_prediction
        x0 = jnp.sqrt(a_t) * sample - jnp.sqrt(b_t) * output
        eps = jnp.sqrt(a_t) * output + jnp.sqrt(b_t) * sample
    x0 = _threshold(x0, cfg)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps


def ddim_sample(denoise: Callable[[Array, Array], Array], noise: Array, cfg: TokenizerConfig, steps: int,
                spacing: str = "trailing", remat: bool = False) -> Array:
    """Run the DDIM loop from `noise` [B, H, W, C]; denoise(x_t, t) returns the model output (float32 t)."""
    ts = inference_timesteps(cfg, steps, spacing)
    ac = alphas_cumprod(cfg)
    prev = ts - cfg.num_train_timesteps // steps
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
    per_step = (jnp.asarray(ts, jnp.float32), jnp.asarray(ac[ts]), jnp.asarray(a_prev))

    def body(x, step):
        t, a_t, a_p = step
        out = denoise(x, t).astype(jnp.float32)
        return ddim_step(cfg, out, x, a_t, a_p), None

    if remat:
        body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, noise.astype(jnp.float32), per_step)
    return x
