"""`jit`: jax.jit plus the XLA options jaxvit's programs are compiled with.

On the CPU, XLA's YNNPACK fusions (on by default in recent jaxlib) turn attention's softmax and the two
batched matmuls around it into one library call that runs ~2x slower than XLA's own loops, and make the
LoRA step of a 4-block ViT-S/14 16% slower (benchmarks/RESULTS.md); jaxvit switches them off for its programs.
Other backends compile with XLA's defaults. In your own `jax.jit` pass
`compiler_options=jaxvit.xla_options.compiler_options()`, or set
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` before jax starts.

`keep_cpu_heap` (called by `jaxvit.main` and `jaxvit.benchmark` before jax starts its backends) makes the CPU
runtime reuse its temporary memory between steps instead of having the kernel map and zero it anew.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_cpu_heap() -> bool:
    """On the CPU backend with glibc: run single-device programs on the calling thread and keep freed heap mapped.

    XLA's CPU runtime mallocs every execution's temporaries in one block (1.97 GB for a ViT-S/14 LoRA step at
    batch 16) and frees it afterwards. By default glibc serves that with a fresh mmap from a worker thread's
    arena and the kernel zero-fills it page by page: ~500 k page faults and 1.3 s of system time per step.
    Here programs run inline (`jax_cpu_enable_async_dispatch=False`, so the block comes from the main arena),
    with no mmap for large blocks (M_MMAP_MAX=0) and no trimming (M_TRIM_THRESHOLD unlimited): the next step
    reuses the same pages, 17% faster LoRA and full steps (benchmarks/RESULTS.md). The process then keeps its
    peak heap mapped. Must run before jax starts its backends (the dispatch mode is fixed then); programs
    over several devices still run on XLA's threads. Off with JAXVIT_KEEP_CPU_HEAP=0. Returns whether applied.
    """
    from jax._src import xla_bridge

    if os.environ.get("JAXVIT_KEEP_CPU_HEAP", "1") == "0":
        return False
    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)  # private API: unknown = started
    if started():
        log.warning("keep_cpu_heap: jax's backends are already running, CPU temporaries stay per-step mmaps")
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if jax.default_backend() != "cpu":
        return False
    try:
        libc = ctypes.CDLL(None)
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: SIZE_MAX
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    log.info("CPU runtime: inline dispatch, heap kept between steps (%s)", "ok" if applied else "mallopt refused")
    return applied
