"""SSL data: examples of any source as RGB views, multi-crop training examples, eval images and iBOT batch masks.

All picklable (grain workers). Sources: the labelled ones (`jaxvit.data.labelled`: folder, csv, npz, tfds) give
one RGB image per example; the JUMP source (`jaxvit.data.jump`) gives a multi-channel stack, turned into RGB views
by `ssl.jump.channel_mode` (average of the channels, or one channel per view).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from jaxvit.data.sources import load_image
from jaxvit.data.transforms import normalize, resize_center_crop
from jaxvit.tasks.ssl import masking
from jaxvit.tasks.ssl.crops import MultiCrop


@dataclasses.dataclass(frozen=True)
class RGBViews:
    """example + rng -> n uint8 images, (H, W, 3) or grey (H, W): the decoded image n times, or views of a JUMP
    site's channel stack by the source's ssl.jump.channel_mode (evaluation, without an rng: the channels' average)."""

    source: Any

    def __call__(self, example: dict, rng: np.random.Generator | None, n: int) -> list[np.ndarray]:
        if "files" in example:  # a JUMP site: one file per channel
            from jaxvit.data import jump
            mode = self.source.channel_mode if rng is not None else "average"
            return jump.views(self.source.planes(example, mode), mode, rng, n)
        image = example["image"] if "image" in example else load_image(example["path"])
        return [np.asarray(image)] * n


@dataclasses.dataclass(frozen=True)
class TrainExample:
    """example, rng -> {"global": [2, G, G, 3], "local": [n_local, L, L, 3]} (float32, normalised)."""

    views: RGBViews
    crops: MultiCrop

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.crops(self.views(example, rng, 2 + self.crops.cfg.n_local), rng)


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """example -> {"image": [S, S, 3], "label"}: shorter side to size / crop_ratio, centre crop (k-NN features)."""

    views: RGBViews
    size: int
    crop_ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, example: dict) -> dict[str, np.ndarray]:
        img = Image.fromarray(self.views(example, None, 1)[0]).convert("RGB")
        image = normalize(np.asarray(resize_center_crop(img, self.size, self.crop_ratio)), self.mean, self.std)
        return {"image": image, "label": np.int32(example.get("label", 0))}


@dataclasses.dataclass(frozen=True)
class MaskBatch:
    """Adds iBOT masks to a local batch: "masks" bool [b, 2, P] over the 2 * b global crops of this process,
    `mask_probability` of them masked with ratios stratified over `ratio` (`masking.batch_masks`, the official
    collate; max block size 0.5 * P as the official train.py passes)."""

    grid: tuple[int, int]
    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    style: str = "dinov3"

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
        b = batch["global"].shape[0]
        masks = masking.batch_masks(rng, 2 * b, self.grid, self.probability, tuple(self.ratio),
                                    max_num_patches=0.5 * self.grid[0] * self.grid[1], style=self.style)
        return {**batch, "masks": masks.reshape(b, 2, -1)}

    def max_masked(self, local_batch: int) -> int:
        """An upper bound of the masked tokens in one process's batch (the static size of the iBOT gather)."""
        n_tokens = self.grid[0] * self.grid[1]
        n = int(2 * local_batch * self.probability)
        probs = masking._torch_linspace(*self.ratio, n + 1)
        return max(sum(int(n_tokens * float(p)) for p in probs[1:]), 1)


def grid(size: int, patch: int) -> tuple[int, int]:
    if size % patch:
        raise ValueError(f"crop size {size} is not a multiple of the patch size {patch}")
    return size // patch, size // patch

