"""Pasture photos of the CSIRO Image2Biomass layout: the long-CSV source and the photo transform (resize or pad,
the CSIRO biomass project's strong augmentation: CLAHE, motion blur, perspective jitter, border mask)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from jaxvit.data import photo_aug
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
    turns) and normalised. Picklable."""

    def __init__(self, cfg: TransformConfig, aug: Any):
        self.cfg, self.pad_to_square, self.halves = cfg, bool(aug.pad_to_square), bool(aug.halves)
        self.aug = {k: float(aug[k]) for k in ("perspective_jitter", "border_mask", "clahe_prob", "motion_blur_prob")}

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        a = self.aug
        if "image" in example:
            x = example["image"]
        else:  # train: JPEGs decoded at the smallest scale that still covers the views' size (`load_image`)
            size = self.cfg.image_size
            x = load_image(example["path"], None if rng is None else (2 * size if self.halves else size, size))
        if rng is not None and a["perspective_jitter"] > 0:
            x = photo_aug.perspective_jitter(x, a["perspective_jitter"], rng)
        if rng is not None and a["border_mask"] > 0:
            x = photo_aug.border_mask(x, a["border_mask"], rng)
        views = [x[:, :x.shape[1] // 2], x[:, x.shape[1] // 2:]] if self.halves else [x]
        images = np.stack([self._view(v, rng) for v in views])
        out = {k: np.asarray(v) for k, v in example.items() if k not in ("path", "image")}
        return {"image": images if self.halves else images[0], **out}

    def _view(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        image, size, c, a = Image.fromarray(np.ascontiguousarray(x)), self.cfg.image_size, self.cfg, self.aug
        if self.pad_to_square:
            side = max(image.size)
            square = Image.new("RGB", (side, side))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        image = image.resize((size, size), Image.Resampling.BILINEAR if rng is not None else Image.Resampling.BICUBIC)
        if rng is None:
            return normalize(np.asarray(image), c.mean, c.std)
        if rng.random() < a["clahe_prob"]:
            image = Image.fromarray(photo_aug.clahe(np.asarray(image)))
        if rng.random() < a["motion_blur_prob"]:
            image = Image.fromarray(photo_aug.motion_blur(np.asarray(image), int(rng.integers(3, 8)),
                                                          float(rng.uniform(0, 180))))
        if any(v > 0 for v in c.color_jitter) and rng.random() < c.color_jitter_prob:
            image = color_jitter(image, c.color_jitter, rng)
        x = random_flips_rot90(np.asarray(image), c.hflip, c.vflip, c.rot90, rng)
        return normalize(np.ascontiguousarray(x), c.mean, c.std)
