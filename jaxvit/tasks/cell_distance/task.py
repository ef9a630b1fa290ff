"""Cell instance segmentation by distance-map regression (DINOCell): `config.task="cell_distance"`.

Data: `<data.data_dir>/<split>/{images,masks}/`, LIVECell's COCO files or Cellpose pairs (`data.py`);
`data.demo="cells"` renders synthetic Cell Painting sites in LIVECell's layout (`jaxvit.demos.cells`).
Model: backbone + U-Net decoder (`model.py`); the backbone is frozen (train.freeze_backbone), LoRA-adapted
(lora.enabled) or fine-tuned, as for classification; the decoder is the task's head (`params/head/`, BatchNorm
statistics in `batch_stats/head/`). Loss: MSE between the sigmoid map and the per-cell normalised distance
transform of the mask (`targets.py`).

Evaluation and prediction see each image whole on the evaluation canvas: overlapping data.image_size tiles
(cell_distance.tile_overlap apart at least; the training crop size, so cells keep their scale) blended with
weights falling towards the tile edges, as DINOCell's sliding window. Evaluation runs batch by batch: each
process post-processes its share of every gathered batch (`postprocess.py`) and keeps only per-image counts
(`metrics.py`), summed over processes at the end, so no split's maps are ever held. Metrics: ap50 (the best
checkpoint's), ap (mean over IoU 0.5:0.95), ap75, f1, precision, recall, mean_iou, and loss = the map MSE.
Reports: `<split>_results.json`, `<split>_per_image.csv`. `jaxvit.predict --image_dir=I --output=D` writes, per
image, the distance map (16-bit PNG, map x 65535) and the cell label image into D, listed in D/predictions.csv.
"""
from __future__ import annotations

import collections
import csv
import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jaxvit import inference, xla_options
from jaxvit.data import holdout
from jaxvit.data.decode import load_array
from jaxvit.data.sources import ImageLoadError
from jaxvit.errors import ConfigError, DataError
from jaxvit.tasks.base import Task, apply_train, build_head_model, check_files, finish_score
from jaxvit.tasks.cell_distance import metrics
from jaxvit.tasks.cell_distance.data import CellExample, PairedSource, load_mask
from jaxvit.tasks.cell_distance.model import CHANNELS, CellDistanceModel, default_layers
from jaxvit.tasks.cell_distance.postprocess import FILL_THRESHOLD, PEAK_THRESHOLD, instances

log = logging.getLogger("jaxvit")


