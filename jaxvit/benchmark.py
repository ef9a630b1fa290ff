"""Throughput benchmark: jaxvit train/inference steps on synthetic batches, optionally against a PyTorch
peer (transformers + PEFT, random weights), or the grain input pipeline alone.

    python -m jaxvit.benchmark --arch=dinov2_vits14 --batch=16 --mode=lora [--dtype=bfloat16] [--peer]
    python -m jaxvit.benchmark --mode=infer --batch=32 --peer
    python -m jaxvit.benchmark --arch=dinov2_vits14,dinov2_vitb14 --mode=lora,full,infer --peer --markdown
    python -m jaxvit.benchmark --data [--data_dir=DIR]          # grain pipeline images/s
    python -m jaxvit.benchmark --heap                           # page faults with/without keep_cpu_heap
    python -m jaxvit.benchmark --override=hidden_size=64,depth=2,num_heads=2,mlp_hidden=256 ...
    python -m jaxvit.benchmark --mode=ssl --arch=dinov3_vits16 --ssl_patch=8 --batch=48 --dtype=bfloat16
    python -m jaxvit.benchmark --plan --config=configs/gz2_full.py [--measure]   # memory plan (vs measured)
    python -m jaxvit.benchmark --save_stall --arch=dinov2_vitb14 --image_size=112 --batch=8 --steps=25 --save_every=5

Prints one JSON line per measured implementation ("impl": "jax" / "torch" / "grain" / "heap") and, with --peer,
a {"impl": "ratio", "speedup_vs_torch": jax img/s / torch img/s} line, for each arch x mode of the
comma-separated --arch and --mode lists; --markdown ends with a table of them all (benchmarks/RESULTS.md).

Timing. lora/full: the jitted, state-donating train step of `jaxvit.train` (5 classes); infer: a jitted
backbone + head forward. `compile_s` is the first call (trace, lower, compile, run; for torch the first
eager step), then `--warmup` untimed steps, then `--rounds` rounds of `--steps` steps, each timed as wall
time with one block at the end, as in the train loop (on the CPU, programs run inline and reuse their
temporaries: `xla_options.keep_cpu_heap`); jax and torch rounds alternate
so machine noise hits both alike, and the best round is reported: step_ms = round wall / steps.
The torch peer runs in a spawned process (its own memory and threads; jax is never imported there);
with --peer, jax does not preallocate GPU memory. jaxvit runs on one device (jax.devices()[0]).

Memory: `peak_mem_bytes` on accelerators (jax memory_stats peak_bytes_in_use; torch
max_memory_allocated), else `peak_rss_bytes` (the process's peak RSS, /proc VmHWM).
`--override` sets ViTConfig fields, e.g. a tiny model or `attn_impl=cudnn`.

`--plan --config=C`: the config's train step compiled (not run) at its batch and twice it, with and without remat;
per device: XLA's memory analysis (arguments = the state + the batch, temporaries, outputs not aliased to the
donated state: `step_bytes`) and the largest global batch that fits each device of DEVICE_GIB with 10% free.
`--measure` also runs the step (twice, the second measured) on a real state: `measured_step_bytes` is the peak
growth of the process's anonymous resident memory on the CPU (`measure_step_memory`; run it in a fresh process
without `keep_cpu_heap`: JAXVIT_KEEP_CPU_HEAP=0), the allocator's peak over what was in use on accelerators.

`--save_stall`: a real `jaxvit.train` run (random weights, every block trained, a synthetic GZ2 folder) with a
resume point every --save_every steps (async orbax): each step's time, each loop iteration's and the save call's
blocking time; `save_cost_over_step` = the median extra wall time of a save's iteration and the iterations up to
the next save (the background write shares the cores) over the median plain iteration; `final_write_ms` = the
last save's call and the wait for its completion at the end of the run (nothing else running), i.e. what a
synchronous save would block.

`--heap`: minor page faults per execution of a CPU program with a 128 MB temporary, in two fresh processes
(default malloc settings, then `xla_options.keep_cpu_heap`): the temporary is mapped and zero-filled anew
each run (~`temp_pages` faults) unless the heap is kept. Machine dependent, hence a benchmark, not a test.

`matmul_peak_tflops`: the best of a few large square matmuls in jax (8192 on accelerators, 2048 on
the CPU) in the benchmarked dtype, measured once per run; `mfu_measured` = tflops / that peak, and `mfu`
= tflops / the datasheet peak (PEAK_TFLOPS, GPUs only, or --peak_tflops).

FLOPs (`flops_convention`): 2 * MACs of the matmuls only (patch embedding, q/k/v/output projections,
QK^T and attention-weighted sum, MLP or SwiGLU, head), at the benchmarked resolution with CLS + register
tokens; norms, softmax, activations and LoRA adapters are not counted. This reproduces the published
forward GFLOPs per 224 px image: S/14 12.2, B/14 46.3, L/14 162, g/14 599, L/16 123 (no registers).
Training = 3x forward (full: input and weight gradients), 2x forward (LoRA: input gradients only).

`--mode=ssl`: the full DINO + iBOT + KoLeo step of the `ssl` task (`jaxvit.tasks.ssl`), built through the task
with the official optimizer (`dino_optimizer`) on synthetic multi-crop batches: per example 2 global crops
(`--global_size`, with iBOT masks from the task's `MaskBatch`) and `--n_local` local crops (`--local_size`);
`--prototypes` K for both heads (`--head_hidden`, `--head_bottleneck` their MLP widths), `--ssl_patch` the
student's patch size (0: the arch's). `--res` is not used by it; an "image" is one example (2 + n_local crops).
FLOPs per example (same matmul-only convention; `ssl_flops`): student 3x forward (forward + backward) of the
backbone on the 2 global crops (masking does not change the cost) and the n_local local crops, each at its
resolution (`forward_flops`), of the DINO head (MLP + prototypes, `head_flops`) on the 2 + n_local [CLS] tokens
and of the iBOT head on the masked patch tokens; teacher 1x forward of the backbone on the 2 global crops, its
DINO head on their 2 [CLS] and its iBOT head on the masked tokens. Masked tokens: the static bound of the
step's gather (`MaskBatch.max_masked(batch)`, capped as in `SSL.loss`) / batch, i.e. what the step computes,
not how many patches happen to be masked. Not counted: the EMA update, Sinkhorn-Knopp, the losses, Gram.
There is no torch peer for ssl: `--peer` with `--mode=ssl` is an argparse error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit import cli

NUM_CLASSES = 5
FLOPS_FACTOR = {"infer": 1, "lora": 2, "full": 3}
MODES = (*FLOPS_FACTOR, "ssl")
FLOPS_CONVENTION = ("2*MACs of matmuls (patch embed, qkv/proj, attention QK^T and AV, MLP/SwiGLU, head); "
                    "train = 3x forward (full), 2x forward (lora: no weight gradients, adapters ignored)")
SSL_FLOPS_CONVENTION = ("2*MACs of matmuls per example: 3x student forward (backbone on 2 global + n_local "
                        "crops, DINO head on their CLS, iBOT head on the masked-token bound / batch) + 1x teacher "
                        "(backbone on 2 global crops, DINO head on 2 CLS, iBOT head on the masked tokens); "
                        "EMA, Sinkhorn and losses not counted")
# Dense peak TFLOP/s by device_kind substring (first match wins). float32 is the TF32 tensor-core peak:
# XLA runs default-precision float32 matmuls in TF32 on these GPUs (the torch peer is set to match).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
]


# ------------------------------------------------------------------------------------------- FLOPs

def forward_flops(cfg, res: int, num_classes: int = 0) -> float:
    """Forward FLOPs (2 * MACs) of one res x res image through a ViTConfig backbone (+ a linear head)."""
    p, d, m = cfg.patch_size, cfg.hidden_size, cfg.mlp_hidden
    n_patch = (res // p) ** 2
    n = n_patch + cfg.num_prefix  # tokens: CLS + registers + patches
    embed = 2 * n_patch * (p * p * cfg.num_channels) * d
    proj = 4 * 2 * n * d * d  # query, key, value, output
    attn = 2 * 2 * n * n * d  # QK^T and weights @ V, summed over heads
    mlp = (3 if cfg.mlp == "swiglu" else 2) * 2 * n * d * m
    return embed + cfg.depth * (proj + attn + mlp) + 2 * d * num_classes


def head_flops(head, width: int) -> float:
    """Forward FLOPs of a DINOHead (`HeadConfig`) on one token of `width` features: 2 * in * out per Linear
    (its MLP, then the prototypes); biases, GELU and the L2 normalisation are not counted."""
    dims = [width] + [head.hidden_dim] * (max(head.nlayers, 1) - 1) + [head.bottleneck_dim, head.n_prototypes]
    return sum(2 * a * b for a, b in zip(dims, dims[1:]))


def ssl_flops(vit, dino, ibot, global_size: int, local_size: int, n_local: int, masked: float) -> float:
    """Training FLOPs of one SSL example (module docstring): `masked` iBOT tokens per example."""
    d = vit.hidden_size
    backbone = 2 * forward_flops(vit, global_size)
    student = backbone + n_local * forward_flops(vit, local_size) + (2 + n_local) * head_flops(dino, d)
    teacher = backbone + 2 * head_flops(dino, d)
    return 3 * (student + masked * head_flops(ibot, d)) + teacher + masked * head_flops(ibot, d)


def measure_matmul_peak(dtype: str, n: int | None = None, reps: int = 5) -> float:
    """Best TFLOP/s of an n x n x n matmul in jax on the default device (float32 accumulation)."""
    import jax
    import jax.numpy as jnp
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


# ------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = cli.parser("benchmark", __doc__)
    ap.add_argument("--arch", default="", help="preset name(s), comma-separated (default dinov2_vits14; --plan, "
                                               "--save_stall: replaces the config's)")
    cli.add_model_overrides(ap)
    ap.add_argument("--batch_size", type=int, default=None, help="images per step (default 16; ssl --config: the "
                                                                  "config's)")
    cli.deprecated(ap, "--batch", "--batch_size", type=int)
    ap.add_argument("--image_size", type=int, default=224, help="image side in pixels")
    cli.deprecated(ap, "--res", "--image_size", type=int)
    ap.add_argument("--config", default="", help="configs/NAME.py[:variant] or a shipped name. --mode=ssl: its model, "
                                                 "crops, heads and batch (random weights); --data: its workload's "
                                                 "input pipeline against the step's demand")
    ap.add_argument("--mode", default="lora", help="lora | full | infer | ssl, comma-separated")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) call")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds, best reported (default 2 with "
                                                              "--peer, else 1)")
    ap.add_argument("--peer", action="store_true", help="also run the PyTorch (transformers) peer")
    ap.add_argument("--lora_rank", type=int, default=16, help="LoRA rank of --mode=lora")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak for mfu (default: table)")
    ap.add_argument("--markdown", action="store_true", help="end with a markdown table of all runs")
    ap.add_argument("--data", action="store_true", help="measure the grain input pipeline alone")
    ap.add_argument("--data_dir", default="", help="--data: image folder with a train split (default: a "
                                                   "synthetic GZ2 set in a temp dir)")
    ap.add_argument("--data_files", type=int, default=8, help="--data --config: files written (then reused)")
    ap.add_argument("--data_px", type=int, default=64, help="--data: synthetic source image size")
    ap.add_argument("--data_workers", default="2", help="--data: grain worker processes (--config: a comma "
                                                        "list, 0 = in-process, one core)")
    ap.add_argument("--render", default="", metavar="JSONL", help="print the markdown of a file of this tool's "
                                                                   "JSON lines (benchmarks/gpu.sh) and exit")
    ap.add_argument("--plan", action="store_true", help="--config: compile (not run) its train step and print "
                                                        "the per-device memory and the largest batch per device")
    ap.add_argument("--measure", action="store_true", help="--plan: also run the step once at the batch and "
                                                           "measure the memory it takes (CPU: resident growth)")
    ap.add_argument("--save_stall", action="store_true", help="step times around checkpoint saves in a real "
                                                              "training run (--config, --arch, --steps)")
    ap.add_argument("--save_every", type=int, default=4, help="--save_stall: steps between saves")
    ap.add_argument("--heap", action="store_true", help="page faults per CPU step with and without "
                                                        "xla_options.keep_cpu_heap (fresh processes)")
    ssl = ap.add_argument_group("--mode=ssl (config.ssl)")
    ssl.add_argument("--global_size", type=int, default=224, help="global crop size (2 per example)")
    ssl.add_argument("--local_size", type=int, default=96, help="local crop size")
    ssl.add_argument("--n_local", type=int, default=8, help="local crops per example")
    ssl.add_argument("--prototypes", type=int, default=65536, help="prototypes of the DINO and iBOT heads")
    ssl.add_argument("--head_hidden", type=int, default=2048, help="hidden width of both heads' MLPs")
    ssl.add_argument("--head_bottleneck", type=int, default=256, help="bottleneck width of both heads")
    ssl.add_argument("--ssl_patch", type=int, default=0, help="student patch size (0: the arch's)")
    args = cli.parse(ap, argv)
    args.batch, args.res = args.batch_size, args.image_size  # the names the benchmark code reads
    args.arch_given, args.arch = bool(args.arch), args.arch or "dinov2_vits14"
    modes = args.mode.split(",")
    bad = set(modes) - set(MODES)
    if bad:
        ap.error(f"--mode: unknown {sorted(bad)}; choose from {sorted(MODES)}")
    if args.peer and "ssl" in modes:
        ap.error("--peer: there is no torch peer for --mode=ssl")
    if args.save_stall and not (3 <= args.save_every and 2 * args.save_every < args.steps):
        ap.error("--save_stall: --save_every >= 3 and --steps > 2 x --save_every (plain steps between saves)")
    if args.rounds is None:
        args.rounds = 2 if args.peer else 1
    args.data_workers = [int(w) for w in args.data_workers.split(",")]
    if not args.config:
        args.data_workers = args.data_workers[0]
    args.batch_given = args.batch is not None
    args.batch = args.batch or 16
    return args


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _rss_bytes() -> int:
    """Peak resident set size of this process. Linux: VmHWM, since ru_maxrss survives exec and a spawned
    peer would inherit the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ------------------------------------------------------------------------------------------- jax side

