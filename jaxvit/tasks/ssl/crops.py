"""DINOv2 multi-crop views: the official `DataAugmentationDINO` (dinov2/data/augmentations.py) on numpy + PIL,
all randomness from one `np.random.Generator` (deterministic given the seed), picklable for grain workers.

Per crop, in the official order:
  random resized crop (bicubic) -> horizontal flip -> [colour jitter with prob p] -> [grayscale with prob p]
  -> per-view extra -> normalise,
where the extra is: global view 1: Gaussian blur (p=1.0); global view 2: Gaussian blur (p=0.1) then solarize
(p=0.2); each local view: Gaussian blur (p=0.5). Views are made global 1, global 2, then the locals.

Differences from the official (torchvision) pipeline:
* Gaussian blur is PIL `ImageFilter.GaussianBlur(radius=sigma)`, sigma ~ U(blur_sigma). PIL's radius IS the
  standard deviation, but PIL approximates the Gaussian with repeated box blurs over the whole support, while
  torchvision's `GaussianBlur(kernel_size=9)` is an exact Gaussian truncated to a 9x9 kernel (reflect padding):
  at sigma near 2 the official kernel is cut at 2 sigma, PIL's is not.
* The crop box is jaxvit's `sample_box` (torchvision's area / log-aspect sampling and fallback), but with a
  sub-pixel float box passed to PIL's `resize(box=...)`; torchvision rounds the box to whole pixels.
* Colour jitter is jaxvit's `color_jitter` (PIL ImageEnhance, as torchvision's PIL backend; random order);
  hue rounds the shift to whole HSV steps.
* Random draws come from numpy, not torch / python `random`, so the same seed does not reproduce torch's views.
* The official output duplicates the global crops for the teacher and carries empty `offsets`; here only
  {"global": [2, G, G, 3], "local": [n_local, L, L, 3]} (NHWC float32) is returned.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from jaxvit.data.geometry import sample_box
from jaxvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, color_jitter, normalize


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Defaults are the official DINOv2 recipe (ViT-L/g configs use global_scale (0.32, 1.0),
    local_scale (0.05, 0.32), 8 locals of 96 px)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect (w / h) range, torchvision default
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, sat, hue
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob_global2: float = 0.2
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        probs = {"hflip": self.hflip, "color_jitter_prob": self.color_jitter_prob,
                 "grayscale_prob": self.grayscale_prob, "solarize_prob_global2": self.solarize_prob_global2}
        probs.update({f"blur_probs[{i}]": p for i, p in enumerate(self.blur_probs)})
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if len(self.blur_probs) != 3:
            raise ValueError(f"blur_probs needs 3 entries (global 1, global 2, locals), got {self.blur_probs}")
        if self.global_size <= 0 or self.local_size <= 0 or self.n_local < 0:
            raise ValueError("global_size and local_size must be > 0 and n_local >= 0")
        for name in ("global_scale", "local_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")


def grayscale(img: Image.Image) -> Image.Image:
    """ITU-R 601-2 luma (PIL "L": 0.299 R + 0.587 G + 0.114 B) replicated to 3 channels, as torchvision's
    `RandomGrayscale` on a PIL RGB image; a grey ("L") image stays as it is."""
    return img if img.mode == "L" else img.convert("L").convert("RGB")


def solarize(img: Image.Image, threshold: int) -> Image.Image:
    """Inverts (255 - v) every channel value >= threshold (torchvision / PIL `solarize`)."""
    return ImageOps.solarize(img, threshold)


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """PIL Gaussian blur with standard deviation `sigma` (PIL's radius); see the module note on torchvision's
    9x9 kernel."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(sigma)))


@dataclasses.dataclass(frozen=True)
class MultiCrop:
    """uint8 RGB (H, W, 3) or grey (H, W) + rng -> {"global": float32 [2, G, G, 3],
    "local": float32 [n_local, L, L, 3]}."""

    cfg: MultiCropConfig = MultiCropConfig()

    def _view(self, img: Image.Image, size: int, scale, blur_p: float, solarize_p: float,
              rng: np.random.Generator) -> np.ndarray:
        c = self.cfg
        # geometric: random resized crop (bicubic), horizontal flip
        box = sample_box(img.height, img.width, rng, tuple(scale), tuple(c.crop_ratio))
        view = img.resize((size, size), resample=Image.Resampling.BICUBIC, box=box)
        if rng.random() < c.hflip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # colour: RandomApply(ColorJitter, p), RandomGrayscale(p)
        if rng.random() < c.color_jitter_prob and any(v > 0 for v in c.color_jitter):
            view = color_jitter(view, tuple(c.color_jitter), rng)
        if rng.random() < c.grayscale_prob:
            view = grayscale(view)
        # per-view extra: blur, then (global 2 only) solarize
        if rng.random() < blur_p:
            view = gaussian_blur(view, rng.uniform(*c.blur_sigma))
        if solarize_p > 0 and rng.random() < solarize_p:
            view = solarize(view, c.solarize_threshold)
        x = np.asarray(view)
        if x.ndim == 2:  # a grey view: every op above gave the values of its RGB copy, in a third of the time
            x = np.broadcast_to(x[:, :, None], (*x.shape, 3))
        return normalize(x, c.mean, c.std)

    def __call__(self, image, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`image`: one uint8 (H, W, 3) array, or a list of 2 + n_local of them (one per view, in view order:
        e.g. a different microscopy channel per view). A grey (H, W) array gives the views of its copy replicated
        to 3 channels, each op working on one channel instead of three."""
        c = self.cfg
        images = list(image) if isinstance(image, (list, tuple)) else [image] * (2 + c.n_local)
        if len(images) != 2 + c.n_local:
            raise ValueError(f"expected one image or {2 + c.n_local} (one per view), got {len(images)}")
        for im in images:
            if im.dtype != np.uint8 or not (im.ndim == 2 or im.ndim == 3 and im.shape[2] == 3):
                raise ValueError(f"expected a uint8 (H, W, 3) or (H, W) image, got {im.dtype} {im.shape}")
        converted: dict[int, Image.Image] = {}  # one PIL image per distinct array
        pil = [converted.setdefault(id(im), Image.fromarray(np.asarray(im))) for im in images]
        g1 = self._view(pil[0], c.global_size, c.global_scale, c.blur_probs[0], 0.0, rng)
        g2 = self._view(pil[1], c.global_size, c.global_scale, c.blur_probs[1], c.solarize_prob_global2, rng)
        local = np.empty((c.n_local, c.local_size, c.local_size, 3), np.float32)
        for i in range(c.n_local):
            local[i] = self._view(pil[2 + i], c.local_size, c.local_scale, c.blur_probs[2], 0.0, rng)
        return {"global": np.stack([g1, g2]), "local": local}
