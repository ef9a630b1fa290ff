"""Smoke tests of `python -m jaxvit.benchmark` (tiny model, in-process) and of its FLOP formula; the PyTorch
peer is in the slow tier. `--heap` is exercised by test_cpu_runtime."""
import json

import pytest

from jaxvit import benchmark
from jaxvit.models import get_config

TINY = ["--override=hidden_size=32,depth=2,num_heads=2,mlp_hidden=128", "--res=28", "--batch=2", "--steps=2",
        "--warmup=0"]
KEYS = {"impl", "arch", "mode", "dtype", "batch", "res", "img_per_s", "step_ms", "compile_s", "tflops", "mfu",
        "flops_convention", "device", "date", "params", "trainable_params"}


# Published forward GFLOPs per 224 px image; the L/16 figure is for a ViT-L/16 without registers.
@pytest.mark.parametrize("arch, overrides, gflops", [
    ("dinov2_vits14", {}, 12.2), ("dinov2_vitb14", {}, 46.3), ("dinov2_vitl14", {}, 162),
    ("dinov2_vitg14", {}, 599), ("dinov3_vitl16", {"num_registers": 0}, 123)])
def test_forward_flops_match_published(arch, overrides, gflops):
    cfg = get_config(arch, **overrides)
    assert benchmark.forward_flops(cfg, 224) / 1e9 == pytest.approx(gflops, rel=5e-3)


@pytest.fixture(autouse=True)
def _no_process_wide_heap_settings(monkeypatch):
    """The benchmark calls xla_options.keep_cpu_heap, which would switch this pytest process (and so every later
    test) to inline dispatch and a kept heap whenever it happens to start jax first."""
    monkeypatch.setenv("JAXVIT_KEEP_CPU_HEAP", "0")


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


@pytest.mark.slow
def test_cli_lora_with_torch_peer(capsys):
    pytest.importorskip("peft")
    records = benchmark.main(TINY + ["--mode=lora", "--peer", "--rounds=1"])
    assert _lines(capsys) == records and [r["impl"] for r in records] == ["jax", "torch", "ratio"]
    jx, pt, ratio = records
    for r in (jx, pt):
        assert KEYS <= r.keys() and r["mode"] == "lora" and r["batch"] == 2
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0 and r["compile_s"] > 0
        assert (r.get("peak_rss_bytes") or r.get("peak_mem_bytes")) > 0
    # Same model on both sides: identical parameter and LoRA-trainable counts.
    assert (jx["params"], jx["trainable_params"]) == (pt["params"], pt["trainable_params"])
    assert 0 < jx["trainable_params"] < jx["params"]
    assert ratio["speedup_vs_torch"] == pytest.approx(jx["img_per_s"] / pt["img_per_s"], rel=1e-2)


@pytest.mark.integration
def test_cli_infer_bfloat16(capsys):
    (r,) = benchmark.main(TINY + ["--mode=infer", "--dtype=bfloat16", "--peak_tflops=1.0"])
    assert _lines(capsys) == [r]
    assert KEYS <= r.keys() and r["impl"] == "jax" and r["dtype"] == "bfloat16" and r["trainable_params"] == 0
    assert r["mfu"] == pytest.approx(r["tflops"], rel=1e-2)


@pytest.mark.integration
def test_cli_matrix_and_markdown_table(capsys):
    records = benchmark.main(TINY + ["--mode=infer,lora", "--markdown"])
    out = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line) for line in out[:2]] == records
    assert [r["mode"] for r in records] == ["infer", "lora"]
    for r in records:  # achieved FLOP/s against the matmul peak measured in the same run
        assert r["matmul_peak_tflops"] > 0 and r["mfu_measured"] == pytest.approx(
            r["tflops"] / r["matmul_peak_tflops"], rel=1e-2)
    table = out[2:]
    assert table[0].startswith("| arch | mode |") and len(table) == 2 + len(records)
    assert all(f"| {r['mode']} | float32 | 2 | {r['img_per_s']} |" in row for r, row in zip(records, table[2:]))


@pytest.mark.integration
def test_cli_data_pipeline_on_a_given_folder(gz2_dir, capsys):
    (r,) = benchmark.main(["--data", f"--data_dir={gz2_dir}", "--data_workers=0", "--batch=4", "--steps=2",
                           "--res=16"])
    assert _lines(capsys) == [r]
    assert r["impl"] == "grain" and r["mode"] == "data" and r["batch"] == 4 and r["num_workers"] == 0
    assert r["source_images"] == 5 * 8 and r["source_px"] is None  # the folder's train split, not a synthetic set
    assert r["step_ms"] == pytest.approx(4 / r["img_per_s"] * 1e3, rel=1e-2)