class JaxBench:
    """Builds the model and step like `jaxvit.train`; `run(n)` times n steps."""

    impl = "jax"

    def __init__(self, args: argparse.Namespace):
        import jax
        import jax.numpy as jnp
        import ml_collections as mlc

        from jaxvit import optim, sharding, tasks, xla_options
        from jaxvit.config import base_config
        from jaxvit.models import parse_overrides
        from jaxvit.train import init_state, make_step

        cfg = base_config()
        cfg.model.arch, cfg.model.dtype = args.arch, args.dtype
        cfg.model.overrides = mlc.ConfigDict(parse_overrides(args.override))
        cfg.data.image_size, cfg.train.batch_size = args.res, args.batch
        cfg.data.classes = tuple(f"class_{i}" for i in range(NUM_CLASSES))
        cfg.lora.enabled, cfg.lora.rank = args.mode == "lora", args.lora_rank
        cfg.mesh.data = 1  # the first device
        self.cfg, self.jax = cfg, jax
        self.device = jax.devices()[0]
        task = tasks.create(cfg)
        model, variables = task.build(jax.random.key(0))
        self.vit_cfg = model.backbone
        rng = np.random.default_rng(0)
        images = jax.device_put(rng.standard_normal((args.batch, args.res, args.res, 3), np.float32), self.device)
        self.n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
        if args.mode == "infer":
            forward = xla_options.jit(lambda v, x: model.apply(v, x, train=False))
            self.trainable = 0
            self._step = lambda: forward(variables, images)
            self.state = None
        else:
            batch = dict(image=images, label=jnp.asarray(rng.integers(0, NUM_CLASSES, args.batch), jnp.int32),
                         bad=jnp.zeros((args.batch,), jnp.int32))
            rule = optim.trainable_rule("all", cfg, task.head, task.frozen)
            trainable = optim.split(variables, rule)[0]
            total = 1 + args.warmup + args.rounds * args.steps
            tx, schedule, _ = optim.make_optimizer(cfg, trainable, total, self.vit_cfg.depth)
            self.state, _ = init_state(cfg, variables, rule, tx, sharding.make_mesh(cfg.mesh))
            self.trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
            step = xla_options.jit(make_step(task, model, cfg, tx, schedule), donate_argnums=0)

            def train_step():
                self.state, metrics = step(self.state, batch)
                return metrics
            self._step = train_step

    def first_call(self) -> float:
        start = time.perf_counter()
        self.jax.block_until_ready((self._step(), self.state))
        return time.perf_counter() - start

    def run(self, n: int) -> float:
        start = time.perf_counter()
        outs = [self._step() for _ in range(n)]
        self.jax.block_until_ready((outs, self.state))
        return time.perf_counter() - start

    def memory(self) -> tuple[str, int]:
        stats = self.device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return "peak_mem_bytes", int(stats["peak_bytes_in_use"])
        return "peak_rss_bytes", _rss_bytes()

    def info(self) -> dict[str, Any]:
        return dict(device=self.device.device_kind, version=f"jax {self.jax.__version__}",
                    params=int(self.n_params), trainable_params=int(self.trainable))


