"""Inference with a trained run of an image-level task (class probabilities, regression values): one image, a
directory, or Python (`Predictor`); attention-map overlays. Tasks with image outputs (`Task.predict_files`: e.g.
generated optical tiles) write one set of files per input into the directory --output instead.

    python -m jaxvit.predict --workdir=W --image=galaxy.jpg --output=prediction.json
    python -m jaxvit.predict --workdir=W --image_dir=images/ --output=predictions.csv --batch_size=32 \
        [--checkpoint=best] [--attention_dir=attn/ --attention_max=16] [--tta=hflip,vflip]

    from jaxvit.predict import Predictor
    p = Predictor.from_workdir("runs/gz2")
    p.predict("galaxy.jpg")            # {"class": "spiral", "confidence": 0.97, "probabilities": {...}, ...}
    p.predict_batch(["a.png", "b.png"])
    p.benchmark(256)                   # {"images_per_s": ..., ...}

Outputs are averaged over the test-time views of the run's eval.tta (`jaxvit.tta`), or of `--tta` / `tta=`.
Unreadable files never stop a run: they come back as {"path", "error"} and are listed next to the output
(`<output stem>_unreadable.csv`).
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence, Union

import jax
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from jaxvit import cli, run_io, tta as tta_views, xla_options
from jaxvit.data.sources import ImageLoadError, list_images, load_image
from jaxvit.data.transforms import TransformConfig
from jaxvit.errors import UserError, exit_on_user_error
from jaxvit.evals import features
from jaxvit.tasks.base import Task

log = logging.getLogger("jaxvit")

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def to_rgb8(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3) from a path (decoded like the training data), a PIL image or a uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr


class Predictor:
    """A trained model with its preprocessing: images in, the task's outputs (class probabilities, regression
    values) out, in fixed-size jitted batches."""

    def __init__(self, model: Any, variables: dict, task: Task, data_cfg: Any, batch_size: int = 32,
                 info: dict | None = None):
        self.model, self.task, self.batch_size = model, task, batch_size
        self.tcfg = TransformConfig.from_config(data_cfg)
        self._transform = task.eval_transform()
        self.variables = jax.device_put(variables)
        self.info = info or {}
        self._outputs = xla_options.jit(task.predict_fn(model))
        vit = task.backbone_module(model)
        attention = None if vit is None else features.attention_fn(vit.cfg)
        self._attention = None if vit is None else (lambda v, x: attention(task.backbone_variables(v), x))

    @classmethod
    def from_workdir(cls, workdir: str | Path, checkpoint: str | int = "best", batch_size: int = 32,
                     tta: Sequence[str] | None = None) -> Predictor:
        """The run's model; `tta` (test-time views) replaces the run's eval.tta."""
        tta = None if tta is None else tta_views.check(tta)
        return cls.from_run(run_io.load_run(workdir, checkpoint), batch_size, tta)

    @classmethod
    def from_run(cls, run: run_io.Run, batch_size: int = 32, tta: Sequence[str] | None = None) -> Predictor:
        """A loaded run's model; `tta` (checked test-time views) replaces the run's eval.tta."""
        if tta is not None:
            run.cfg.eval.tta = tta
        return cls(run.model, run.variables, run.task, run.cfg.data, batch_size, run_io.describe(run))

    # -- preprocessing
    def preprocess(self, image: ImageLike) -> np.ndarray:
        """Normalised float32 (S, S, 3): the task's evaluation transform (e.g. resize, centre crop, normalise)."""
        return self._transform({"image": to_rgb8(image)})["image"]

    def _load_all(self, images: Sequence[ImageLike]) -> list[np.ndarray | str]:
        """Preprocessed images, or the reason an image could not be read, decoded in threads."""
        def one(image):
            try:
                return self.preprocess(image)
            except (ImageLoadError, ValueError) as e:
                return getattr(e, "reason", str(e))
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(one, images))

    def _padded(self, xs: list[np.ndarray]) -> np.ndarray:
        """A batch padded to `batch_size` rows, so every call reuses one compiled program."""
        batch = np.zeros((self.batch_size, *xs[0].shape), np.float32)
        batch[:len(xs)] = np.stack(xs)
        return batch

    # -- prediction
    def _batched(self, fn, xs: np.ndarray) -> np.ndarray:
        """fn(variables, batch) over preprocessed images [N, S, S, 3] in padded batches, concatenated."""
        chunks = [xs[i:i + self.batch_size] for i in range(0, len(xs), self.batch_size)]
        return np.concatenate([np.asarray(fn(self.variables, self._padded(list(c))))[:len(c)] for c in chunks])

    def outputs(self, xs: np.ndarray) -> np.ndarray:
        """The task's outputs [N, K] (class probabilities, regression values) of preprocessed images [N, S, S, 3]."""
        return self._batched(self._outputs, xs)

    def _result(self, p: np.ndarray) -> dict:
        return self.task.describe_prediction(p)

    def raw_outputs(self, images: Sequence[ImageLike]) -> list[np.ndarray | str]:
        """Per input, in order: the task's output vector, or the reason the input could not be read."""
        results: list[np.ndarray | str] = []
        for start in range(0, len(images), self.batch_size):  # bounded memory for long lists
            xs = self._load_all(images[start:start + self.batch_size])
            good = [x for x in xs if not isinstance(x, str)]
            outs = iter(self.outputs(np.stack(good)) if good else ())
            results += [x if isinstance(x, str) else next(outs) for x in xs]
        return results

    def predict_batch(self, images: Sequence[ImageLike]) -> list[dict]:
        """One dict per input, in order: the task's record (a classifier's: {class, class_index, confidence,
        probabilities}) (+ path for paths), or {error} (+ path) for an input that could not be read."""
        return [({"path": str(image)} if isinstance(image, (str, os.PathLike)) else {})
                | ({"error": y} if isinstance(y, str) else self._result(y))
                for image, y in zip(images, self.raw_outputs(images))]

    def predict(self, image: ImageLike) -> dict:
        return self.predict_batch([image])[0]

    def warmup(self) -> None:
        """Compile the forward pass (the first call otherwise pays for it)."""
        size = self.tcfg.image_size
        self.outputs(np.zeros((1, size, size, 3), np.float32))

    def benchmark(self, n: int = 256) -> dict:
        """Model throughput on random preprocessed batches (decoding excluded), after compilation."""
        self.warmup()
        size, steps = self.tcfg.image_size, max(1, -(-n // self.batch_size))
        batch = jax.device_put(np.random.default_rng(0).standard_normal(
            (self.batch_size, size, size, 3)).astype(np.float32))
        start = time.perf_counter()
        for _ in range(steps):
            out = self._outputs(self.variables, batch)
        out.block_until_ready()
        elapsed = time.perf_counter() - start
        ips = steps * self.batch_size / elapsed
        return {"images_per_s": ips, "fps": ips, "ms_per_batch": 1e3 * elapsed / steps,  # fps: ProductionModel's
                "batch_size": self.batch_size, "images": steps * self.batch_size,
                "device": jax.devices()[0].device_kind}

    # -- attention
    def attention_maps(self, xs: np.ndarray) -> np.ndarray:
        """Last-block CLS attention of each head over the patch grid: [N, heads, S/p, S/p]."""
        if self._attention is None:
            raise UserError(f"the {self.task.name} task's model has no ViT backbone: no attention maps")
        return self._batched(self._attention, xs)

    def save_attention(self, image: ImageLike, path: str | Path, title: str = "") -> np.ndarray:
        """PNG of the image with its mean and per-head attention maps overlaid; returns the maps."""
        x = self.preprocess(image)
        maps = self.attention_maps(x[None])[0]
        shown = np.clip(x * np.asarray(self.tcfg.std) + np.asarray(self.tcfg.mean), 0, 1)
        plot_attention(shown, maps, path, title or json.dumps(self._result(self.outputs(x[None])[0]))[:80])
        return maps


def plot_attention(image: np.ndarray, maps: np.ndarray, path: str | Path, title: str = "", cols: int = 6) -> None:
    """The image, then the head-mean and each head's map (rescaled to [0, 1]) overlaid on it."""
    panels = [("image", None), ("mean of heads", maps.mean(0))] + [(f"head {h}", m) for h, m in enumerate(maps)]
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(2.2 * min(cols, len(panels)), 2.4 * rows))
    size = image.shape[0]
    for i, (name, m) in enumerate(panels):
        ax = fig.add_subplot(rows, min(cols, len(panels)), i + 1)
        ax.imshow(image)
        if m is not None:
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
            up = np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
            ax.imshow(up, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------- command line

def _write_unreadable(output: Path, bad: list[dict]) -> Path:
    path = output.with_name(output.stem + "_unreadable.csv")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows([r["path"], r["error"]] for r in bad)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = cli.parser("predict", __doc__)
    ap.add_argument("--workdir", required=True, help="the trained run's directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image: writes JSON")
    src.add_argument("--image_dir", help="every image below this directory: writes CSV")
    ap.add_argument("--output", required=True, help="a file: R.json for --image, R.csv for --image_dir (a "
                                                    "directory for tasks whose outputs are images)")
    cli.add_checkpoint(ap)
    ap.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    ap.add_argument("--attention_dir", default=None, help="also write attention-map overlays (PNG) here")
    ap.add_argument("--attention_max", type=int, default=16, help="at most this many overlays")
    ap.add_argument("--tta", type=tta_views.from_flag, default=None,
                    help=f"test-time views, comma-separated, of {', '.join(tta_views.VIEWS)} ('' = none); "
                         "default: the run's eval.tta")
    args = cli.parse(ap, argv)
    tta = None if args.tta is None else exit_on_user_error(tta_views.check, args.tta)
    run_io.setup_logging()
    paths = [Path(args.image)] if args.image else list_images(Path(args.image_dir))
    run = exit_on_user_error(run_io.load_run, args.workdir, args.checkpoint)
    records = exit_on_user_error(run.task.predict_files, run.model, run.variables, paths, Path(args.output),
                                 args.batch_size)
    if records is not None:  # a task with image outputs wrote its files
        print(f"{sum('error' not in r for r in records)} of {len(records)} inputs predicted -> {args.output}")
        return records
    predictor = Predictor.from_run(run, args.batch_size, tta)
    predictor.warmup()
    start = time.perf_counter()
    outputs = predictor.raw_outputs(paths)
    elapsed = time.perf_counter() - start
    results = [{"path": str(p)} | ({"error": y} if isinstance(y, str) else predictor._result(y))
               for p, y in zip(paths, outputs)]
    good = [r for r in results if "error" not in r]
    bad = [r for r in results if "error" in r]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.image:
        record = results[0] | {"model": predictor.info, "tta": list(predictor.task.cfg.eval.tta)}
        output.write_text(json.dumps(record, indent=2) + "\n")
    else:
        kept = [(str(p), y) for p, y in zip(paths, outputs) if not isinstance(y, str)]
        predictor.task.write_predictions(output, [p for p, _ in kept],
                                         np.stack([y for _, y in kept]) if kept else np.zeros((0, 1)))
    if bad:
        where = _write_unreadable(output, bad) if args.image_dir else output
        log.warning("%d unreadable images (listed in %s): %s", len(bad), where,
                    "; ".join(f"{r['path']}: {r['error']}" for r in bad[:10]))
    if args.attention_dir:
        for r in good[:args.attention_max]:
            label = f"{r['class']} ({r['confidence']:.2f})" if "class" in r else ""
            predictor.save_attention(r["path"], Path(args.attention_dir) / f"{Path(r['path']).stem}_attention.png",
                                     f"{Path(r['path']).name}: {label}")
    print(f"{len(good)} images predicted ({len(bad)} unreadable) in {elapsed:.2f} s: "
          f"{len(results) / max(elapsed, 1e-9):.1f} images/s (decoding included) -> {output}")
    return results


if __name__ == "__main__":
    main()