class CellDistance(Task):
    name = "cell_distance"
    export_refusal = ("its distance-map decoder is jaxvit-only; `jaxvit predict` writes the maps and instance "
                      "masks")
    best_metric = "val/ap50"
    best_mode = "max"
    history_metrics = ("loss", "ap50", "ap", "f1", "mean_iou")

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.layers = ()  # backbone blocks feeding the decoder; () = DINOCell's for the depth (model.default_layers)
        c.decoder_channels = CHANNELS  # decoder widths, deepest feature first (one per layer)
        c.norm_layers = True  # the blocks' tokens through the backbone's final norm
        c.peak_threshold = PEAK_THRESHOLD  # map > this: cell markers (DINOCell's cells_max)
        c.fill_threshold = FILL_THRESHOLD  # map > this: the region the watershed fills (cell_fill)
        c.channels = ()  # image channels to use, by index (e.g. (4,) for one stain); () = all
        c.channel_mode = "average"  # average | first3 | all: channels -> backbone input (data.py)
        c.clahe = False  # CLAHE on each input channel (DINOCell's preprocessing)
        c.scale_range = (1.0, 1.0)  # train: zoom factors (window = data.image_size / s source pixels)
        c.brightness = 0.0  # train: intensity x U(1 - b, 1 + b)
        c.invert_prob = 0.0  # train: probability of inverting the intensities
        c.eval_size = 0  # evaluation / prediction canvas side (>= the largest image); 0 = data.image_size
        c.tile_overlap = 32  # evaluation / prediction: minimum overlap of data.image_size tiles (px)
        c.coco_json = ""  # COCO polygons per split ({split}), relative to data_dir; "" = livecell_coco_{split}.json if found
        return c

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        s, out = cfg.cell_distance, []
        if cfg.eval.tta:
            out.append(f"eval.tta={tuple(cfg.eval.tta)}: test-time views are not supported by the "
                       "cell_distance task; leave eval.tta empty")
        for key in ("peak_threshold", "fill_threshold"):
            if not 0 <= s[key] < 1:
                out.append(f"cell_distance.{key}={s[key]!r}: must lie in [0, 1)")
        if not 0 <= s.tile_overlap < cfg.data.image_size:
            out.append(f"cell_distance.tile_overlap={s.tile_overlap}: must lie in [0, data.image_size)")
        return out

    def __init__(self, cfg, workdir: str | Path | None = None):
        super().__init__(cfg, workdir)
        self._sources: dict[str, PairedSource] = {}
        self._in_channels = cfg.model.overrides.get("num_channels", 3)  # the backbone's, fixed by build()
        self.train_transform()  # checks channel_mode, scale_range, data.mean / std now

    # -- data
    def source(self, split: str) -> PairedSource:
        if split not in self._sources:
            data, coco = self.cfg.data, self.cfg.cell_distance.coco_json
            if data.val_fraction and split in ("val", data.train_split):  # validation held out of train
                train = PairedSource(data.data_dir, data.train_split, coco)
                self._sources[split] = holdout.split_off(train, data.val_fraction, split)
            else:
                self._sources[split] = PairedSource(data.data_dir, split, coco)
        return self._sources[split]

    def prepare(self) -> None:
        """data.demo="cells": the synthetic Cell Painting sites in LIVECell's layout (COCO polygons)."""
        if self.cfg.data.demo == "cells":
            from jaxvit.demos.cells import write_livecell
            write_livecell(self.cfg.data.data_dir, self.cfg.seed)
        else:
            super().prepare()

    def train_transform(self) -> CellExample:
        s, d = self.cfg.cell_distance, self.cfg.data
        return CellExample(d.image_size, max(s.eval_size, d.image_size), self._in_channels, tuple(d.mean), tuple(d.std),
                           tuple(s.channels), s.channel_mode, s.clahe, d.aug.hflip, d.aug.vflip, d.aug.rot90,
                           tuple(s.scale_range), s.brightness, s.invert_prob, d.cache_dir)

    eval_transform = train_transform  # CellExample without an rng is the eval transform

    def preflight(self, splits: tuple[str, ...], manifest: Path | None) -> None:
        sources = [self.source(s) for s in splits]
        log.info("data: %s", ", ".join(f"{s.split} {len(s)} image/mask pairs ({s.location})" for s in sources))
        masks = {p: m for s in sources for p, m in zip(s.paths, s.mask_paths)}
        check_files(self.cfg, list(masks), functools.partial(check_pair, masks), manifest)

    # -- model and loss
    def build(self, rng: jax.Array) -> tuple[CellDistanceModel, dict]:
        s = self.cfg.cell_distance

        def make_model(vit, *_):  # given the Classifier's fields; the decoder needs the backbone's config alone
            layers = tuple(s.layers) or default_layers(vit.depth)
            if any(not -vit.depth <= i < vit.depth for i in layers) or len(layers) != len(s.decoder_channels):
                raise ConfigError(f"cell_distance.layers={layers}: need one block index in [0, {vit.depth}) per "
                                  f"decoder width of cell_distance.decoder_channels={tuple(s.decoder_channels)}")
            log.info("cell_distance: decoder over blocks %s of %d", list(layers), vit.depth)
            self._in_channels = vit.num_channels
            return CellDistanceModel(vit, layers, tuple(s.decoder_channels), s.norm_layers)

        # An "rbg" key: XLA's CPU compile of the decoder's initialisers takes ~10x longer with threefry keys.
        rbg = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(rng), 2), impl="rbg")
        return build_head_model(self.cfg, 1, rbg, make_model)

    def loss(self, model, variables: dict, batch: dict, rng: jax.Array, step=None):
        pred, updates = apply_train(model, variables, batch["image"], rng)
        err = pred - batch["target"]
        return (err ** 2).mean((1, 2)), {"mae": jnp.abs(err).mean((1, 2))}, updates

    # -- evaluation and prediction
    def predict_fn(self, model) -> Callable:
        size, overlap = self.cfg.data.image_size, self.cfg.cell_distance.tile_overlap
        return lambda variables, images: tiled_map(model, variables, images, size, overlap)

    def outputs(self, model, variables, src, mesh) -> tuple[np.ndarray, np.ndarray]:
        """Per-image match counts [N, metrics.WIDTH] (`image_counts`), reduced per batch from the predicted maps
        (each process segments its share of a batch); the maps themselves are not kept."""
        return self._counts(_eval_fn(self, model), variables, src, mesh)

    def ensemble_outputs(self, members: list, src, mesh) -> tuple[np.ndarray, np.ndarray]:
        """The counts of the members' mean map (averaged inside each batch; this run's preprocessing for all)."""
        fn = _ensemble_fn(tuple((task, model) for task, model, _ in members))
        return self._counts(fn, tuple(v for _, _, v in members), src, mesh)

    def _counts(self, fn: Callable, variables: Any, src, mesh) -> tuple[np.ndarray, np.ndarray]:
        counts = np.zeros((len(src), metrics.WIDTH))
        ok = np.zeros(len(src), bool)
        me, n_proc = jax.process_index(), jax.process_count()
        for out, index, mask in inference.batches(fn, variables, src, self.eval_transform(), self.cfg.data,
                                                  self.cfg.eval.batch_size, mesh):
            rows = np.flatnonzero(mask)
            ok[index[rows]] = True
            for r in rows[me::n_proc]:  # each process post-processes its share of the batch
                counts[index[r]] = self.image_counts(out["map"][r], out["labels"][r], out["target"][r])
        if n_proc > 1:
            from jax.experimental import multihost_utils
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        return counts, ok

    def score(self, outputs: np.ndarray, ok: np.ndarray, src, out_dir: Path | None = None,
              extra: dict | None = None) -> dict:
        """AP50, AP, F1, mean IoU, MSE (= loss) over the readable images, from their summed counts."""
        if not ok.any():
            raise DataError(f"no readable image/mask pair in split {src.split!r} ({src.location})")
        result = metrics.summarise(outputs[ok])
        result["loss"] = result["mse"]
        return finish_score(result, src, ok, {"thresholds": self._thresholds()} | (extra or {}), out_dir, "per_image",
                            lambda path: write_per_image(path, src, outputs, ok))

    def _thresholds(self) -> dict:
        s = self.cfg.cell_distance
        return {"peak": s.peak_threshold, "fill": s.fill_threshold}

    def segment(self, dist_map: np.ndarray) -> np.ndarray:
        """Cell labels [h, w] of a predicted map, cut to its valid (non-padding) part."""
        t = self._thresholds()
        return instances(valid_part(dist_map), t["peak"], t["fill"])

    def image_counts(self, dist_map: np.ndarray, labels: np.ndarray, target: np.ndarray) -> np.ndarray:
        """metrics.image_counts of one image, with the map's squared error and pixel count filled in."""
        h, w = valid_part(dist_map).shape
        row = metrics.image_counts(labels[:h, :w], self.segment(dist_map))
        row[-2:] = ((dist_map[:h, :w] - target[:h, :w]) ** 2).sum(), h * w
        return row

    def describe_prediction(self, output: np.ndarray) -> dict:
        cells = self.segment(output)
        return {"cells": int(cells.max()), "height": cells.shape[0], "width": cells.shape[1]}

    def save_prediction(self, folder: Path, name: str, output: np.ndarray) -> dict:
        """Writes `<name>_distance.png` (uint16 = map x 65535) and `<name>_labels.png` (uint16 cell ids; a uint32
        TIFF beyond 65,535 cells) of one canvas map into `folder`; returns their record."""
        dist, cells = valid_part(output), self.segment(output)
        map_file = folder / f"{name}_distance.png"
        Image.fromarray(np.rint(np.clip(dist, 0, 1) * 65535).astype(np.uint16)).save(map_file)
        return {"cells": int(cells.max()), "distance_map": str(map_file),
                "labels": str(write_labels(folder / f"{name}_labels", cells))}

    def predict_files(self, model, variables: dict, paths: list[Path], output: Path, batch_size: int) -> list[dict]:
        """`jaxvit.predict`: each input decoded as in evaluation (every channel of a multi-channel file), its map
        and cell labels written into the directory `output` (`save_prediction`), listed in output/predictions.csv."""
        output.mkdir(parents=True, exist_ok=True)
        predict, transform = xla_options.jit(self.predict_fn(model)), self.eval_transform()
        names, records = unique_stems(paths), []
        for start in range(0, len(paths), batch_size):
            chunk, images = paths[start:start + batch_size], []
            for p in chunk:
                try:
                    images.append(transform({"path": str(p)})["image"])
                except ImageLoadError as e:
                    images.append(e.reason)
            good = [x for x in images if not isinstance(x, str)]
            batch = np.stack(good + [good[0]] * (batch_size - len(good))) if good else None  # one compiled shape
            maps = iter(np.asarray(predict(variables, batch))[:len(good)] if good else ())
            for p, x in zip(chunk, images):
                record = {"path": str(p)}
                records.append(record | ({"error": x} if isinstance(x, str) else
                                         self.save_prediction(output, names[str(p)], next(maps))))
        fields = ["path", "cells", "distance_map", "labels", "error"]
        with open(output / "predictions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(records)
        return records

    def write_predictions(self, path: Path, paths: list[str], outputs: np.ndarray) -> None:
        """For `Predictor` outputs (canvas maps): `path` (CSV) and each image's files (`save_prediction`) in
        `<path stem>_maps/`."""
        folder = path.with_name(path.stem + "_maps")
        folder.mkdir(parents=True, exist_ok=True)
        names = unique_stems(paths)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "cells", "distance_map", "labels"])
            w.writeheader()
            w.writerows({"path": p} | self.save_prediction(folder, names[p], o) for p, o in zip(paths, outputs))


