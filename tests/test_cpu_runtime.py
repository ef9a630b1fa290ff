"""`xla_options.keep_cpu_heap`: applied only in a process whose jax backends have not started, and programs give
the same results with the heap kept. How many page faults it saves depends on the machine (kernel, glibc, THP):
`python -m jaxvit.benchmark --heap` measures that; these tests assert what cannot vary."""
import json
import math
import sys

import pytest

from jaxvit import benchmark


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_heap_benchmark_applies_in_a_fresh_process_and_results_are_unchanged(capsys):
    records = benchmark.main(["--heap"])
    assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()] == records
    (r,) = records
    default, kept = r["default"], r["kept"]
    assert r["impl"] == "heap" and r["temp_pages"] > 0
    assert not default["applied"] and kept["applied"]  # off with JAXVIT_KEEP_CPU_HEAP=0; on before jax starts
    assert default["out"] == kept["out"] == pytest.approx(2048 * math.tanh(1.0), rel=1e-5)
    assert set(default) == set(kept) == {"applied", "faults_per_run", "out"}  # the faults: reported, not judged


def test_keep_cpu_heap_refuses_after_backend_start(caplog, monkeypatch):
    import jax

    from jaxvit import xla_options
    monkeypatch.setenv("JAXVIT_KEEP_CPU_HEAP", "1")
    jax.devices()  # backends running: the dispatch mode can no longer change
    dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
    assert xla_options.keep_cpu_heap() is False
    assert "already running" in caplog.text
    assert jax.config.read("jax_cpu_enable_async_dispatch") == dispatch  # left alone
