"""The biomass model: backbone + head (the Classifier's paths `backbone/`, `head/`) and the seed's metadata
priors, whose few parameters live under `head_extra/` and train with the head:

- species prior (`--use-species-prior`): the masses are blended with the predicted species' mean masses of the
  train split (a PlantHydra-style lookup), mass = (1 - g) * head + g * p(species) @ table, with a learned gate g;
- AOS hallucination (`--use-aos-hallucination`): an extra output predicts the (lighting-invariant) GreenSeeker
  NDVI from the photo and the masses get a learned linear term in it, so the sensor the test images lack is
  "hallucinated" and used;
- state density scaling (`--use-state-scaling`): the masses are multiplied by sum_s p(state s) * exp(a_s) with a
  learned log-density a_s per state, p from a State classification output (the test photos come without State).

All three start at (the species gate near) the identity: g = sigmoid(-4), zero coefficients, a = 0. Depth features, when a Depth
Anything V2 model is given, come from its map of the same (normalised) input under frozen params `depth/`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxvit.models.heads import Classifier

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


class BiomassModel(Classifier):
    """The Classifier (backbone -> pooled features -> head [B, K], K = the layout's columns), then the priors."""

    layout: Layout = ()
    species_table: tuple[tuple[float, ...], ...] = ()
    aos: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        head = super().__call__(images, train)
        return MetadataPriors(self.layout, self.species_table, self.aos, name="head_extra")(head)