# ------------------------------------------------------------------------------------------- helpers

def check_pair(masks: dict[str, str], path: str) -> None:
    """Pre-flight decode of an image and its mask: both readable, the mask integer ids, the same size."""
    image = load_array(path)
    try:
        labels = load_mask(masks[path])
    except ImageLoadError as e:
        raise ImageLoadError(path, f"its mask {e.path}: {e.reason}") from e
    if image.shape[:2] != labels.shape:
        raise ImageLoadError(masks[path], f"mask size {labels.shape[1]}x{labels.shape[0]} (WxH) differs from its "
                             f"image's {image.shape[1]}x{image.shape[0]} ({path})")


def valid_part(dist_map: np.ndarray) -> np.ndarray:
    """The image's part of a map on the evaluation canvas (padding is marked < 0, at the bottom and right)."""
    valid = np.asarray(dist_map) >= 0
    return np.asarray(dist_map)[:int(valid.any(1).sum()), :int(valid.any(0).sum())]


def unique_stems(paths: list) -> dict[str, str]:
    """path -> its file stem, with "_<i>" added where stems repeat (files of the same name in other folders)."""
    stems = [Path(p).stem for p in paths]
    repeated = {s for s, n in collections.Counter(stems).items() if n > 1}
    return {str(p): f"{s}_{i}" if s in repeated else s for i, (p, s) in enumerate(zip(paths, stems))}


