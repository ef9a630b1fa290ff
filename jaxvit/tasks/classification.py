"""Image classification: labelled images from folders, CSV, npz or tfds (`data.source`), soft-target cross-entropy with label smoothing and MixUp / CutMix
in the step, accuracy / F1 / confusion-matrix reports, `classes.json`.

Config keys it reads: data.* (source, layout, transforms), train.label_smoothing, train.mixup_alpha,
train.cutmix_alpha, model.* (backbone, pool, head), eval.tta (evaluation and prediction average the probabilities
over the test-time views).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvit import metrics, report, tta
from jaxvit.data import labelled
from jaxvit.data.sources import load_image
from jaxvit.data.transforms import RGBExample, TransformConfig
from jaxvit.errors import DataError
from jaxvit.tasks.base import Task, apply_train, build_head_model, check_files

log = logging.getLogger("jaxvit")


class Classification(Task):
    name = "classification"
    classifier = True
    best_metric = "val/accuracy"
    best_mode = "max"
    history_metrics = ("loss", "accuracy", "f1_macro")
    history_aliases = {"accuracy": "acc", "f1_macro": "f1"}  # the GZ2 DINOv3 project's train_acc, val_acc, val_f1
    class_labels = True

    def __init__(self, cfg, workdir: str | Path | None = None):
        super().__init__(cfg, workdir)
        self._classes = list(cfg.data.classes) or None
        saved = Path(workdir) / "classes.json" if workdir else None
        if self._classes is None and saved is not None and saved.exists():
            self._classes = list(json.loads(saved.read_text()))

    @property
    def classes(self) -> list[str]:
        """Class names in label order: data.classes, else the run's classes.json, else the train split's."""
        if self._classes is None:
            self._classes = labelled.open_split(self.cfg.data, self.cfg.data.train_split).classes
        return self._classes

    # -- data
    def source(self, split: str):
        return labelled.open_split(self.cfg.data, split, self.classes)

    def prepare(self) -> None:
        super().prepare()
        if self.cfg.data.source.startswith("tfds:"):
            from jaxvit.data import tfds_source
            tfds_source.prepare(self.cfg.data.source[5:], self.cfg.data.tfds_data_dir, self.cfg.data.manual_dir)

    def train_transform(self) -> RGBExample:
        return RGBExample(TransformConfig.from_config(self.cfg.data), self.cfg.data.cache_dir)

    eval_transform = train_transform  # RGBExample without an rng is the eval transform

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        folders = {s: self.source(s) for s in splits}
        width = max(len(c) for c in self.classes)
        lines = ["class".ljust(width) + "".join(f"  {s:>8}" for s in splits)]
        lines += [c.ljust(width) + "".join(f"  {int(f.class_counts()[i]):>8}" for f in folders.values())
                  for i, c in enumerate(self.classes)]
        lines.append("total".ljust(width) + "".join(f"  {len(f):>8}" for f in folders.values()))
        log.info("data (%s):\n%s", ", ".join(f.location for f in folders.values()), "\n".join(lines))
        paths = [p for f in folders.values() if f.files for p in f.paths]
        if paths:
            check_files(self.cfg, paths, load_image, manifest)

    def run_files(self) -> dict[str, Any]:
        return {"classes.json": self.classes}

    # -- model and loss
    def build(self, rng: jax.Array):
        return build_head_model(self.cfg, len(self.classes), rng)

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array, step=None):
        t, k = self.cfg.train, len(self.classes)
        mix_rng, drop_rng = jax.random.split(rng)
        soft = soft_targets(batch["label"], k, t.label_smoothing)
        images, soft = mix(batch["image"], soft, mix_rng, t.mixup_alpha, t.cutmix_alpha)
        logits, updates = apply_train(model, variables, images, drop_rng)
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return cross_entropy(logits, soft), {"accuracy": accuracy}, updates

    # -- evaluation and prediction
    def score(self, outputs: np.ndarray, ok: np.ndarray, src, out_dir: Path | None = None,
              extra: dict | None = None) -> dict:
        return score(outputs, ok, src, out_dir, extra)

    def predict_fn(self, model) -> Callable:
        views = tuple(self.cfg.eval.tta)
        return lambda variables, images: tta_probabilities(model, variables, images, views)

    def export_extra(self, run, out: Path) -> None:
        from jaxvit import hf_classifier  # transformers' *ForImageClassification, when the head fits one
        hf_classifier.export_hf_classifier(run, out)

    def class_probabilities(self, model, variables: dict, images: jax.Array) -> jax.Array:
        return probabilities(model, variables, images)

    def describe_prediction(self, output: np.ndarray) -> dict:
        best = int(np.argmax(output))
        return {"class": self.classes[best], "prediction": self.classes[best],  # the CIFAR-10 project's name
                "class_index": best, "confidence": float(output[best]),
                "probabilities": {c: float(v) for c, v in zip(self.classes, output)}}

    def write_predictions(self, path: Path, paths: list[str], outputs: np.ndarray) -> None:
        report.write_predictions_csv(path, paths, None, outputs, self.classes)


# ------------------------------------------------------------------------------------------- maths

def probabilities(model, variables: dict, images: jax.Array) -> jax.Array:
    """Class probabilities [B, K] in float32: the one place jaxvit turns a classifier's logits into them."""
    return jax.nn.softmax(model.apply(variables, images).astype(jnp.float32), -1)