def test_cli_rejects_unknown_mode():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--mode=lora,train"])


SSL_TINY = ["--mode=ssl", "--override=hidden_size=32,depth=2,num_heads=2,mlp_hidden=128", "--ssl_patch=8",
            "--global_size=32", "--local_size=16", "--n_local=2", "--prototypes=64", "--head_hidden=48",
            "--head_bottleneck=16", "--batch=4", "--steps=2", "--warmup=0"]


@pytest.mark.parametrize("nlayers, weight_norm", [(3, False), (2, True), (1, False)])
def test_head_flops_are_twice_the_head_kernels(nlayers, weight_norm):
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from jaxvit.tasks.ssl.model import DINOHead, HeadConfig
    head = HeadConfig(64, 48, 16, nlayers, weight_norm)
    params = DINOHead(head).init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
    kernels = [v.size for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel"]
    assert benchmark.head_flops(head, 32) == 2 * sum(kernels)  # one token: 2 * in * out per Linear


@pytest.mark.integration
def test_cli_ssl_step(capsys):
    (r,) = benchmark.main(SSL_TINY)
    assert _lines(capsys) == [r]
    assert KEYS <= r.keys() and r["impl"] == "jax" and r["mode"] == "ssl" and r["batch"] == 4
    assert r["crops"] == {"global": 32, "local": 16, "n_local": 2} and r["prototypes"] == 64
    assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["tflops"] > 0 and r["compile_s"] > 0
    assert r["patch_size"] == 8 and r["params"] == r["trainable_params"] > 0  # the student (heads included)
    # By hand. Backbone forward at 32 px (16 patches + CLS = 17 tokens) and 16 px (4 + 1 = 5), width 32, MLP 128:
    # patch embedding 2*patches*(8*8*3)*32, per block q/k/v/o 8*n*32^2, QK^T and AV 4*n^2*32, MLP 4*n*32*128.
    fwd = lambda patches, n: 2 * patches * 192 * 32 + 2 * (8 * n * 32 ** 2 + 4 * n * n * 32 + 4 * n * 32 * 128)
    head = 2 * (32 * 48 + 48 * 48 + 48 * 16 + 16 * 64)  # one token through a DINO / iBOT head
    masked = int(16 * 0.2) + int(16 * 0.3) + int(16 * 0.4) + int(16 * 0.5)  # 4 of 8 global crops masked
    assert r["masked_tokens"] == masked
    student = 2 * fwd(16, 17) + 2 * fwd(4, 5) + 4 * head + masked / 4 * head
    teacher = 2 * fwd(16, 17) + 2 * head + masked / 4 * head
    assert r["gflops_per_img_step"] * 1e9 == pytest.approx(3 * student + teacher, rel=1e-3)
    assert r["tflops"] == pytest.approx(r["gflops_per_img_step"] * 1e-3 * r["img_per_s"], rel=1e-2)


def test_cli_ssl_has_no_peer():
    with pytest.raises(SystemExit):
        benchmark.parse_args(SSL_TINY + ["--peer"])


@pytest.mark.integration
def test_cli_ssl_from_a_config(capsys):
    """--config: the recipe's arch, patch, crops, heads (here its CPU demo variant), batch from --batch."""
    (r,) = benchmark.main(["--mode=ssl", "--config=configs/jump_ssl.py:demo", "--batch=2", "--steps=1",
                           "--warmup=0"])
    assert r["batch"] == 2 and r["dtype"] == "float32" and r["arch"] == "dinov3_vits16"
    assert r["crops"] == {"global": 64, "local": 32, "n_local": 4} and r["prototypes"] == 1024
    assert r["patch_size"] == 8 and r["img_per_s"] > 0


def test_render_lists_every_table_and_what_did_not_finish(tmp_path, capsys):
    benchmark.main(TINY + ["--mode=infer"])
    log = tmp_path / "run.jsonl"
    log.write_text(capsys.readouterr().out + '{"impl": "failed", "item": "ViT-L/14 full", "reason": "over its '
                                             '55 s cap"}\n')
    benchmark.main([f"--render={log}"])
    text = capsys.readouterr().out
    assert "| dinov2_vits14[" in text and "| infer | float32 | 2 |" in text
    assert "- ViT-L/14 full: failed (over its 55 s cap)" in text


@pytest.mark.slow
def test_plan_matches_the_measured_cpu_step_memory():
    """--plan --measure in a fresh process (default heap: the step's temporaries are a fresh mapping): the memory
    XLA plans for one step (temporaries + outputs not aliased to the donated state) is within 20% of the peak growth of
    the process's anonymous resident memory over one execution; a small ViT at 224 px, batch 8 (~50 MB)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAXVIT_KEEP_CPU_HEAP="0", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    small = [f"--config.model.overrides.{k}" for k in ("hidden_size=64", "depth=2", "num_heads=2", "mlp_hidden=256")]
    proc = subprocess.run([sys.executable, "-m", "jaxvit.benchmark", "--plan", "--measure", "--batch_size=8",
                           "--config=configs/gz2_full.py:lr01", *small], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["remat"] for r in recs] == ["none", "full"]
    for r in recs:
        assert r["step_bytes"] > 20e6, r  # well above the RSS noise (page tables, Python objects)
        assert 0.8 < r["measured_step_bytes"] / r["step_bytes"] < 1.2, r


@pytest.mark.slow
def test_save_stall_times_steps_around_saves():
    """--save_stall: a real training run (Trainer, orbax, a GZ2 folder) with a save every 3 steps; every step timed,
    every save's blocking time recorded and its checkpoint written."""
    tiny = [f"--config.model.overrides.{k}" for k in ("depth=2", "hidden_size=32", "num_heads=2", "mlp_hidden=64")]
    recs = benchmark.main(["--save_stall", *tiny, "--image_size=28", "--batch_size=2", "--steps=7", "--save_every=3"])
    (r,) = recs
    assert [row["step"] for row in r["steps"]] == [1, 2, 3, 4, 5, 6, 7]
    assert [row["step"] for row in r["steps"] if row["save_ms"] is not None] == [3, 6, 7]  # 7: the final one
    assert all(row["iteration_ms"] >= row["step_ms"] > 0 for row in r["steps"][:-1])
    assert r["median_save_ms"] > 0 and r["plain_iteration_ms"] > 0 and r["checkpoint_bytes"] > 0
    assert r["final_write_ms"] >= r["steps"][-1]["save_ms"]


@pytest.mark.slow
def test_gpu_script_smoke(tmp_path):
    """benchmarks/gpu.sh --smoke: every item of the GPU run on the CPU at toy sizes, one table row each."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--smoke"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=3700)  # gpu.sh --smoke: a 3600 s budget
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "gpu_run.md").read_text()
    assert "Not measured" not in table, table
    for arch in ("vits14", "vitb14", "vitl14"):
        for mode in ("lora", "full", "infer"):
            assert f"| dinov2_{arch}[" in table and f"| {mode} | bfloat16 | 2 |" in table
    assert table.count("| bfloat16 | 2 |") == 9  # one row per arch x mode, with the torch peer's columns
    assert "| dinov2_vits14 | 8 |" in table and "| dinov3_vits16 | 8 |" in table  # the two SSL recipes (demos: patch 8)
    for config in ("jump_ssl", "dinocell", "biomass", "gz2_lora", "terramind_stage3", "cifar10_dinov2", "gz2_ssl",
                   "gz2_full"):  # each workload's input pipeline, in-process and with 2 workers
        assert table.count(f"| {config} |") == 2, config


@pytest.mark.slow
def test_cli_data_of_a_workload_config(capsys):
    """--data --config: the CIFAR-10 workload's transform on 32 px images; demand by the benchmark's formula."""
    recs = benchmark.main(["--data", "--config=configs/cifar10_dinov2.py", "--data_workers=0,2", "--batch=4",
                           "--steps=2"])
    assert [r["num_workers"] for r in recs] == [0, 2] and all(r["config"] == "cifar10_dinov2" for r in recs)
    r = recs[0]
    # ViT-B/14 full fine-tuning at 224 px: 3 x 46.3 GFLOPs per example; 989.4 TFLOP/s x 45% / that / 16 cores
    assert r["gflops_per_example"] == pytest.approx(3 * 46.3, rel=0.01)
    assert r["demand_per_core"] == pytest.approx(989.4e12 * 0.45 / (r["gflops_per_example"] * 1e9) / 16, rel=1e-3)
    assert r["headroom"] == pytest.approx(r["per_core_img_per_s"] * 16 / r["demand_img_per_s"], rel=1e-2)
    assert recs[1]["per_core_img_per_s"] == pytest.approx(recs[1]["img_per_s"] / 2, rel=1e-2)


@pytest.mark.slow
def test_cli_plan_compiles_without_running(capsys):
    """--plan: XLA's memory analysis of the compiled step at the batch and twice it, with and without remat."""
    recs = benchmark.main(["--plan", "--config=configs/gz2_lora.py:demo", "--batch=2"])
    assert [r["remat"] for r in recs] == ["none", "full"]
    for r in recs:
        assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
        assert r["argument_bytes"] >= r["params_bytes"] + r["opt_state_bytes"] > 0 and r["per_example_bytes"] > 0
        fits = r["max_batch"]
        assert 0 < fits["A100 40GB"] < fits["H100 80GB"] < fits["H200 141GB"]
