"""`jit`: jax.jit plus the XLA options jaxvit's programs are compiled with.

On the CPU, XLA's YNNPACK fusions (on by default in recent jaxlib) turn attention's softmax and the two
batched matmuls around it into one library call that runs ~2x slower than XLA's own loops, and make the
LoRA step of a 4-block ViT-S/14 16% slower (benchmarks/RESULTS.md); jaxvit switches them off for its programs.
Other backends compile with XLA's defaults. In your own `jax.jit` pass
`compiler_options=jaxvit.xla_options.compiler_options()`, or set
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` before jax starts.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def compiler_options() -> dict[str, Any] | None:
    """CPU_OPTIONS on the CPU when this jaxlib knows them (checked by one tiny compile), else None."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(jnp.sin, compiler_options=CPU_OPTIONS).lower(jnp.zeros(2)).compile()
    except Exception as e:  # an older or newer jaxlib without the option: XLA's defaults
        log.warning("XLA options %s not accepted by this jaxlib (%s); using XLA's defaults", CPU_OPTIONS, e)
        return None
    return CPU_OPTIONS


def jit(fn: Callable, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)` compiled with `compiler_options()`."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
