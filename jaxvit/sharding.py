"""One device mesh ("data", "fsdp", "tensor") and the rules that place the batch and the train state on it.

- batch: split over ("data", "fsdp"), replicated over "tensor". `train.batch_size` is the global batch.
- parameters, optimizer state, EMA: placed by leaf path (optax states mirror the parameter tree, so one
  function of (path, shape) covers them all):
  * tensor parallel (Megatron style), from each model family's rules (`jaxvit.models.rules`): for the ViT,
    query/key/value/fc1/gate_proj/up_proj split their output dim, attention dense/fc2/down_proj their input
    dim, over "tensor"; LoRA factors follow their layer (lora_b of a column-split layer, lora_a of a row one);
  * FSDP: on top of that, every leaf of at least `fsdp_min_size` elements is split over "fsdp" along its
    largest dimension that "tensor" left free and the fsdp size divides;
  * everything else (biases, norms, step, rng, small leaves) is replicated.
- activations: no explicit constraints; XLA's sharding propagation (Auto axes) carries the batch split and the
  kernels' tensor split through the step, e.g. attention runs head-parallel when num_heads % tensor == 0.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxvit.models import rules

AXES = ("data", "fsdp", "tensor")
# config.mesh defaults: data parallel over every device (-1: the devices left over); leaves with fewer than
# fsdp_min_size elements stay replicated under FSDP.
DEFAULT_MESH = dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2 ** 18)

# Logical axis name -> mesh axes (the per-path layouts are in jaxvit.models.rules).
LOGICAL_AXES: dict[str, Any] = {"batch": ("data", "fsdp"), "heads": "tensor", "mlp": "tensor"}


def mesh_shape(spec: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes from `config.mesh` (one axis may be -1: the devices left over)."""
    sizes = {a: int(spec[a]) for a in AXES}
    rest = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if bad or len(rest) > 1:
        raise ValueError(f"config.mesh={sizes}: sizes must be positive, with at most one -1 (the rest)")
    if rest:
        if n_devices % fixed:
            raise ValueError(f"config.mesh={sizes}: {n_devices} devices do not divide by {fixed}")
        sizes[rest[0]] = n_devices // fixed
    if math.prod(sizes.values()) > n_devices:
        raise ValueError(f"config.mesh={sizes} needs {math.prod(sizes.values())} devices; there are {n_devices}")
    return sizes


def make_mesh(spec: Mapping[str, int]) -> Mesh:
    """The mesh over all devices; a single process may use the first N of them (tests, benchmarks)."""
    sizes = mesh_shape(spec, jax.device_count())
    n = math.prod(sizes.values())
    if n < jax.device_count() and jax.process_count() > 1:
        raise ValueError(f"config.mesh={sizes} uses {n} of {jax.device_count()} devices; with several "
                         "processes the mesh must cover every device (use -1 for one axis)")
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=jax.devices()[:n])


def _mesh_axes(logical: str | None, mesh: Mesh) -> Any:
    """Mesh axes of a logical axis, dropping those of size 1 (so pure data parallel gives P())."""
    axes = LOGICAL_AXES.get(logical) if logical else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if mesh.shape.get(a, 1) > 1)
    return axes[0] if len(axes) == 1 else (axes or None)


def batch_spec(mesh: Mesh) -> P:
    """The batch dimension's split (also right for a 1-D ("data",) mesh)."""
    axes = _mesh_axes("batch", mesh)
    return P(axes) if axes else P()


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> P:
    """PartitionSpec of one parameter / optimizer-state leaf, from its "/"-joined path and its shape."""
    axes: list[Any] = [None] * len(shape)
    for pattern, logical in rules.shard_rules():
        if re.search(pattern, path) and len(logical) == len(shape):
            axes = [_mesh_axes(name, mesh) for name in logical]
            break
    for dim, ax in enumerate(axes):
        if ax is not None and shape[dim] % mesh.shape[ax]:
            raise ValueError(f"mesh.{ax}={mesh.shape[ax]} does not divide dim {dim} (size {shape[dim]}) of "
                             f"{path}; use a {ax} size that divides num_heads and mlp_hidden")
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        free = [d for d in range(len(shape)) if axes[d] is None and shape[d] % fsdp == 0]
        if free:
            axes[max(free, key=lambda d: shape[d])] = "fsdp"
    while axes and axes[-1] is None:  # canonical form: P("tensor"), not P("tensor", None)
        axes.pop()
    return P(*axes)


def path_str(path: tuple) -> str:
    """'trainable/params/backbone/.../kernel' for a jax key path (dict keys, sequence indices, attributes)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int = 2 ** 18) -> Any:
    """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs), by path and shape."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, leaf_spec(path_str(p), tuple(x.shape), mesh, fsdp_min_size)), tree)


def batch_shares(global_batch: int, mesh: Mesh, what: str = "train.batch_size", micro: int = 1) -> tuple[int, int]:
    """(per batch shard, per process) shares of a global batch split over the mesh's batch axes, or a clear error.

    The batch is split into data*fsdp shards; every process must own one contiguous block of whole shards
    (what the per-process grain pipelines produce), which fails only when "tensor" spans processes.
    """
    shards = math.prod(mesh.shape.get(a, 1) for a in LOGICAL_AXES["batch"])
    n_proc = jax.process_count()
    if global_batch % (shards * micro):
        hint = f" and {micro} micro-batches (train.grad_accum)" if micro > 1 else ""
        raise ValueError(f"{what}={global_batch} is the global batch and must divide evenly over the "
                         f"{shards} batch shards (mesh {dict(mesh.shape)}: data*fsdp)"
                         f"{hint}: use a multiple of {shards * micro}")
    sharding = NamedSharding(mesh, batch_spec(mesh))
    blocks: dict[int, set[tuple[int, int]]] = {}
    for dev, index in sharding.devices_indices_map((global_batch,)).items():
        blocks.setdefault(dev.process_index, set()).add(index[0].indices(global_batch)[:2])
    per_proc = global_batch // n_proc
    for proc, spans in blocks.items():
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        if (lo, hi) != (proc * per_proc, (proc + 1) * per_proc) or sum(e - s for s, e in spans) != hi - lo:
            raise ValueError(f"mesh {dict(mesh.shape)}: process {proc} would hold batch rows {sorted(spans)}, not "
                             f"one block of {per_proc}; keep mesh.tensor within one host "
                             f"(it must divide the {jax.local_device_count()} local devices)")
    return global_batch // shards, per_proc

