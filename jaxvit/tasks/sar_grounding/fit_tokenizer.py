"""A small stand-in for a released TerraMind tokenizer, fitted on the run's own tiles (the `:demo`, which cannot
download `TerraMind_Tokenizer_S2L2A.pt`): encoder + FSQ + diffusion decoder trained together to reconstruct
the tiles, so that codes carry the image and the stage-3 pixel terms have something to act on (a random
decoder's output barely depends on its codes).

Objective (the decoder predicts x0, as the released ones): x_t = sqrt(a_t) x + sqrt(1 - a_t) noise at a random
timestep t; loss = mean (decoder(x_t, t, codes(x)) - x)^2, with straight-through FSQ codes. The encoder's fixed
sin-cos grid is not trained.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvit.models.terramind.tokenizer import Tokenizer
from jaxvit.models.terramind.tokenizer.ddim import alphas_cumprod

log = logging.getLogger("jaxvit")


def fit(model: Tokenizer, params: dict, images: np.ndarray, steps: int, batch_size: int = 16, lr: float = 1e-3,
        seed: int = 0) -> tuple[dict, list[float]]:
    """(params after `steps` Adam steps on random batches of `images` [N, H, W, C] (standardised), the losses)."""
    acp = jnp.asarray(alphas_cumprod(model.cfg), jnp.float32)
    tx = optax.adam(lr)

    def loss_fn(p, x, key):
        codes, _ = model.apply({"params": p}, x, method=Tokenizer.encode)
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (x.shape[0],), 0, acp.shape[0])
        a = acp[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x + jnp.sqrt(1 - a) * jax.random.normal(k_n, x.shape)
        pred = model.apply({"params": p}, x_t, t.astype(jnp.float32), codes, method=Tokenizer.denoise)
        return jnp.mean((pred.astype(jnp.float32) - x) ** 2)

    @jax.jit
    def step(p, opt, x, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, key)
        grads = jax.tree_util.tree_map_with_path(
            lambda path, g: jnp.zeros_like(g) if "pos_emb" in jax.tree_util.keystr(path) else g, grads)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    rng, opt, losses = np.random.default_rng(seed), tx.init(params), []
    for i in range(steps):
        x = jnp.asarray(images[rng.integers(len(images), size=batch_size)])
        params, opt, loss = step(params, opt, x, jax.random.key(seed * 100003 + i))
        losses.append(float(loss))
        if i % max(steps // 5, 1) == 0 or i == steps - 1:
            log.info("fitting the demo tokenizer: step %d/%d, x0 MSE %.4f", i + 1, steps, losses[-1])
    return params, losses
