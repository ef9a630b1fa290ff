"""Per-model-family rules over "/"-joined variable paths: block index (layer-wise lr decay, freezing the first
N blocks) and tensor-parallel sharding. A new family (an encoder-decoder, a dense head) appends a `Family`
to `FAMILIES`; the optimizer, the freezing rules and the sharding code read only these tables.

Paths look like `params/backbone/encoder/layer_3/attention/query/kernel` or
`lora/backbone/encoder/layer_3/mlp/fc1/lora_b` (see `jaxvit.lora`).
"""
from __future__ import annotations

import dataclasses
import re

# Tensor-parallel layouts in logical axis names ("heads", "mlp"; jaxvit.sharding maps them to mesh axes):
# column-parallel layers split their output dim, row-parallel layers their input dim, Megatron style.
Layout = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    block: str  # regex whose group 1 is the block index
    embeddings: str  # regex of what comes before block 0 (index -1)
    final: str  # regex of what follows the last block (the final norm; decays like the last block)
    shard: tuple[tuple[str, Layout], ...] = ()  # (regex, layout): first match wins


def _column_row(column: str, row: str, axis: str) -> tuple[tuple[str, Layout], ...]:
    """Rules for a column-parallel group of Linears followed by a row-parallel one, with their LoRA factors
    (lora_b follows a column split, lora_a a row split)."""
    return ((column + r"/kernel$", (None, axis)), (column + r"/bias$", (axis,)),
            (column + r"/lora_b$", (None, axis)), (row + r"/(kernel|lora_a)$", (axis, None)))


VIT = Family(
    name="vit",
    block=r"/backbone/encoder/layer_(\d+)/",
    embeddings=r"/backbone/embeddings/",
    final=r"/backbone/layernorm/",
    shard=_column_row(r"/attention/(query|key|value)", r"/attention/dense", "heads")
    + _column_row(r"/mlp/(fc1|gate_proj|up_proj)", r"/mlp/(fc2|down_proj)", "mlp"),
)

FAMILIES: list[Family] = [VIT]


def layer_index(path: str) -> int | None:
    """Block index of a path; -1 for a family's embeddings; None for anything else (final norm, heads)."""
    for family in FAMILIES:
        m = re.search(family.block, path)
        if m:
            return int(m.group(1))
        if re.search(family.embeddings, path):
            return -1
    return None


def decay_index(path: str, depth: int) -> int | None:
    """Position of a path for layer-wise lr decay: its block, -1 for embeddings, the last block for the final
    norm; None (no decay) for everything else."""
    i = layer_index(path)
    if i is None and any(re.search(f.final, path) for f in FAMILIES):
        return depth - 1
    return i


def shard_rules() -> tuple[tuple[str, Layout], ...]:
    return tuple(rule for family in FAMILIES for rule in family.shard)
