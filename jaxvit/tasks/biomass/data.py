"""Pasture photos of the CSIRO Image2Biomass layout: the long-CSV source and the photo transform (resize or pad,
the CSIRO biomass project's strong augmentation: CLAHE, motion blur, perspective jitter, border mask)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from jaxvit.data import photo_aug
from jaxvit.data.cache import ArrayCache
from jaxvit.data.sources import load_image
from jaxvit.data.transforms import TransformConfig, color_jitter, normalize, random_flips_rot90
from jaxvit.errors import DataError
from jaxvit.tasks.biomass import maths

CATEGORIES = {"species": "Species", "state": "State"}  # classification outputs: key -> CSV metadata column


class PastureSource:
    """`<split>.csv` (long format) -> examples {"path", "targets" [5] (NaN-free), "height", "ndvi", "species",
    "state"}; species and state are indices into `names` (the train split's, saved with the run), -1 if unseen."""

    files = True

    def __init__(self, csv_path: Path, split: str, names: dict[str, list[str]] | None = None,
                 keep: Callable[[list[str], list[dict]], np.ndarray] | None = None):
        if not csv_path.is_file():
            raise DataError(f"{str(csv_path)!r} not found: the biomass task reads <data_dir>/<split>.csv in the "
                            "competition's long format (sample_id, image_path, ..., target_name, target)")
        records = maths.read_long_csv(csv_path)
        self.labelled = all(r["targets"] is not None for r in records.values())
        if keep is not None:  # a cross-validation fold: keep(image paths, metadata) -> bool mask
            mask = keep(list(records), [r["metadata"] for r in records.values()])
            records = {p: r for (p, r), k in zip(records.items(), mask) if k}
        self.split, self.location = split, str(csv_path)
        self.paths = [str(csv_path.parent / p) for p in records]
        self.image_ids = [Path(p).stem for p in records]
        self.sample_ids = [r["sample_ids"] for r in records.values()]  # {target_name: sample_id} per image
        unknown = np.full(len(maths.TARGETS), np.nan, np.float32)  # test.csv of the competition: no targets
        self.targets = np.stack([unknown if r["targets"] is None else r["targets"]
                                 for r in records.values()]).astype(np.float32)
        meta = [r["metadata"] for r in records.values()]
        self.height = np.asarray([m.get("Height_Ave_cm", np.nan) for m in meta], np.float32)
        self.ndvi = np.asarray([m.get("Pre_GSHH_NDVI", np.nan) for m in meta], np.float32)
        values = {key: [str(m.get(column, "")) for m in meta] for key, column in CATEGORIES.items()}
        self.names = names or {key: sorted(set(v)) for key, v in values.items()}
        codes = {key: {s: i for i, s in enumerate(self.names[key])} for key in CATEGORIES}
        self.species, self.state = (np.asarray([codes[key].get(s, -1) for s in values[key]], np.int32)
                                    for key in CATEGORIES)
        absent = [p for p in self.paths if not Path(p).is_file()]
        if absent:
            raise DataError(f"{csv_path}: {len(absent)} image files do not exist, e.g. {absent[:3]}; image_path is "
                            "relative to the CSV's directory")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"path": self.paths[i], "targets": self.targets[i], "height": self.height[i], "ndvi": self.ndvi[i],
                "species": self.species[i], "state": self.state[i]}


class PastureExample:
    """Decode a path (or take an "image" array); train: perspective jitter, border mask; then each view (the whole
    photo, or its left and right halves with `biomass.halves`: "image" [2, S, S, 3]) is fitted to data.image_size
    (squashed, or padded to square first), augmented (train: CLAHE, motion blur, colour jitter, flips / quarter
    turns) and normalised. With a `cache_dir` and no random operation before the fit (perspective jitter and border
    mask off), the fitted uint8 views of each file are computed once and cached (`jaxvit.data.cache`): the values
    are the same as without the cache. Picklable."""

    def __init__(self, cfg: TransformConfig, aug: Any, cache_dir: str = ""):
        self.cfg, self.pad_to_square, self.halves = cfg, bool(aug.pad_to_square), bool(aug.halves)
        self.aug = {k: float(aug[k]) for k in ("perspective_jitter", "border_mask", "clahe_prob", "motion_blur_prob")}
        self.cache = ArrayCache(cache_dir, "biomass_views") if cache_dir else None

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        a, train = self.aug, rng is not None
        if self.cache is not None and "image" not in example and not (
                train and (a["perspective_jitter"] > 0 or a["border_mask"] > 0)):
            settings = dict(size=self.cfg.image_size, halves=self.halves, pad=self.pad_to_square, train=train)
            views = self.cache.get(example["path"], settings, lambda: self._fit(self._decode(example, train), train))
        else:
            x = self._decode(example, train)
            if train and a["perspective_jitter"] > 0:
                x = photo_aug.perspective_jitter(x, a["perspective_jitter"], rng)
            if train and a["border_mask"] > 0:
                x = photo_aug.border_mask(x, a["border_mask"], rng)
            views = self._fit(x, train)
        c = self.cfg
        images = [self._augment(v, rng) if train else normalize(v, c.mean, c.std) for v in views]
        out = {k: np.asarray(v) for k, v in example.items() if k not in ("path", "image")}
        return {"image": np.stack(images) if self.halves else images[0], **out}

    def _decode(self, example: dict, train: bool) -> np.ndarray:
        """The "image" array, or the file decoded (train: JPEGs at the smallest scale that still covers the views'
        size, `load_image`)."""
        if "image" in example:
            return example["image"]
        size = self.cfg.image_size
        return load_image(example["path"], (2 * size if self.halves else size, size) if train else None)

    def _fit(self, x: np.ndarray, train: bool) -> np.ndarray:
        """The photo's views (whole, or left and right halves) padded to square if asked and resized to
        data.image_size (bilinear in training, bicubic in evaluation): uint8 [V, S, S, 3]."""
        views = [x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]] if self.halves else [x]
        size, out = self.cfg.image_size, []
        for v in views:
            image = Image.fromarray(np.ascontiguousarray(v))
            if self.pad_to_square:
                side = max(image.size)
                square = Image.new("RGB", (side, side))
                square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
                image = square
            resample = Image.Resampling.BILINEAR if train else Image.Resampling.BICUBIC
            out.append(np.asarray(image.resize((size, size), resample)))
        return np.stack(out)

    def _augment(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c, a = self.cfg, self.aug
        image = Image.fromarray(x)
        if rng.random() < a["clahe_prob"]:
            image = Image.fromarray(photo_aug.clahe(np.asarray(image)))
        if rng.random() < a["motion_blur_prob"]:
            image = Image.fromarray(photo_aug.motion_blur(np.asarray(image), int(rng.integers(3, 8)),
                                                          float(rng.uniform(0, 180))))
        if any(v > 0 for v in c.color_jitter) and rng.random() < c.color_jitter_prob:
            image = color_jitter(image, c.color_jitter, rng)
        return normalize(random_flips_rot90(np.asarray(image), c.hflip, c.vflip, c.rot90, rng), c.mean, c.std)
