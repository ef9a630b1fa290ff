"""Sharded inference over a data source, shared by evaluation, prediction, probing and robustness.

Batches are split over the mesh's batch axes; every process reads its slice (`pipeline.eval_iterator`) and
takes part in every step, and each example is counted exactly once. `batches` yields each global batch's
outputs (for tasks that reduce metrics per batch, e.g. dense maps); `map_source` gathers them all.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxvit import sharding, xla_options
from jaxvit.data import pipeline

_jit = functools.lru_cache(maxsize=32)(xla_options.jit)  # the same fn object reuses its compiled program


def mesh_config(cfg=None) -> Any:
    """A config's `mesh` section, or the default one (data parallel over every device)."""
    return cfg.mesh if cfg is not None and "mesh" in cfg else ml_collections.ConfigDict(sharding.DEFAULT_MESH)


def run_mesh(cfg=None) -> Mesh:
    """The device mesh of a config's `mesh` section (the train loop's layout); default: data parallel over all."""
    return sharding.make_mesh(mesh_config(cfg))


def place(variables: Any, mesh: Mesh, cfg=None) -> Any:
    """Variables laid out on `mesh` as the train loop lays them out (FSDP / tensor parallel from `cfg.mesh`)."""
    return jax.device_put(variables, sharding.state_shardings(variables, mesh, mesh_config(cfg).fsdp_min_size))


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count >= batch_size (so the batch splits evenly)."""
    return -(-batch_size // mesh.size) * mesh.size


def batches(fn: Callable, variables: Any, source: Any, transform: Callable, data_cfg: Any, batch_size: int,
            mesh: Mesh) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(outputs, index, mask) of each global batch as numpy on every process: `fn(variables, batch)` gives
    per-example outputs (any pytree) of a dict of fields; index is each row's example index (-1 padding), mask
    False for padding and unreadable examples. `variables` keep the placement they have (see `place`)."""
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(mesh))
    apply = _jit(fn)
    for local in pipeline.eval_iterator(source, transform, data_cfg, global_batch=batch_size):
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        out = jax.tree_util.tree_map(lambda y: multihost_utils.process_allgather(y, tiled=True),
                                     apply(variables, batch))
        index, mask = (multihost_utils.process_allgather(local[k], tiled=True) for k in ("index", "mask"))
        yield out, index, mask


def map_source(fn: Callable, variables: Any, source: Any, transform: Callable, data_cfg: Any, batch_size: int,
               mesh: Mesh) -> tuple[Any, np.ndarray]:
    """(outputs [N, ...] in dataset order, readable mask [N]) of `fn` over every example of `source`."""
    out, ok = None, np.zeros(len(source), bool)
    for y, index, mask in batches(fn, variables, source, transform, data_cfg, batch_size, mesh):
        if out is None:
            out = jax.tree_util.tree_map(lambda a: np.zeros((len(source), *a.shape[1:]), a.dtype), y)
        jax.tree_util.tree_map(lambda o, a: o.__setitem__(index[mask], a[mask]), out, y)
        ok[index[mask]] = True
    return out, ok
