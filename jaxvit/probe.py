"""Embedding quality on frozen features: k-NN and a linear probe (the CIFAR-10 seed's embedding study).

    python -m jaxvit.probe --workdir=W [--checkpoint=best]      # a fine-tuned run: its data, splits and head
    python -m jaxvit.probe --pretrained=facebook/dinov2-base --source=tfds:cifar10 --tfds_data_dir=T \
        --image_size=224 --crop_ratio=1 --val_split='test[:5000]' --eval_split='test[5000:]'
    python -m jaxvit.probe --arch=dinov2_vits14 [--override=depth=2] --data_dir=D   # random init (a baseline)
        [--source=folder|csv|npz|tfds:NAME] [--tfds_data_dir=T]
        [--train_split=train] [--val_split=val] [--eval_split=test]
        [--pool=cls,cls_mean] [--k=3,10,20] [--temperature=0.07] [--l2=1e-6,1e-5,1e-4,1e-3,1e-2]
        [--output=probe_results.json]

Splits are read by `jaxvit.data.labelled.open_split` (`--source`, default folder; `--data_dir` is not needed for
tfds). A run (--workdir) brings its own data config (source, data_dir, tfds_data_dir, image size) and its
data.train_split, eval.val_split and eval.test_split as the defaults of the three split flags; its results go to
`W/probe/probe_results.{json,md}`, next to its eval reports, unless --output is given (the markdown table is
written next to --output too).

Features (CLS, or CLS with the mean patch token) of the train split fit the probes, which are scored on the eval
split. k-NN (the seed's protocol is the default: k=3 among 3,10,20, cosine, both pools): the k most
cosine-similar training images vote, each with weight exp(similarity / temperature), as DINO does
(--temperature=0: one vote each, scikit-learn's majority vote). Linear probe: multinomial logistic regression on
standardised features, L-BFGS (optax), L2 penalty chosen on the val split when there is one (otherwise the middle
of --l2). For a run, its own fine-tuned head is scored on the same features for comparison. The k-NN, the linear
probe and the features are `jaxvit.evals`' (which the training loop also runs as `knn` / `linear_probe` evaluators).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxvit import cli, inference, metrics, run_io
from jaxvit.data import labelled
from jaxvit.data.pipeline import default_data_config
from jaxvit.data.transforms import RGBExample, TransformConfig
from jaxvit.errors import ConfigError, DataError, MissingDataError, exit_on_user_error
from jaxvit.evals import features
from jaxvit.evals.features import pooled
from jaxvit.evals.knn import knn_predict
from jaxvit.evals.linear import fit_logistic, linear_probe  # noqa: F401 (part of this module's interface)
from jaxvit.models import ViT, get_config, load_pretrained, parse_overrides
from jaxvit.models.heads import Head

log = logging.getLogger("jaxvit")


# ------------------------------------------------------------------------------------------- features

def extract_features(vit: ViT, variables: dict, src: Any, data_cfg: Any, batch_size: int,
                     mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    """(CLS ++ mean patch token [N, 2D] float32, readable mask [N]); the CLS features are the first D columns."""
    return features.map_features(vit.cfg, variables, src, RGBExample(TransformConfig.from_config(data_cfg)),
                                 data_cfg, batch_size, mesh)


# ------------------------------------------------------------------------------------------- the study

def backbone_from_args(args: argparse.Namespace) -> tuple[ViT, dict, Any, dict, run_io.Run | None]:
    """(ViT, its variables, data config, description, the run when --workdir) for one of the three backbones.
    --source / --tfds_data_dir, when given, replace the run's."""
    if args.workdir:
        run = run_io.load_run(args.workdir, args.checkpoint, args.data_dir)
        vit, variables, data, about = (ViT(run.model.backbone), run.task.backbone_variables(run.variables),
                                       run.cfg.data, run_io.describe(run))
    else:
        run, data = None, default_data_config()
        data.data_dir, data.image_size, data.crop_ratio = args.data_dir or "", args.image_size, args.crop_ratio
        if args.pretrained:
            vit, params = load_pretrained(args.pretrained, **parse_overrides(args.override))
            variables, about = {"params": params}, {"pretrained": args.pretrained}
        else:
            vit = ViT(get_config(args.arch, **parse_overrides(args.override)))
            shape = (1, args.image_size, args.image_size, vit.cfg.num_channels)
            variables = {"params": jax.jit(vit.init)(jax.random.key(args.seed), jnp.zeros(shape))["params"]}
            about = {"arch": args.arch, "override": args.override, "random_init_seed": args.seed}
    for key in ("source", "tfds_data_dir"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if not data.data_dir and not data.source.startswith("tfds:"):
        raise ConfigError(f"source {data.source!r} reads files under --data_dir: pass --data_dir")
    return vit, variables, data, about, run


def split_names(args: argparse.Namespace, run: run_io.Run | None) -> dict[str, str]:
    """{role: split}: the flags, else the run's data.train_split / eval.val_split / eval.test_split, else
    train / val / test. An empty val split: none."""
    c = run.cfg if run else None
    names = {"train": args.train_split or (c.data.train_split if c else "") or "train",
             "eval": args.eval_split or (c.eval.test_split if c else "") or "test",
             "val": args.val_split if args.val_split is not None else c.eval.val_split if c else "val"}
    return {role: split for role, split in names.items() if split}


def open_splits(data_cfg: Any, splits: dict[str, str], classes: Sequence[str] | None) -> dict[str, Any]:
    """{role: source}, all with the train split's classes (or the run's); a val split that cannot be read is left
    out (the linear probe's L2 is then not swept)."""
    sources = {"train": labelled.open_split(data_cfg, splits["train"], classes)}
    sources["eval"] = labelled.open_split(data_cfg, splits["eval"], sources["train"].classes)
    if "val" in splits:
        try:
            sources["val"] = labelled.open_split(data_cfg, splits["val"], sources["train"].classes)
        except (MissingDataError, DataError) as e:  # absent (info), or present but unreadable (warning)
            log.log(logging.INFO if isinstance(e, MissingDataError) else logging.WARNING,
                    "val split left out (%s): the linear probe's L2 penalty is not swept", e)
    return sources


def _scores(y: np.ndarray, pred: np.ndarray, num_classes: int) -> dict:
    return {"accuracy": metrics.accuracy(y, pred), "f1_macro": metrics.macro_f1(y, pred, num_classes)}


def run_study(args: argparse.Namespace) -> dict:
    vit, variables, data_cfg, about, run = backbone_from_args(args)
    data_cfg.num_workers = args.num_workers
    if data_cfg.image_size % vit.cfg.patch_size:
        raise ConfigError(f"image size {data_cfg.image_size} is not a multiple of the patch size "
                          f"{vit.cfg.patch_size}; pass --image_size")
    sources = open_splits(data_cfg, split_names(args, run), run.classes if run else None)
    classes = sources["train"].classes
    run_cfg = run.cfg if run else None
    mesh = inference.run_mesh(run_cfg)
    variables = inference.place(variables, mesh, run_cfg)
    batch = inference.round_batch(args.batch_size, mesh)
    feats, labels = {}, {}
    for role, src in sources.items():
        f, ok = extract_features(vit, variables, src, data_cfg, batch, mesh)
        if not ok.all():
            log.warning("%s: %d unreadable images left out", src.split, int((~ok).sum()))
        feats[role], labels[role] = f[ok], src.labels[ok]
    n_cls = len(classes)
    ks = sorted({int(k) for k in args.k.split(",")})
    l2s = [float(v) for v in args.l2.split(",")]
    rows = []
    for pool in args.pool.split(","):
        train, test = pooled(feats["train"], pool), pooled(feats["eval"], pool)
        for k, pred in knn_predict(train, labels["train"], test, ks, args.temperature, n_cls).items():
            rows.append(dict(method="k-NN", pool=pool, k=k, temperature=args.temperature,
                             **_scores(labels["eval"], pred, n_cls)))
        val = (pooled(feats["val"], pool), labels["val"]) if "val" in feats else None
        pred, info = linear_probe((train, labels["train"]), test, n_cls, l2s, val, args.steps)
        rows.append(dict(method="linear probe", pool=pool, **info, **_scores(labels["eval"], pred, n_cls)))
    if run is not None:  # the run's own head on the same features
        m = run.model
        head = Head(m.num_outputs, tuple(m.head_hidden), norm=m.head_norm, act=m.head_act)
        head_vars = {col: tree["head"] for col, tree in run.variables.items() if "head" in tree}
        logits = head.apply(head_vars, pooled(feats["eval"], m.pool))
        rows.append(dict(method="fine-tuned head", pool=m.pool,
                         **_scores(labels["eval"], np.asarray(logits).argmax(-1), n_cls)))
    data = dict(source=data_cfg.source, location=sources["eval"].location)
    return dict(backbone=about, data=data, classes=classes, results=rows,
                splits={r: dict(split=src.split, images=int(len(labels[r]))) for r, src in sources.items()})


def _method(r: dict) -> str:
    if r["method"] == "k-NN":
        return f"k-NN (k={r['k']}, cosine" + (f", T={r['temperature']:g})" if r["temperature"] else ")")
    if r["method"] == "linear probe":
        return f"Linear probe (L2 {r['l2']:g})"
    return r["method"]


def _backbone(b: dict) -> str:
    if "workdir" in b:
        return f"run {b['workdir']}, checkpoint {b['checkpoint']}" + (" (EMA weights)" if b["ema"] else "")
    if "pretrained" in b:
        return f"pretrained {b['pretrained']}"
    return f"{b['arch']} randomly initialised (seed {b['random_init_seed']}" + (
        f", {b['override']})" if b["override"] else ")")


def table(result: dict) -> str:
    """The results as a markdown table, as in the CIFAR-10 seed."""
    ev = result["splits"]["eval"]
    lines = [f"Embedding study of {_backbone(result['backbone'])}: {result['data']['source']} split {ev['split']} "
             f"({ev['images']} images)", "",
             "| Method | Features | Accuracy | Macro F1 |", "|---|---|---|---|"]
    lines += [f"| {_method(r)} | {r['pool']} | {100 * r['accuracy']:.2f}% | {r['f1_macro']:.4f} |"
              for r in result["results"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = cli.parser("probe", __doc__)
    backbone = ap.add_mutually_exclusive_group(required=True)
    backbone.add_argument("--pretrained", help="transformers dir, hub id (e.g. facebook/dinov2-small) or original .pth")
    backbone.add_argument("--arch", help="preset name, randomly initialised")
    backbone.add_argument("--workdir", help="a fine-tuned run")
    cli.add_checkpoint(ap)
    cli.add_model_overrides(ap)
    ap.add_argument("--seed", type=int, default=0, help="random init of --arch")
    ap.add_argument("--source", default=None, help="folder | csv | npz | tfds:NAME (default: the run's, or folder)")
    ap.add_argument("--data_dir", default=None, help="default: the run's; not needed for tfds")
    ap.add_argument("--tfds_data_dir", default=None, help="where tfds datasets are prepared (default: the run's)")
    ap.add_argument("--image_size", type=int, default=224, help="not for --workdir (the run's is used)")
    ap.add_argument("--crop_ratio", type=float, default=0.875, help="not for --workdir (the run's is used)")
    ap.add_argument("--train_split", default=None, help="default: the run's data.train_split, or train")
    ap.add_argument("--val_split", default=None,
                    help="selects the linear probe's L2 ('' for none; default: the run's eval.val_split, or val)")
    ap.add_argument("--eval_split", default=None, help="default: the run's eval.test_split, or test")
    ap.add_argument("--pool", default="cls,cls_mean", help="feature poolings probed, comma-separated")
    ap.add_argument("--k", default="3,10,20", help="k-NN neighbour counts, comma-separated")
    ap.add_argument("--temperature", type=float, default=0.07, help="k-NN vote weight exp(sim/T); 0: majority")
    ap.add_argument("--l2", default="1e-6,1e-5,1e-4,1e-3,1e-2", help="linear probe L2 strengths tried")
    ap.add_argument("--steps", type=int, default=300, help="L-BFGS iterations")
    ap.add_argument("--batch_size", type=int, default=64, help="images per feature-extraction batch")
    ap.add_argument("--num_workers", type=int, default=2, help="grain worker processes")
    ap.add_argument("--output_dir", help="writes probe_results.json and probe_results.md here (default: W/probe "
                                         "for --workdir, else the current directory)")
    cli.deprecated(ap, "--output", "--output_dir (a directory)", dest="output")
    args = cli.parse(ap, argv)
    run_io.setup_logging()
    result = exit_on_user_error(run_study, args)
    default = Path(args.workdir, "probe") if args.workdir else Path()
    output = Path(args.output) if args.output else Path(args.output_dir or default) / "probe_results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    log.info("wrote %s and %s", output, output.with_suffix(".md"))
    return result


if __name__ == "__main__":
    main()