class SSLBench(JaxBench):
    """The `ssl` task's train step (DINO + iBOT + KoLeo, EMA teacher) on a synthetic multi-crop batch, built
    like `jaxvit.train` does; `flops_per_example` by `ssl_flops`."""

    def __init__(self, args: argparse.Namespace):
        import jax
        import ml_collections as mlc

        from jaxvit import optim, sharding, tasks, xla_options
        from jaxvit.config import base_config, load_config_file
        from jaxvit.models import parse_overrides
        from jaxvit.config_recipes import dino_optimizer
        from jaxvit.train import init_state, make_step, partition

        if args.config:  # the recipe's model, crops, heads and batch (random weights)
            cfg = load_config_file(args.config)
            cfg.model.pretrained = ""
            if args.batch_given:
                cfg.train.batch_size = args.batch
            if args.override:
                cfg.model.overrides = mlc.ConfigDict(parse_overrides(args.override))
            args.arch, args.dtype, args.batch = cfg.model.arch, cfg.model.dtype, cfg.train.batch_size
            s = cfg.ssl
        else:
            cfg = base_config("ssl")
            cfg.model.arch, cfg.model.dtype = args.arch, args.dtype
            cfg.model.overrides = mlc.ConfigDict(parse_overrides(args.override))
            cfg.train.batch_size = args.batch
            dino_optimizer(cfg)
            s = cfg.ssl
            s.patch_size = args.ssl_patch
            s.crops.global_size, s.crops.local_size, s.crops.n_local = (args.global_size, args.local_size,
                                                                        args.n_local)
            for head in (s.dino, s.ibot):
                head.n_prototypes, head.hidden_dim, head.bottleneck_dim = (args.prototypes, args.head_hidden,
                                                                           args.head_bottleneck)
        cfg.mesh.data = 1  # the first device
        args.global_size, args.local_size, args.n_local = s.crops.global_size, s.crops.local_size, s.crops.n_local
        args.prototypes = s.dino.n_prototypes
        self.cfg, self.jax = cfg, jax
        self.device = jax.devices()[0]
        task = tasks.create(cfg)
        total, spe = 1 + args.warmup + args.rounds * args.steps, task.steps_per_epoch(0, args.batch)
        task.set_run_length(total, spe)
        model, variables = task.build(jax.random.key(0))
        self.vit_cfg = vit = model.backbone
        rule = optim.trainable_rule("all", cfg, task.head, task.frozen)
        trainable = partition(variables, rule)[0]
        tx, schedule, _ = optim.make_optimizer(cfg, trainable, total, vit.depth, lr_gates=task.lr_gates(spe))
        self.state, _ = init_state(cfg, variables, rule, tx, sharding.make_mesh(cfg.mesh))
        self.n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
        self.trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))

        rng = np.random.default_rng(0)
        b, g, l = args.batch, args.global_size, args.local_size
        c = vit.num_channels
        batch = {"global": rng.standard_normal((b, 2, g, g, c), np.float32),
                 "local": rng.standard_normal((b, args.n_local, l, l, c), np.float32)}
        masks = task.mask_batch()
        batch = jax.device_put(masks(batch, np.random.default_rng(0)), self.device)
        n_patch = (g // vit.patch_size) ** 2  # the static size of the iBOT gather, as SSL.loss bounds it
        self.masked = min(masks.max_masked(b), 2 * b * int(n_patch * s.ibot.mask_ratio[1]))
        ibot = model.ibot_cfg if model.separate_ibot_head else model.dino_cfg
        self.flops_per_example = ssl_flops(vit, model.dino_cfg, ibot, g, l, args.n_local, self.masked / b)
        step = xla_options.jit(make_step(task, model, cfg, tx, schedule), donate_argnums=0)

        def train_step():
            self.state, metrics = step(self.state, batch)
            return metrics
        self._step = train_step


# ------------------------------------------------------------------------------------------- torch peer

class TorchBench:
    """transformers backbone (SDPA) + nn.Linear head on the CLS output; AdamW; PEFT LoRA on attention."""

    impl = "torch"

    def __init__(self, opts: dict[str, Any], hf_config: dict[str, Any]):
        import torch
        import transformers
        from torch import nn

        self.torch = torch
        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(0)
        self.device = torch.device("cuda" if opts["cuda"] and torch.cuda.is_available() else "cpu")
        torch.set_float32_matmul_precision("high")  # TF32 on GPU, like XLA's default precision
        hf = dict(hf_config)
        model_type = hf.pop("model_type")
        hf.pop("architectures", None)
        config = transformers.AutoConfig.for_model(model_type, **hf)
        backbone = transformers.AutoModel.from_config(config, attn_implementation="sdpa")
        head = nn.Linear(config.hidden_size, NUM_CLASSES)
        self.mode = mode = opts["mode"]
        if mode == "lora":
            from peft import LoraConfig, get_peft_model
            targets = sorted({name.rsplit(".", 1)[-1] for name, mod in backbone.named_modules()
                              if isinstance(mod, nn.Linear) and ".attention." in name})
            backbone = get_peft_model(backbone, LoraConfig(r=opts["lora_rank"], lora_alpha=opts["lora_alpha"],
                                                           lora_dropout=opts["lora_dropout"],
                                                           target_modules=targets))
        self.model = nn.ModuleDict(dict(backbone=backbone, head=head)).to(self.device)
        self.model.train(mode != "infer")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.trainable = 0 if mode == "infer" else sum(p.numel() for p in params)
        b, r = opts["batch"], opts["res"]
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(b, 3, r, r, generator=gen).to(self.device)
        labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(self.device)
        autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16,
                                          enabled=opts["dtype"] == "bfloat16")

        def logits():
            return self.model["head"](self.model["backbone"](pixel_values=images).pooler_output)

        if mode == "infer":
            def step():
                with torch.no_grad(), autocast():
                    return logits()
        else:
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

            def step():
                with autocast():
                    loss = nn.functional.cross_entropy(logits().float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)  # jaxvit's default optim.grad_clip
                opt.step()
                return loss
        self._step = step

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def first_call(self) -> float:
        start = time.perf_counter()
        self._step()
        self._sync()
        return time.perf_counter() - start

    def run(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self._step()
        self._sync()
        return time.perf_counter() - start

    def memory(self) -> tuple[str, int]:
        if self.device.type == "cuda":
            return "peak_mem_bytes", int(self.torch.cuda.max_memory_allocated())
        return "peak_rss_bytes", _rss_bytes()

    def info(self) -> dict[str, Any]:
        from importlib.metadata import version
        device = self.torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        libs = ["torch", "transformers"] + (["peft"] if self.mode == "lora" else [])
        return dict(device=device, version=", ".join(f"{lib} {version(lib)}" for lib in libs),
                    params=int(self.n_params), trainable_params=int(self.trainable))


def _torch_worker(conn, opts: dict[str, Any], hf_config: dict[str, Any], warmup: int) -> None:
    """Peer process: build, first call + warm-up, then answer each `n` with the seconds n steps took."""
    try:
        bench = TorchBench(opts, hf_config)
        first = bench.first_call()
        bench.run(warmup)
        conn.send(("ready", first))
        while (n := conn.recv()) is not None:
            conn.send(("time", bench.run(n)))
        conn.send(("done", (bench.memory(), bench.info())))
    except Exception as e:  # report instead of leaving the parent waiting
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class PeerProcess:
    """The torch peer in a spawned process, driven over a pipe with the same interface as JaxBench."""

    impl = "torch"

    def __init__(self, opts: dict[str, Any], hf_config: dict[str, Any], warmup: int):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_worker, args=(child, opts, hf_config, warmup), daemon=True)
        self.proc.start()
        child.close()
        self._first = self._recv("ready")
        self._final = None

    def _recv(self, kind: str) -> Any:
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"torch peer process exited (code {self.proc.exitcode})") from None
        if got != kind:
            raise RuntimeError(f"torch peer failed: {payload}")
        return payload

    def first_call(self) -> float:
        return self._first

    def run(self, n: int) -> float:
        self.conn.send(n)
        return self._recv("time")

    def finish(self) -> None:
        self.conn.send(None)
        self._final = self._recv("done")
        self.proc.join(timeout=30)

    def memory(self) -> tuple[str, int]:
        return self._final[0]

    def info(self) -> dict[str, Any]:
        return self._final[1]


