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

import json
from pathlib import Path
from typing import Sequence

from jaxvit import cli, inference, report, run_io
from jaxvit.errors import exit_on_user_error
from jaxvit.evals.robustness import SEVERITY, corrupt, corrupted_probs, corruption_accuracies  # noqa: F401


def evaluate_corruptions(run: run_io.Run, src, corruptions: Sequence[str], severities: Sequence[int]) -> dict:
    """`corruption_accuracies` of a loaded run (its variables placed on its mesh)."""
    mesh = inference.run_mesh(run.cfg)
    return corruption_accuracies(run.task, run.model, inference.place(run.variables, mesh, run.cfg), src, mesh,
                                 corruptions, severities)


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
    ap.add_argument("--workdir", required=True, help="the trained run's directory (a classifier run)")
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
    if not run.task.classifier:
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
