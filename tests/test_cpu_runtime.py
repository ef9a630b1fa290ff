"""`xla_options.keep_cpu_heap`: XLA's per-execution temporaries stop costing page faults (fresh processes, since
it changes process-wide malloc settings and must run before jax starts its backends)."""
import json
import math
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource
from jaxvit import xla_options
applied = xla_options.keep_cpu_heap()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)  # the [16384, 2048] product: a 128 MB temporary
x, w, v = jnp.ones((16384, 8)), jnp.ones((8, 2048)) / 8, jnp.ones((2048, 1))
for _ in range(10):  # the heap settles
    out = jax.block_until_ready(f(x, w, v))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    out = jax.block_until_ready(f(x, w, v))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps(dict(applied=applied, faults_per_run=faults, out=float(out[0, 0]))))
"""


def _probe(keep: str) -> dict:
    env = dict(os.environ, JAXVIT_KEEP_CPU_HEAP=keep, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_cpu_heap_reuses_temporaries():
    default, kept = _probe("0"), _probe("1")
    assert not default["applied"] and kept["applied"]
    assert default["out"] == kept["out"] == pytest.approx(2048 * math.tanh(1.0), rel=1e-5)
    pages = 16384 * 2048 * 4 / 4096
    assert default["faults_per_run"] > 0.5 * pages  # the temporary is mapped and zeroed anew each run
    assert kept["faults_per_run"] < 0.02 * pages  # ... and reused when the heap is kept


def test_keep_cpu_heap_refuses_after_backend_start(caplog):
    import jax

    from jaxvit import xla_options
    jax.devices()  # backends running: the dispatch mode can no longer change
    assert xla_options.keep_cpu_heap() is False
    assert "already running" in caplog.text