# ------------------------------------------------------------------------------------------- records

def _record(bench, args: argparse.Namespace, flops: float, compile_s: float, best_s: float,
            measured_peak: float, **extra) -> dict:
    """One JSON record; `flops`: the FLOPs of one image's (example's) step."""
    info = bench.info()
    step_s = best_s / args.steps
    tflops = flops * args.batch / step_s / 1e12
    peak = args.peak_tflops or peak_tflops(info["device"], args.dtype)
    mem_key, mem = bench.memory()
    return dict(impl=bench.impl, arch=args.arch + (f"[{args.override}]" if args.override else ""),
                mode=args.mode, dtype=args.dtype, batch=args.batch, res=args.res,
                img_per_s=_sig(args.batch / step_s), step_ms=_sig(step_s * 1e3),
                compile_s=round(compile_s, 2), **{mem_key: mem}, tflops=_sig(tflops),
                mfu=_sig(tflops / peak) if peak else None, matmul_peak_tflops=_sig(measured_peak),
                mfu_measured=_sig(tflops / measured_peak), **extra, steps=args.steps, rounds=args.rounds, **info,
                date=_now())


def bench_ssl(args: argparse.Namespace, measured_peak: float) -> list[dict]:
    """The ssl task's train step (no peer)."""
    sb = SSLBench(args)
    compile_s = sb.first_call()
    sb.run(args.warmup)
    best = min(sb.run(args.steps) for _ in range(args.rounds))
    rec = _record(sb, args, sb.flops_per_example, compile_s, best, measured_peak,
                  crops={"global": args.global_size, "local": args.local_size, "n_local": args.n_local},
                  prototypes=args.prototypes, patch_size=sb.vit_cfg.patch_size, masked_tokens=sb.masked,
                  gflops_per_img_step=_sig(sb.flops_per_example / 1e9), flops_convention=SSL_FLOPS_CONVENTION)
    return [dict(rec, res=args.global_size)]  # --res is not used by ssl


def bench_model(args: argparse.Namespace, measured_peak: float) -> list[dict]:
    """One arch x mode: jaxvit (and the peer), alternating rounds."""
    jb = JaxBench(args)
    flops = forward_flops(jb.vit_cfg, args.res, NUM_CLASSES)
    compile_s = {"jax": jb.first_call()}
    jb.run(args.warmup)
    benches: list = [jb]
    if args.peer:
        from jaxvit.models.weights import config_to_hf
        opts = dict(mode=args.mode, dtype=args.dtype, batch=args.batch, res=args.res,
                    lora_rank=args.lora_rank, lora_alpha=jb.cfg.lora.alpha, lora_dropout=jb.cfg.lora.dropout,
                    cuda=jb.device.platform == "gpu")
        peer = PeerProcess(opts, config_to_hf(jb.vit_cfg), args.warmup)
        compile_s["torch"] = peer.first_call()
        benches.append(peer)
    best = {b.impl: math.inf for b in benches}
    for _ in range(args.rounds):  # alternate, so load changes hit both implementations
        for b in benches:
            best[b.impl] = min(best[b.impl], b.run(args.steps))
    if args.peer:
        peer.finish()
    records = [_record(b, args, flops * FLOPS_FACTOR[args.mode], compile_s[b.impl], best[b.impl], measured_peak,
                       gflops_per_img_fwd=_sig(flops / 1e9), flops_convention=FLOPS_CONVENTION) for b in benches]
    if args.peer:
        records.append(dict(impl="ratio", arch=records[0]["arch"], mode=args.mode, dtype=args.dtype,
                            batch=args.batch, res=args.res,
                            speedup_vs_torch=round(records[0]["img_per_s"] / records[1]["img_per_s"], 3)))
    return records