def write_labels(stem: Path, cells: np.ndarray) -> Path:
    if cells.max(initial=0) <= np.iinfo(np.uint16).max:
        path = stem.with_suffix(".png")
        Image.fromarray(cells.astype(np.uint16)).save(path)
    else:
        import tifffile
        path = stem.with_suffix(".tif")
        tifffile.imwrite(path, cells.astype(np.uint32))
    return path


def write_per_image(path: Path, src: PairedSource, counts: np.ndarray, ok: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mask", "n_true", "n_pred", "ap50", "ap", "f1", "mean_iou", "mse"])
        for i in np.flatnonzero(ok):
            m = metrics.summarise(counts[i])
            w.writerow([src.paths[i], src.mask_paths[i], m["n_true"], m["n_pred"],
                        *(f"{m[k]:.4f}" for k in ("ap50", "ap", "f1", "mean_iou")), f"{m['mse']:.6f}"])


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the fewest tiles of side `tile` covering `length` with neighbours overlapping >= `overlap`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return np.round(np.linspace(0, length - tile, n)).astype(int).tolist()


def tiled_map(model, variables: dict, images: jax.Array, tile: int, overlap: int) -> jax.Array:
    """Distance maps [B, H, W] of images [B, H, W, C] on the evaluation canvas (NaN = padding: filled with each
    channel's median, marked -1 in the output): the model on overlapping tiles of side `tile`, blended with
    weights min(i + 1, tile - i) per axis."""
    b, h, w, c = images.shape
    pad = jnp.isnan(images).any(-1)
    x = jnp.where(jnp.isnan(images), jnp.nanmedian(images, axis=(1, 2), keepdims=True), images)
    if h <= tile and w <= tile:
        return jnp.where(pad, -1.0, model.apply(variables, x))
    ramp = np.minimum(np.arange(tile) + 1, tile - np.arange(tile)).astype(np.float32)
    weight = jnp.asarray(np.outer(ramp, ramp))
    starts = jnp.asarray([(y, z) for y in tile_starts(h, tile, overlap) for z in tile_starts(w, tile, overlap)])

    def add(carry, yx):
        total, norm = carry
        crop = jax.lax.dynamic_slice(x, (0, yx[0], yx[1], 0), (b, tile, tile, c))
        pred = model.apply(variables, crop) * weight
        total = jax.lax.dynamic_update_slice(
            total, jax.lax.dynamic_slice(total, (0, yx[0], yx[1]), (b, tile, tile)) + pred, (0, yx[0], yx[1]))
        norm = jax.lax.dynamic_update_slice(
            norm, jax.lax.dynamic_slice(norm, (yx[0], yx[1]), (tile, tile)) + weight, (yx[0], yx[1]))
        return (total, norm), None

    (total, norm), _ = jax.lax.scan(add, (jnp.zeros((b, h, w)), jnp.zeros((h, w))), starts)
    return jnp.where(pad, -1.0, total / norm)


@functools.lru_cache(maxsize=8)
def _eval_fn(task: CellDistance, model: Any) -> Callable:
    """One function object per (task, model), so every validation reuses one compiled program."""
    predict = task.predict_fn(model)
    return lambda variables, batch: {"map": predict(variables, batch["image"]), "labels": batch["labels"],
                                     "target": batch["target"]}


@functools.lru_cache(maxsize=8)
def _ensemble_fn(members: tuple) -> Callable:
    """fn(variables of each member, batch) -> `_eval_fn`'s fields with the members' mean map."""
    predicts = [task.predict_fn(model) for task, model in members]

    def fn(variables, batch):
        maps = [predict(v, batch["image"]) for predict, v in zip(predicts, variables)]
        return {"map": sum(maps) / len(maps), "labels": batch["labels"], "target": batch["target"]}
    return fn
