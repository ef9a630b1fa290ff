"""Accuracy under synthetic corruptions (the CIFAR-10 seed's out-of-distribution table).

    python -m jaxvit.robustness --workdir=W [--split=test] [--checkpoint=best] [--severities=1,2,3,4,5]
        [--corruptions=gaussian_noise,brightness,blur,contrast] [--output_dir=W/robustness_<split>]

Corruptions act on the evaluation image (after resize and crop) in [0, 1] RGB, inside the jitted forward pass,
with ImageNet-C's parameters per severity 1..5: gaussian_noise adds N(0, s^2) noise, brightness adds a
constant, contrast scales about the image mean, blur is a Gaussian blur (sigma in pixels at 224 px, scaled
with the image size); results are clipped to [0, 1]. Noise is seeded per image, so runs repeat exactly.
Writes robustness.json (`drop` = clean - mean accuracy) and robustness.md (a markdown table: accuracy per
severity, mean, change from clean).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import cli, inference, metrics, report, run_io
from jaxvit.errors import exit_on_user_error
from jaxvit.tasks import classification

SEVERITY = {  # ImageNet-C (Hendrycks & Dietterich 2019) parameters for severities 1..5
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
}


def _blur_matrix(n: int, sigma: jax.Array) -> jax.Array:
    """(n, n) matrix of a 1-D Gaussian blur with mirrored borders (rows sum to 1); sigma may be traced."""
    taps = jnp.arange(-(n - 1), n)
    w = jnp.exp(-0.5 * (taps / sigma) ** 2)
    w = w / w.sum()
    rows = jnp.arange(n)[:, None]
    cols = jnp.mod(rows + taps[None, :], 2 * n)
    cols = jnp.where(cols >= n, 2 * n - 1 - cols, cols)  # -1 -> 0, n -> n - 1 (edge repeated)
    return jnp.zeros((n, n), jnp.float32).at[jnp.broadcast_to(rows, cols.shape), cols].add(
        jnp.broadcast_to(w, cols.shape))


def corrupt(x: jax.Array, name: str, s: jax.Array, keys: jax.Array) -> jax.Array:
    """Corrupted copy of images x [B, H, W, 3] in [0, 1] with parameter `s` (see SEVERITY); `keys` [B] seed
    the per-image noise."""
    if name == "gaussian_noise":
        y = x + s * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    elif name == "brightness":
        y = x + s
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        y = (x - mean) * s + mean
    elif name == "blur":
        h, w = x.shape[1:3]
        y = jnp.einsum("ij,bjwc->biwc", _blur_matrix(h, s * h / 224), x)
        y = jnp.einsum("kw,biwc->bikc", _blur_matrix(w, s * w / 224), y)
    else:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(SEVERITY)}")
    return jnp.clip(y, 0.0, 1.0)


def corrupted_probs(model, mean: Sequence[float], std: Sequence[float], name: str | None, seed: int = 0) -> Callable:
    """fn((variables, parameter), batch) -> probabilities of batch["image"] (normalised), corrupted in [0, 1]
    space first. The parameter is an input, so all severities of a corruption share one compiled program."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def fn(inputs, batch):
        (variables, s), x = inputs, batch["image"]
        if name is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch["index"])
            x = (corrupt(x * std + mean, name, s, keys) - mean) / std
        return classification.probabilities(model, variables, x)
    return fn


def evaluate_corruptions(run: run_io.Run, src, corruptions: Sequence[str],
                         severities: Sequence[int]) -> dict:
    """{"clean": accuracy, "accuracy": {corruption: {severity: accuracy}}, ...} over the readable images."""
    unknown = sorted(set(corruptions) - set(SEVERITY))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; known: {', '.join(SEVERITY)}")
    mesh, d = inference.run_mesh(run.cfg), run.cfg.data
    variables = inference.place(run.variables, mesh, run.cfg)
    batch_size = inference.round_batch(run.cfg.eval.batch_size, mesh)

    def accuracies(name: str | None, params: Sequence[float]) -> list[float]:
        fn = corrupted_probs(run.model, d.mean, d.std, name)
        out = []
        for s in params:
            probs, ok = inference.map_source(fn, (variables, np.float32(s)), src, run.task.eval_transform(), d,
                                             batch_size, mesh)
            out.append(metrics.accuracy(src.labels[ok], probs[ok].argmax(-1)))
        return out

    clean = accuracies(None, [0.0])[0]
    table = {c: dict(zip(map(int, severities), accuracies(c, [SEVERITY[c][s - 1] for s in severities])))
             for c in corruptions}
    means = {c: float(np.mean(list(v.values()))) for c, v in table.items()}
    return dict(clean=clean, accuracy=table, mean=means, drop={c: clean - m for c, m in means.items()},
                mean_corrupted=float(np.mean(list(means.values()))) if means else None,
                severity_parameters={c: SEVERITY[c] for c in corruptions})


def markdown(result: dict) -> str:
    severities = sorted({s for v in result["accuracy"].values() for s in v})
    head = "| Corruption | " + " | ".join(f"s{s}" for s in severities) + " | Mean | vs clean |"
    lines = [head, "|" + "---|" * (len(severities) + 3),
             "| clean | " + " | ".join("" for _ in severities) + f" | {100 * result['clean']:.2f}% | - |"]
    for c, accs in result["accuracy"].items():
        cells = " | ".join(f"{100 * accs[s]:.2f}%" for s in severities)
        lines.append(f"| {c} | {cells} | {100 * result['mean'][c]:.2f}% | {100 * (result['mean'][c] - result['clean']):+.2f} pp |")
    if result["mean_corrupted"] is not None:
        lines.append(f"\nMean accuracy under corruption: {100 * result['mean_corrupted']:.2f}% "
                     f"(clean {100 * result['clean']:.2f}%)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = cli.parser("robustness", __doc__)
    ap.add_argument("--workdir", required=True, help="the trained run's directory (a classification run)")
    ap.add_argument("--split", default="test", help="the split corrupted and evaluated")
    cli.add_checkpoint(ap)
    ap.add_argument("--corruptions", default=",".join(SEVERITY), help="corruptions, comma-separated")
    ap.add_argument("--severities", default="1,2,3,4,5", help="severities 1..5, comma-separated")
    ap.add_argument("--output_dir", default=None, help="default: <workdir>/robustness_<split>")
    ap.add_argument("--batch_size", type=int, default=None, help="default: the run's eval.batch_size")
    ap.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
    args = cli.parse(ap, argv)
    run_io.setup_logging()
    run = exit_on_user_error(run_io.load_run, args.workdir, args.checkpoint, args.data_dir)
    if not isinstance(run.task, classification.Classification):
        raise SystemExit(f"error: robustness measures accuracy; {args.workdir} is a {run.cfg.task!r} run")
    run.cfg.eval.batch_size = args.batch_size or run.cfg.eval.batch_size
    src = run.task.source(args.split)
    severities = [int(s) for s in args.severities.split(",")]
    if not all(1 <= s <= 5 for s in severities):
        raise SystemExit(f"--severities must lie in 1..5, got {args.severities}")
    result = evaluate_corruptions(run, src, args.corruptions.split(","), severities)
    result.update(split=args.split, model=run_io.describe(run))
    out = Path(args.output_dir or Path(args.workdir) / f"robustness_{report.stem(args.split)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "robustness.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