def bench_data(args: argparse.Namespace) -> list[dict]:
    """Training input pipeline (decode, augment, batch) alone: images/s."""
    from jaxvit.data.pipeline import default_data_config, measure_throughput
    from jaxvit.data.sources import ImageFolder
    from jaxvit.demos.gz2 import CLASSES, write_dataset
    from jaxvit.data.transforms import RGBExample, TransformConfig

    cfg = default_data_config()
    cfg.image_size, cfg.num_workers = args.res, args.data_workers
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            root, px = args.data_dir, None
        else:  # one epoch covers warm-up + timed batches
            per_class = -(-(args.steps + 1) * args.batch // len(CLASSES))
            root, px = write_dataset(tmp, per_class={"train": per_class}, size=args.data_px), args.data_px
        source = ImageFolder(root, "train")
        ips = measure_throughput(source, RGBExample(TransformConfig.from_config(cfg)), cfg, args.steps, args.batch)
    return [dict(impl="grain", mode="data", batch=args.batch, res=args.res, img_per_s=round(ips, 2),
                 step_ms=_sig(args.batch / ips * 1e3), num_workers=args.data_workers,
                 source_images=len(source), source_px=px, peak_rss_bytes=_rss_bytes(), steps=args.steps,
                 device=platform.processor() or platform.machine(), cpus=os.cpu_count(), date=_now())]


# ------------------------------------------------------------------------------------------- workload data

ACCEL_TFLOPS, ACCEL_MFU, ACCEL_CORES = 989.4, 0.45, 16  # H100/H200 bf16 dense, the MFU a step reaches, host cores


def _cell_labels(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """uint16 ids of `n` touching, roughly round cells: each pixel takes its nearest seed within a radius."""
    from scipy import ndimage
    ids = np.zeros((h, w), np.uint16)
    ids[rng.integers(0, h, n), rng.integers(0, w, n)] = np.arange(1, n + 1)
    dist, (iy, ix) = ndimage.distance_transform_edt(ids == 0, return_indices=True)
    labels = ids[iy, ix]
    labels[dist > 0.6 * math.sqrt(h * w / n)] = 0
    return labels


def _cell_image(rng: np.random.Generator, labels: np.ndarray, peak: int, dtype) -> np.ndarray:
    """Bright cells with per-cell brightness and pixel noise over a dim background."""
    level = rng.uniform(0.3, 1.0, int(labels.max()) + 1)
    level[0] = 0.05
    img = level[labels] * peak * rng.uniform(0.8, 1.0, labels.shape)
    return np.clip(img, 0, np.iinfo(dtype).max).astype(dtype)


def write_workload_files(cfg, root: str, n: int = 8) -> str:
    """`n` training files of the config's workload in its published format and size under `root`, and
    cfg.data pointed at them; returns what was written. GZ2: 424 px RGB JPEGs in the class-folder layout;
    CIFAR-10: 32 px uint8 images (as data.source="npz": the images tfds would decode); CSIRO biomass: 2000 x
    1000 JPEG photos in the Image2Biomass CSV layout; JUMP: 5 fluorescent channels as 1080 x 1080 uint16 TIFFs
    per site in the load-data layout; DINOCell: LIVECell-size 704 x 520 8-bit grayscale TIFFs with uint16 cell
    masks (300 cells); TerraMind: 256 px Sentinel-1 / Sentinel-2 GeoTIFF pairs."""
    import tifffile
    from PIL import Image
    rng = np.random.default_rng(0)
    d = cfg.data
    d.data_dir, d.demo = root, ""
    if cfg.task == "biomass":
        from jaxvit.demos.pasture import write_dataset
        write_dataset(root, per_split={"train": n, "val": 1, "test": 1}, size=(2000, 1000))
        return f"{n} pasture photos 2000x1000 JPEG"
    if cfg.task == "sar_grounding":
        from jaxvit.demos.sar import write_dataset
        write_dataset(root, scenes={"train": n, "val": 1, "test": 1}, tile=256)
        return f"{n} S1 (2 x float32) / S2 (12 x uint16) GeoTIFF pairs 256 px"
    if cfg.task == "cell_distance":
        for kind in ("images", "masks"):
            os.makedirs(f"{root}/train/{kind}", exist_ok=True)
        for i in range(n):
            labels = _cell_labels(rng, 520, 704, 300)
            tifffile.imwrite(f"{root}/train/images/site_{i:04d}.tif", _cell_image(rng, labels, 200, np.uint8))
            Image.fromarray(labels).save(f"{root}/train/masks/site_{i:04d}.png")
        return f"{n} LIVECell-size 704x520 uint8 TIFFs + uint16 PNG masks (300 cells)"
    if d.source == "jump":
        from jaxvit.demos.cells import write_dataset
        write_dataset(root, n_plates=1, wells_per_treatment=1, sites_per_well=-(-n // 4), image_size=16,
                      fractions=(1.0, 0.0))  # the layout; the sites are then written again at full size
        labels = _cell_labels(rng, 1080, 1080, 250)
        tiffs = sorted(Path(root).rglob("*.tiff"))
        for path in tiffs:
            tifffile.imwrite(path, _cell_image(rng, labels, 4000, np.uint16))
        return f"{len(tiffs)} JUMP channel TIFFs 1080x1080 uint16 (each site: every channel of the load-data table)"
    if d.source.startswith("tfds:"):
        d.source = "npz"
        images = rng.integers(0, 256, (max(n, 64), 32, 32, 3), np.uint8)
        np.savez(f"{root}/train.npz", images=images, labels=np.arange(len(images)) % 10,
                 class_names=np.array([str(c) for c in range(10)]))
        d.classes = ()
        return f"{len(images)} CIFAR-size 32x32 uint8 images (npz)"
    from jaxvit.demos.gz2 import CLASSES, render_galaxy, split_dir
    classes = tuple(d.classes) or CLASSES
    for i in range(n):
        folder = split_dir(root, d.train_split) / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        cls = CLASSES[i % len(CLASSES)]
        Image.fromarray(render_galaxy(cls, rng, 424)).save(folder / f"{i:05d}.jpg", quality=90)
    return f"{n} GZ2 424x424 RGB JPEGs"


def _sar_step_flops(cfg, task) -> float:
    """XLA's count of the TerraMind stage-3 gradient for one example (random weights of the configured sizes): the
    tokenizers, every TerraMind pass and the differentiable DDIM decode. The decode's denoising loop is a scan that
    XLA counts once, so timesteps - 1 more of its steps (forward, recompute, backward) are added. The perceptual
    term's network is not built here (its weights are files) and not counted: DINOv2-S, under 1% of the step."""
    import jax
    from jaxvit.models.terramind.tokenizer.model import decode_probs
    example = task.train_transform()(task.source(cfg.data.train_split)[0], np.random.default_rng(0))
    batch = {k: jax.ShapeDtypeStruct((1, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}
    built = {}

    def init(key):
        built["model"], variables = task.build(key)
        return variables
    variables = jax.eval_shape(init, jax.random.key(0))
    model, lora = built["model"], variables.pop("lora")

    def flops(fn, *args) -> float:  # lowered, not compiled
        cost = jax.jit(fn).lower(*args).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])
    step = flops(jax.grad(lambda a, v, b, r: task.loss(model, {**v, "lora": a}, b, r)[0].sum()),
                 lora, variables, batch, jax.random.key(0))
    tok, s2 = model.tokenizer, batch["s2"]
    side = s2.shape[1] // tok.cfg.patch_size
    probs = jax.ShapeDtypeStruct((1, side, side, int(np.prod(tok.cfg.levels))), np.float32)
    denoise = flops(jax.grad(lambda p, n, t: decode_probs(tok, t, p, n, timesteps=1, remat=True).sum()),
                    probs, jax.ShapeDtypeStruct(s2.shape, np.float32), variables["params"]["tokenizer"])
    return step + (cfg.sar_grounding.timesteps - 1) * denoise


def step_flops(cfg, task) -> float:
    """Training FLOPs per example of the config's step (the module's convention): ssl by `ssl_flops` (its model
    built with random weights), else the backbone at data.image_size, 2x (LoRA) or 3x (full) its forward;
    DINOCell by XLA's count of its forward (backbone and convolutional decoder); the TerraMind task by XLA's count
    of its whole gradient (`_sar_step_flops`). Other heads are not counted."""
    import jax
    from jaxvit.models import get_config
    factor = 2 if cfg.lora.enabled else 3
    if cfg.task == "sar_grounding":
        return _sar_step_flops(cfg, task)
    if cfg.task == "cell_distance":  # the decoder's convolutions matter here: XLA's count of the forward
        import jax.numpy as jnp
        built = {}

        def init(key):
            built["model"], variables = task.build(key)
            return variables
        variables = jax.eval_shape(init, jax.random.key(0))
        size, model = cfg.data.image_size, built["model"]
        image = jax.ShapeDtypeStruct((1, size, size, model.backbone.num_channels), jnp.float32)
        cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, image).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"]) * factor
    if cfg.task != "ssl":
        vit = get_config(cfg.model.arch, **dict(cfg.model.overrides))
        return forward_flops(vit, cfg.data.image_size) * factor
    task.set_run_length(1, 1)
    model = task.build(jax.random.key(0))[0]
    vit, crops = model.backbone, cfg.ssl.crops
    ibot = model.ibot_cfg if model.separate_ibot_head else model.dino_cfg
    n_patch = (crops.global_size // vit.patch_size) ** 2
    masked = 2 * n_patch * float(np.mean(cfg.ssl.ibot.mask_ratio)) * cfg.ssl.ibot.mask_probability
    return ssl_flops(vit, model.dino_cfg, ibot, crops.global_size, crops.local_size, crops.n_local, masked)


def bench_workload_data(args: argparse.Namespace) -> list[dict]:
    """The config's train transform + batching on files in the published format: examples/s in-process (one
    core) and with --data_workers processes, against the accelerator's demand (ACCEL_*). A config with
    data.cache_dir is timed with its cache filled (in the temporary folder, by one pass): the epochs after the
    first."""
    from jaxvit import tasks
    from jaxvit.config import load_config_file
    from jaxvit.data.pipeline import measure_throughput

    cfg = load_config_file(args.config)
    name = os.path.basename(args.config.partition(":")[0]).removesuffix(".py")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_workload_files(cfg, tmp, args.data_files)
        cfg.model.pretrained = ""
        if cfg.data.get("cache_dir"):  # a cache in the temporary folder: cold for the first pass over the files
            cfg.data.cache_dir = os.path.join(tmp, "cache")
        if cfg.task == "sar_grounding":
            cfg.sar_grounding.perceptual_weight = 0.0  # no model is built: its files need not be here
            cfg.sar_grounding.terramind = cfg.sar_grounding.terramind or "random"
        task = tasks.create(cfg)
        flops = step_flops(cfg, task)
        source, transform = task.source(cfg.data.train_split), task.train_transform()
        for i in range(len(source) if cfg.data.get("cache_dir") else 0):  # that first pass, not timed
            transform(source[i], np.random.default_rng(i))
        demand = ACCEL_TFLOPS * 1e12 * ACCEL_MFU / flops
        records = []
        for workers in args.data_workers:  # 0: in this process, i.e. one core
            cfg.data.num_workers = workers
            rate = measure_throughput(source, transform, cfg.data, args.steps, args.batch)
            per_core = rate / max(workers, 1)
            records.append(dict(
                impl="grain", mode="data", config=name, files=files, batch=args.batch, res=cfg.data.image_size,
                num_workers=workers, img_per_s=_sig(rate), per_core_img_per_s=_sig(per_core),
                gflops_per_example=_sig(flops / 1e9), demand_img_per_s=_sig(demand),
                demand_per_core=_sig(demand / ACCEL_CORES), headroom=_sig(per_core * ACCEL_CORES / demand, 3),
                peak_rss_bytes=_rss_bytes(), steps=args.steps, device=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), date=_now()))
    return records


# ------------------------------------------------------------------------------------------- save stall

def bench_save_stall(args: argparse.Namespace) -> list[dict]:
    """Step times around checkpoint saves in a real run: `jaxvit.train.Trainer` on the --config (default
    configs/gz2_full.py) with --arch, --image_size, --batch_size, random weights and every block trained (full
    fine-tuning), a synthetic GZ2 folder, a resume point every --save_every steps, --steps steps. Each step is
    timed to its end (`step_ms`), each loop iteration from one step's start to the next (`iteration_ms`: data,
    step, logging, the save), and the save call itself on the training thread (`save_ms`)."""
    import jax
    import ml_collections as mlc

    from jaxvit import train, xla_options
    from jaxvit.config import load_config_file
    from jaxvit.demos.gz2 import CLASSES, write_dataset
    from jaxvit.models import parse_overrides

    xla_options.keep_cpu_heap()  # as `jaxvit train` runs

    cfg = load_config_file(args.config or "gz2_full")
    cfg.model.pretrained = ""
    if args.arch_given:
        cfg.model.arch = args.arch
    cfg.model.overrides = mlc.ConfigDict(parse_overrides(args.override))
    cfg.lora.enabled, cfg.train.freeze_first_n_layers, cfg.train.phases = False, 0, ()
    cfg.data.image_size, cfg.train.batch_size, cfg.train.steps = args.res, args.batch, args.steps
    cfg.data.num_workers, cfg.data.aug.crop_ratio = 0, (1.0, 1.0)  # in-process: the step has every core
    cfg.checkpoint.every_steps, cfg.eval.every_steps, cfg.eval.test_split = args.save_every, 10 ** 9, ""
    marks, steps, saves = [], [], {}

    class Timed(train.Trainer):
        def _phase_setup(self, index, variables, start):
            state, step_fn, mults = super()._phase_setup(index, variables, start)

            def timed(state, batch):
                marks.append(time.perf_counter())
                out = jax.block_until_ready(step_fn(state, batch))
                steps.append(time.perf_counter() - marks[-1])
                return out
            return state, timed, mults

        def save(self, step, state, data, loop):
            start = time.perf_counter()
            super().save(step, state, data, loop)
            saves[step] = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        per_class = -(-args.steps * args.batch // len(CLASSES))
        cfg.data.data_dir = str(write_dataset(Path(tmp) / "data", per_class={"train": per_class, "val": 1},
                                              size=args.res))
        trainer = Timed(cfg, Path(tmp) / "run")
        waits, wait = [], trainer.ckpts.wait

        def timed_wait():
            start = time.perf_counter()
            wait()
            waits.append(time.perf_counter() - start)
        trainer.ckpts.wait = timed_wait
        trainer.run()  # ends by waiting for the last save to complete
        last = Path(tmp) / "run" / "checkpoints" / str(args.steps)
        ckpt_bytes = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    marks.append(math.nan)  # the last iteration (its evaluation, the final save) is not timed as a whole
    rows = [dict(step=i + 1, step_ms=_sig(steps[i] * 1e3), iteration_ms=_sig((marks[i + 1] - marks[i]) * 1e3),
                 save_ms=_sig(saves[i + 1] * 1e3) if i + 1 in saves else None) for i in range(len(steps))]
    rows[-1]["iteration_ms"] = None
    # a save's cost: the extra wall time of its iteration and of the iterations until the next save (the write in
    # the background shares the cores), over the median plain iteration (neither a save's nor the one after it)
    saved = [s for s in sorted(saves) if s < args.steps]  # the last step's save also ends the run: not counted
    plain = float(np.median([r["iteration_ms"] for r in rows[1:-1] if r["step"] not in saves
                             and r["step"] - 1 not in saves]))
    costs = [sum(r["iteration_ms"] - plain for r in rows[s - 1:min(s - 1 + args.save_every, len(rows) - 1)])
             for s in saved]
    median = lambda xs: _sig(float(np.median(xs)))
    return [dict(impl="save_stall", config=args.config or "gz2_full", arch=cfg.model.arch, res=args.res,
                 batch=args.batch, save_every=args.save_every, steps=rows, plain_iteration_ms=_sig(plain),
                 median_save_ms=median([saves[s] * 1e3 for s in saved]),
                 save_over_step=_sig(float(np.median([saves[s] for s in saved])) * 1e3 / plain, 3),
                 median_save_cost_ms=median(costs), save_cost_over_step=_sig(float(np.median(costs)) / plain, 3),
                 final_write_ms=_sig((saves[args.steps] + waits[-1]) * 1e3),  # its call + its wait: a sync save
                 checkpoint_bytes=ckpt_bytes,  # one step's directory
                 peak_rss_bytes=_rss_bytes(), device=_backend(), cpus=os.cpu_count(), date=_now())]


# ------------------------------------------------------------------------------------------- memory plan

DEVICE_GIB = {"A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 80, "H200 141GB": 141}
CPU_REMAT_NOTE = ("the CPU compiler expands remat's optimization barriers away and merges the recomputation back "
                  "(as without remat): plan remat on the GPU")


def _example_batch(cfg, task, batch: int) -> dict:
    """One global training batch of zeros: the ssl task's multi-crop batch with its iBOT masks, else images
    with labels (the classification / regression batch)."""
    if cfg.task == "ssl":
        c, ch = cfg.ssl.crops, task.build_channels if hasattr(task, "build_channels") else 3
        real = {"global": np.zeros((batch, 2, c.global_size, c.global_size, ch), np.float32),
                "local": np.zeros((batch, c.n_local, c.local_size, c.local_size, ch), np.float32)}
        return task.mask_batch()(real, np.random.default_rng(0))
    if cfg.task not in ("classification", "regression"):
        raise SystemExit(f"--plan: task {cfg.task!r} is not planned yet (classification, regression, ssl)")
    size = cfg.data.image_size
    return {"image": np.zeros((batch, size, size, 3), np.float32), "label": np.zeros((batch,), np.int32),
            "bad": np.zeros((batch,), np.int32)}


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_step_memory(compiled, state: dict, batch: dict) -> dict:
    """Bytes one execution of `compiled` adds to what its inputs hold. On the CPU (Linux /proc): `step` = the
    peak growth of the process's anonymous resident memory (RssAnon, sampled every millisecond), which XLA's
    temporaries block (a fresh mapping per execution unless xla_options.keep_cpu_heap) and new outputs make, and
    `hwm` = the growth of its peak RSS (VmHWM reset through /proc/self/clear_refs), which also moves with the
    mapped libraries' pages the kernel evicts or reloads meanwhile. On accelerators `step` = the allocator's peak
    over what was in use. The second execution is measured (`state` is donated)."""
    import gc
    import threading

    import jax
    device = jax.devices()[0]
    batch = jax.block_until_ready(jax.device_put(batch, device))
    state = jax.block_until_ready(compiled(state, batch)[0])  # the first run's one-time allocations (threads)
    gc.collect()
    stats = device.memory_stats()
    if stats:
        before = stats["bytes_in_use"]
        jax.block_until_ready(compiled(state, batch))
        return {"step": int(device.memory_stats()["peak_bytes_in_use"] - before)}
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("--measure: needs Linux /proc (resident memory) or an accelerator with memory_stats")
    anon, rss, done = [_proc_kib("RssAnon")], _proc_kib("VmRSS"), threading.Event()

    def sample():
        while not done.wait(0.001):
            anon.append(_proc_kib("RssAnon"))
    sampler = threading.Thread(target=sample)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    sampler.start()
    try:
        jax.block_until_ready(compiled(state, batch))
    finally:
        done.set()
        sampler.join()
    return {"step": (max(anon) - anon[0]) * 1024, "hwm": (_proc_kib("VmHWM") - rss) * 1024}


def plan_memory(cfg, batch: int, measure: bool = False) -> dict:
    """Compile (not run) the config's train step at `batch` on abstract inputs; XLA's memory analysis, bytes.
    `measure`: then run it once on a real state (random weights) and batch of zeros, `measured_step_bytes` the
    memory the execution added (`measure_step_memory`), to compare with `step_bytes` (temporaries + outputs not
    aliased to the donated state)."""
    import jax

    from jaxvit import optim, sharding, tasks, xla_options
    from jaxvit.train import init_state, make_step, partition

    cfg.train.batch_size = batch
    if cfg.task == "classification" and not cfg.data.get("classes"):
        cfg.data.classes = tuple(f"class_{i}" for i in range(NUM_CLASSES))  # no data needed for the shapes
    task = tasks.create(cfg)
    total = 1000
    spe = task.steps_per_epoch(10 * batch, batch)
    task.set_run_length(total, spe)
    built = {}

    def build(key):
        built["model"], variables = task.build(key)
        return variables
    variables = jax.eval_shape(build, jax.random.key(0))
    model = built["model"]
    rule = optim.trainable_rule("all", cfg, task.head, task.frozen)
    trainable = partition(variables, rule)[0]
    kw = {"lr_gates": task.lr_gates(spe)} if hasattr(task, "lr_gates") else {}
    tx, schedule, _ = optim.make_optimizer(cfg, trainable, total, model.backbone.depth, **kw)
    mesh = sharding.make_mesh(cfg.mesh)
    state = jax.eval_shape(lambda v: init_state(cfg, v, rule, tx, mesh)[0], variables)
    step = xla_options.jit(make_step(task, model, cfg, tx, schedule), donate_argnums=0)
    example = _example_batch(cfg, task, batch)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example)
    compiled = step.lower(state, abstract).compile()
    m = compiled.memory_analysis()
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                              for x in jax.tree_util.tree_leaves(tree))
    step_bytes = int(m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    out = dict(params_bytes=nbytes(state.get("trainable")) + nbytes(state.get("frozen", {})),
               opt_state_bytes=nbytes(state["opt_state"]) + nbytes(state.get("ema", {})),
               argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
               step_bytes=step_bytes, peak_bytes=int(m.argument_size_in_bytes) + step_bytes)
    if measure:
        real = init_state(cfg, task.build(jax.random.key(0))[1], rule, tx, mesh)[0]
        measured = measure_step_memory(compiled, real, example)
        out["measured_step_bytes"] = measured["step"]
        out["measured_over_planned"] = _sig(measured["step"] / step_bytes, 3)
        if "hwm" in measured:
            out["measured_hwm_bytes"] = measured["hwm"]
    return out


def bench_plan(args: argparse.Namespace) -> list[dict]:
    """Per-device memory of the config's step at its batch (and twice it: the per-example slope), with and
    without remat, and the largest global batch that fits each device of DEVICE_GIB (10% kept free)."""
    import ml_collections as mlc

    from jaxvit.config import load_config_file
    from jaxvit.models import parse_overrides
    records = []
    for remat in ("none", "full"):
        points = {}
        for scale in (1, 2):
            cfg = load_config_file(args.config)
            cfg.model.pretrained, cfg.model.remat = "", remat
            if args.arch_given:
                cfg.model.arch = args.arch
            if args.override:
                cfg.model.overrides = mlc.ConfigDict(parse_overrides(args.override))
            batch = (args.batch if args.batch_given else cfg.train.batch_size) * scale
            points[batch] = plan_memory(cfg, batch, measure=args.measure and scale == 1)
        (b1, p1), (b2, p2) = points.items()
        per_example = (p2["peak_bytes"] - p1["peak_bytes"]) / (b2 - b1)
        fixed = p1["peak_bytes"] - per_example * b1
        fits = {name: int((0.9 * gib * 2**30 - fixed) // per_example) if per_example > 0 else None
                for name, gib in DEVICE_GIB.items()}
        records.append(dict(impl="plan", config=args.config, arch=cfg.model.arch, dtype=cfg.model.dtype,
                            remat=remat, lora=bool(cfg.lora.enabled), batch=b1, **p1,
                            per_example_bytes=int(per_example), max_batch=fits, backend=_backend(), date=_now()))
        if remat != "none" and _backend() == "cpu":
            records[-1]["note"] = CPU_REMAT_NOTE
    return records


def _backend() -> str:
    import jax
    return jax.devices()[0].device_kind


HEAP_PROBE = """
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
HEAP_TEMP_BYTES = 16384 * 2048 * 4


def heap_probe(keep: bool) -> dict:
    """{applied, faults_per_run, out} of HEAP_PROBE in a fresh CPU process, keep_cpu_heap on or off."""
    env = dict(os.environ, JAXVIT_KEEP_CPU_HEAP="1" if keep else "0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"heap probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_heap(args: argparse.Namespace) -> list[dict]:
    """Minor page faults per run of a program with a 128 MB temporary, default heap vs kept heap."""
    default, kept = heap_probe(False), heap_probe(True)
    return [dict(impl="heap", mode="heap", temp_pages=HEAP_TEMP_BYTES // resource.getpagesize(),
                 default=default, kept=kept, device=platform.processor() or platform.machine(),
                 cpus=os.cpu_count(), date=_now())]


def bench_models(args: argparse.Namespace) -> list[dict]:
    """Every arch x mode of the comma-separated lists, printing each record as it comes."""
    if args.peer:  # leave GPU memory for the peer process
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from jaxvit import xla_options
    xla_options.keep_cpu_heap()
    measured_peak = measure_matmul_peak(args.dtype)
    records = []
    for arch in args.arch.split(","):
        for mode in args.mode.split(","):
            bench = bench_ssl if mode == "ssl" else bench_model
            for r in bench(argparse.Namespace(**dict(vars(args), arch=arch, mode=mode)), measured_peak):
                print(json.dumps(r), flush=True)
                records.append(r)
    return records


def markdown_table(records: list[dict]) -> str:
    """jaxvit vs the peer, one row per arch x mode x dtype."""
    gib = _gib
    rows = ["| arch | mode | dtype | batch | jaxvit img/s | torch img/s | speedup | jaxvit compile s | "
            "torch 1st step s | jaxvit / torch peak GiB | jaxvit TFLOP/s | share of matmul peak |",
            "|" + "---|" * 12]
    by_key = {}
    for r in records:
        by_key.setdefault((r["arch"], r["mode"], r["dtype"], r["batch"]), {})[r["impl"]] = r
    for (arch, mode, dtype, batch), rs in by_key.items():
        jx, pt = rs.get("jax"), rs.get("torch", {})
        if jx is None:
            continue
        speed = rs.get("ratio", {}).get("speedup_vs_torch", "")
        rows.append(f"| {arch} | {mode} | {dtype} | {batch} | {jx['img_per_s']} | {pt.get('img_per_s', '')} | "
                    f"{speed} | {jx['compile_s']} | {pt.get('compile_s', '')} | {gib(jx)} / {gib(pt)} | "
                    f"{jx['tflops']} | {jx['mfu_measured']:.0%} of {jx['matmul_peak_tflops']} |")
    return "\n".join(rows)


def _gib(r: dict) -> str:
    b = r.get("peak_mem_bytes") or r.get("peak_rss_bytes")
    return f"{b / 2**30:.2f}" if b else ""


def render(records: list[dict]) -> str:
    """Markdown of a run's JSON lines (benchmarks/gpu.sh): models vs the peer, SSL steps, input pipelines,
    and the items that did not finish (`{"impl": "failed" | "skipped", "item", "reason"}` lines)."""
    parts = []
    models = [r for r in records if r["impl"] in ("jax", "torch", "ratio") and r.get("mode") in FLOPS_FACTOR]
    if models:
        parts.append(markdown_table(models))
    ssl = [r for r in records if r["impl"] == "jax" and r.get("mode") == "ssl"]
    if ssl:
        rows = ["| arch | patch | dtype | batch | crops (global/local x n) | examples/s | step ms | compile s | "
                "peak GiB | TFLOP/s | MFU (datasheet) |", "|" + "---|" * 11]
        for r in ssl:
            c = r["crops"]
            mfu = f"{r['mfu']:.0%}" if r.get("mfu") else ""
            rows.append(f"| {r['arch']} | {r['patch_size']} | {r['dtype']} | {r['batch']} | {c['global']}/"
                        f"{c['local']} x {c['n_local']} | {r['img_per_s']} | {r['step_ms']} | {r['compile_s']} | "
                        f"{_gib(r)} | {r['tflops']} | {mfu} |")
        parts.append("\n".join(rows))
    data = [r for r in records if r["impl"] == "grain"]
    if data:
        rows = ["| workload config | files | workers | batch | examples/s | per core | demand per core | "
                "headroom |", "|" + "---|" * 8]
        for r in data:
            rows.append(f"| {r.get('config', 'synthetic GZ2 folder')} | {r.get('files', r.get('source_px'))} | "
                        f"{r['num_workers']} | {r['batch']} | {r['img_per_s']} | "
                        f"{r.get('per_core_img_per_s', '')} | {r.get('demand_per_core', '')} | "
                        f"{r.get('headroom', '')} |")
        parts.append("\n".join(rows))
    missing = [r for r in records if r["impl"] in ("failed", "skipped")]
    if missing:
        parts.append("Not measured:\n\n" + "\n".join(f"- {r['item']}: {r['impl']} ({r['reason']})"
                                                       for r in missing))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render([json.loads(line) for line in f if line.startswith("{")]), end="")
        return []
    if args.plan:
        records = bench_plan(args)
        for r in records:
            print(json.dumps(r), flush=True)
        return records
    if args.save_stall:
        records = bench_save_stall(args)
        for r in records:
            print(json.dumps(r), flush=True)
        return records
    if args.data or args.heap:
        records = (bench_heap(args) if args.heap else bench_workload_data(args) if args.config
                   else bench_data(args))
        for r in records:
            print(json.dumps(r), flush=True)
    else:
        records = bench_models(args)
        if args.markdown:
            print(markdown_table(records), flush=True)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