def tta_probabilities(model, variables: dict, images: jax.Array, views: tuple[str, ...] = ()) -> jax.Array:
    """`probabilities` averaged over the images and their test-time views (`jaxvit.tta`, eval.tta)."""
    return tta.average(lambda x: probabilities(model, variables, x), images, views)


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    one_hot = jax.nn.one_hot(labels, num_classes)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def mix(images: jax.Array, soft: jax.Array, rng: jax.Array, mixup_alpha: float, cutmix_alpha: float):
    """MixUp or CutMix (one of them, chosen per batch when both are on) with the batch rolled by one."""
    if not (mixup_alpha or cutmix_alpha):
        return images, soft
    k_choice, k_lam, k_box = jax.random.split(rng, 3)
    partner_images, partner_soft = jnp.roll(images, 1, axis=0), jnp.roll(soft, 1, axis=0)

    def mixup(_):
        lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
        return lam * images + (1 - lam) * partner_images, lam

    def cutmix(_):
        b, h, w, _ = images.shape
        lam = jax.random.beta(k_lam, cutmix_alpha, cutmix_alpha)
        cut_h, cut_w = (h * jnp.sqrt(1 - lam)).astype(jnp.int32), (w * jnp.sqrt(1 - lam)).astype(jnp.int32)
        cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
        lam = 1 - ((y1 - y0) * (x1 - x0)) / (h * w)  # the area actually kept
        return jnp.where(box, partner_images, images), lam

    if mixup_alpha and cutmix_alpha:
        mixed, lam = jax.lax.cond(jax.random.bernoulli(k_choice), mixup, cutmix, None)
    else:
        mixed, lam = (mixup if mixup_alpha else cutmix)(None)
    lam = lam.astype(soft.dtype)
    return mixed.astype(images.dtype), lam * soft + (1 - lam) * partner_soft


def cross_entropy(logits: jax.Array, soft: jax.Array) -> jax.Array:
    """Per-example cross-entropy against soft targets, in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), soft)


# ------------------------------------------------------------------------------------------- reports

def score(probs: np.ndarray, ok: np.ndarray, src, out_dir: Path | None = None,
          extra: dict | None = None) -> dict:
    """Metrics over the readable images (plus `extra` entries); with `out_dir`, also the report files
    `<split>_results.json`, `<split>_confusion_matrix{,_raw}.png`, `<split>_per_class_metrics.png`,
    `<split>_predictions.csv`."""
    classes = list(src.classes)
    if not ok.any():
        raise DataError(f"no readable image in split {src.split!r} ({src.location})")
    result = metrics.classification_metrics(probs[ok], src.labels[ok], classes)
    result["unreadable"] = [src.paths[i] for i in np.flatnonzero(~ok)]
    result.update(extra or {})
    if out_dir is not None:
        write_report(out_dir, src.split, result, classes, [src.paths[i] for i in np.flatnonzero(ok)],
                     src.labels[ok], probs[ok])
    return result


def write_report(out_dir: Path, split: str, result: dict, classes: list[str], paths, labels, probs) -> None:
    out_dir, split = Path(out_dir), report.stem(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_results_json(out_dir / f"{split}_results.json", result)
    cm = np.asarray(result["confusion_matrix"])
    report.plot_confusion_matrix(cm, classes, out_dir / f"{split}_confusion_matrix.png", normalize=True,
                                 title=f"{split}: normalised confusion matrix")
    report.plot_confusion_matrix(cm, classes, out_dir / f"{split}_confusion_matrix_raw.png", normalize=False,
                                 title=f"{split}: confusion matrix (counts)")
    report.plot_per_class_metrics(result["per_class"], classes, out_dir / f"{split}_per_class_metrics.png",
                                  title=f"{split}: per-class precision / recall / F1")
    report.write_predictions_csv(out_dir / f"{split}_predictions.csv", paths, labels, probs, classes)
