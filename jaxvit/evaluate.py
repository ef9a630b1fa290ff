"""Evaluate a trained run (or an ensemble of runs of one task) on a split; writes the task's report files.

    python -m jaxvit.evaluate --workdir=W --split=test [--checkpoint=best|final|latest|STEP]
        [--output_dir=D] [--batch_size=N] [--data_dir=DIR] [--tta=hflip,vflip,rot90,crops5]
    python -m jaxvit.evaluate --workdir=W1 --workdir=W2 ...      # ensemble: the runs' outputs averaged

Every task scores through `Task.outputs` -> `Task.score` (the path of the training loop's `task` evaluator, see
docs/evaluators.md); an ensemble's outputs come from `Task.ensemble_outputs` (cell_distance: the members' maps
averaged inside each batch; sar_grounding runs cannot form one).

Classification writes `<split>_results.json`, `<split>_confusion_matrix.png` (row-normalised),
`<split>_confusion_matrix_raw.png`, `<split>_per_class_metrics.png` and `<split>_predictions.csv` to
`W/eval_<split>/` (ensembles: `W1/eval_<split>_ensemble/`), and `W/training_curves.png` from the history;
regression writes results and predictions, biomass results and a submission CSV.
`--tta` replaces the run's eval.tta (test-time views, `jaxvit.tta`; an ensemble uses the first run's for all
members); the results JSON records the views used under "tta".
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax

from jaxvit import cli, inference, report, run_io, tta as tta_views
from jaxvit.errors import DataError, exit_on_user_error


def _load(workdir, checkpoint, data_dir, batch_size, tta) -> tuple[run_io.Run, object]:
    run = run_io.load_run(workdir, checkpoint, data_dir)
    if tta is not None:
        run.cfg.eval.tta = tta
    mesh = inference.run_mesh(run.cfg)
    run.cfg.eval.batch_size = inference.round_batch(batch_size or run.cfg.eval.batch_size, mesh)
    return run, mesh


def _check_same(first: tuple, run: run_io.Run, src, workdir, split: str) -> None:
    """Ensemble members must be the same task over the same examples (and classes)."""
    first_run, first_src = first
    if run.cfg.task != first_run.cfg.task:
        raise DataError(f"{workdir}: a {run.cfg.task!r} run cannot join an ensemble of {first_run.cfg.task!r} runs")
    if src.paths != first_src.paths or getattr(src, "classes", None) != getattr(first_src, "classes", None):
        raise DataError(f"{workdir}: images or classes of split {split!r} differ from the first run's; an ensemble "
                        "needs runs over the same data (pass --data_dir)")


def evaluate_runs(workdirs: Sequence[str | Path], split: str = "test", checkpoint: str | int = "best",
                  output_dir: str | Path | None = None, batch_size: int | None = None,
                  data_dir: str | None = None, tta: Sequence[str] | None = None) -> dict:
    """Evaluate one run, or an ensemble of runs of one task (the mean of their outputs: class probabilities,
    regression values, masses), on `split`;
    writes the report files on process 0 and returns the metrics. Each run preprocesses with its own config;
    `tta` (test-time views) replaces the runs' eval.tta."""
    tta = None if tta is None else tta_views.check(tta)
    ensemble = len(workdirs) > 1
    if output_dir is None:
        output_dir = Path(workdirs[0]) / (f"eval_{report.stem(split)}" + ("_ensemble" if ensemble else ""))
    out = output_dir if jax.process_index() == 0 else None
    if not ensemble:
        run, mesh = _load(workdirs[0], checkpoint, data_dir, batch_size, tta)
        result = run.task.evaluate(run.model, inference.place(run.variables, mesh, run.cfg), split, mesh, out,
                                   extra=dict(split=split, models=[run_io.describe(run)]))
    else:
        members, models, first = [], [], None
        for workdir in workdirs:
            run, run_mesh = _load(workdir, checkpoint, data_dir, batch_size, tta)
            tta = tuple(run.cfg.eval.tta)  # the first run's views for every member
            src = run.task.source(split)
            if first is None:
                first, mesh = (run, src), run_mesh
            else:
                _check_same(first, run, src, workdir, split)
            members.append((run.task, run.model, inference.place(run.variables, run_mesh, run.cfg)))
            models.append(run_io.describe(run))
        run, src = first
        outputs, ok = run.task.ensemble_outputs(members, src, mesh)
        result = run.task.score(outputs, ok, src, out, dict(split=split, models=models, tta=list(tta)))
    if jax.process_index() == 0:
        for workdir in workdirs:
            history = Path(workdir) / "training_history.csv"
            if history.exists():
                report.plot_training_curves(history, Path(workdir) / "training_curves.png",
                                            run.task.history_aliases.values())
    return result


def summary(result: dict) -> str:
    scalars = [f"{k:<18} {v:.4f}" for k, v in result.items() if isinstance(v, float)]
    lines = scalars
    if "per_class" in result:
        lines += ["", f"{'class':<28} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        lines += [f"{c:<28} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8d}"
                  for c, m in result["per_class"].items()]
    if result.get("unreadable"):
        lines += ["", f"{len(result['unreadable'])} unreadable images skipped:"] + result["unreadable"][:20]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = cli.parser("evaluate", __doc__)
    ap.add_argument("--workdir", action="append", required=True, help="run directory; repeat for an ensemble")
    ap.add_argument("--split", default="test", help="the split to evaluate (a directory / split of the data)")
    cli.add_checkpoint(ap)
    ap.add_argument("--output_dir", default=None, help="default: <workdir>/eval_<split>")
    ap.add_argument("--batch_size", type=int, default=None, help="default: the run's eval.batch_size")
    ap.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
    ap.add_argument("--tta", type=tta_views.from_flag, default=None,
                    help=f"test-time views, comma-separated, of {', '.join(tta_views.VIEWS)} ('' = none); "
                         "default: the run's eval.tta")
    args = cli.parse(ap, argv)
    run_io.setup_logging()
    result = exit_on_user_error(evaluate_runs, args.workdir, args.split, args.checkpoint, args.output_dir,
                                args.batch_size, args.data_dir, args.tta)
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
