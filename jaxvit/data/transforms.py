"""Per-example image transforms (PIL + numpy), all randomness from a `np.random.Generator`.

Train order: free-angle rotation -> random resized crop to `image_size` -> colour jitter -> flips /
90-degree rotation -> normalisation -> random erasing. Rotation and crop are one resampling at the
output's size (`rotated_resized_crop`). Colour jitter runs before the crop instead when the source has
fewer pixels than the output (cheaper; brightness and saturation commute with resampling, contrast then
uses the whole image's mean); such a small source is rotated at its own size first.
Eval: resize the shorter side to `round(image_size / crop_ratio)`, centre crop, normalise.
Outputs are float32 (H, W, 3), ready to be batched NHWC.

Choices:
* Free-angle rotation fills the uncovered corners with black (0), which matches the dark sky
  background of astronomical images; it is applied before cropping so crops may include corners.
* Random erasing fills the erased rectangle with 0 in normalised space (the dataset mean colour).
* Hue jitter shifts the H channel of PIL's HSV conversion (like torchvision's `adjust_hue`).
* Resampling: bilinear for train crops and rotation (speed), bicubic for the eval resize.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from jaxvit.data.cache import ArrayCache
from jaxvit.data.geometry import sample_box
from jaxvit.data.sources import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TRAIN_RESAMPLE = Image.Resampling.BILINEAR
_EVAL_RESAMPLE = Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Flat, picklable view of the data config that the transforms need."""

    image_size: int = 224
    crop_ratio: float = 0.875  # eval: centre-crop fraction
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_scale: tuple[float, float] = (0.8, 1.0)  # train: area fraction range
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # train aspect range (cfg.aug.crop_ratio)
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    rotate_degrees: float = 180.0  # angle ~ U(-d, d); 0 disables
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.0)
    color_jitter_prob: float = 0.8
    erasing_prob: float = 0.0
    erasing_area: tuple[float, float] = (0.02, 0.33)

    @classmethod
    def from_config(cls, cfg: Any) -> TransformConfig:
        """Reads the data config (ConfigDict or any attribute-access object); missing keys keep
        their defaults."""
        d = cls()
        aug = getattr(cfg, "aug", None)

        def top(name: str, default: Any) -> Any:
            return getattr(cfg, name, default)

        def sub(name: str, default: Any) -> Any:
            return default if aug is None else getattr(aug, name, default)

        return cls(
            image_size=int(top("image_size", d.image_size)),
            crop_ratio=float(top("crop_ratio", d.crop_ratio)),
            mean=tuple(float(v) for v in top("mean", d.mean)),
            std=tuple(float(v) for v in top("std", d.std)),
            crop_scale=tuple(float(v) for v in sub("crop_scale", d.crop_scale)),
            crop_aspect=tuple(float(v) for v in sub("crop_ratio", d.crop_aspect)),
            hflip=bool(sub("hflip", d.hflip)),
            vflip=bool(sub("vflip", d.vflip)),
            rot90=bool(sub("rot90", d.rot90)),
            rotate_degrees=float(sub("rotate_degrees", d.rotate_degrees)),
            color_jitter=tuple(float(v) for v in sub("color_jitter", d.color_jitter)),
            color_jitter_prob=float(sub("color_jitter_prob", d.color_jitter_prob)),
            erasing_prob=float(sub("erasing_prob", d.erasing_prob)),
            erasing_area=tuple(float(v) for v in sub("erasing_area", d.erasing_area)),
        )


# ----------------------------------------------------------------------------- geometric


def rotated_resized_crop(img: Image.Image, angle: float, size: int, scale: tuple[float, float],
                         ratio: tuple[float, float], rng: np.random.Generator) -> Image.Image:
    """`img.rotate(angle)` (about the centre, black corners) then `random_resized_crop`, in one resampling at the
    output's size instead of a rotation at the source's: the box is drawn in the rotated frame as before; the
    source is first shrunk (bilinear, antialiased) to the box's scale when the crop downsamples, then one affine
    map (rotation, box, any remaining aspect change) samples the output bilinearly. Pixels differ slightly from
    the two-step path (tests/test_data.py bounds it)."""
    w, h = img.size
    left, top, right, bottom = sample_box(h, w, rng, scale, ratio)
    sx, sy = (right - left) / size, (bottom - top) / size  # source pixels per output pixel
    shrink = min(1.0, 1.0 / min(sx, sy))
    if shrink < 1.0:
        img = img.resize((max(1, round(w * shrink)), max(1, round(h * shrink))), _TRAIN_RESAMPLE)
    kx, ky = img.width / w, img.height / h
    # PIL's rotate: the rotated-frame point (x, y) samples the source at (a x + b y + c, d x + e y + f).
    rad = math.radians(angle)
    a, b, d, e = math.cos(rad), -math.sin(rad), math.sin(rad), math.cos(rad)
    c, f = w / 2 - a * w / 2 - b * h / 2, h / 2 - d * w / 2 - e * h / 2
    coeffs = (kx * a * sx, kx * b * sy, kx * (a * left + b * top + c),
              ky * d * sx, ky * e * sy, ky * (d * left + e * top + f))
    return img.transform((size, size), Image.Transform.AFFINE, coeffs, _TRAIN_RESAMPLE, fillcolor=(0, 0, 0))


def random_resized_crop(
    img: Image.Image,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> Image.Image:
    """Crops a random box (area fraction in `scale`, aspect in `ratio`) and resizes to size^2.

    Up to 10 proposals are tried; if none fits, the largest centred box with aspect clamped to
    `ratio` is used (torchvision semantics).
    """
    box = sample_box(img.height, img.width, rng, scale, ratio)
    return img.resize((size, size), resample=_TRAIN_RESAMPLE, box=box)


def random_flips_rot90(
    x: np.ndarray, hflip: bool, vflip: bool, rot90: bool, rng: np.random.Generator
) -> np.ndarray:
    """Random horizontal/vertical flips and k*90-degree rotation of an (H, W, C) array (views)."""
    if hflip and rng.random() < 0.5:
        x = x[:, ::-1]
    if vflip and rng.random() < 0.5:
        x = x[::-1]
    if rot90:
        x = np.rot90(x, k=int(rng.integers(4)), axes=(0, 1))
    return x


def resize_center_crop(img: Image.Image, size: int, crop_ratio: float) -> Image.Image:
    """Resizes the shorter side to round(size / crop_ratio), then centre-crops size x size. The longer side is
    rounded down, as torchvision's Resize and transformers' image processors do (the exported classifier matches)."""
    short = max(size, round(size / crop_ratio))
    w, h = img.size
    if w <= h:
        new = (short, max(short, int(h * short / w)))
    else:
        new = (max(short, int(w * short / h)), short)
    img = img.resize(new, resample=_EVAL_RESAMPLE)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------- photometric


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotates hue by `shift` turns (in [-0.5, 0.5]): PIL's HSV with H moved by round(shift x 255) steps."""
    k = round(shift * 255)
    return img.convert("HSV").point([(v + k) % 256 for v in range(256)] + list(range(256)) * 2).convert("RGB")


def color_jitter(
    img: Image.Image,
    strengths: tuple[float, float, float, float],
    rng: np.random.Generator,
) -> Image.Image:
    """Brightness, contrast, saturation (factor ~ U[1-s, 1+s]) and hue (shift ~ U[-s, s])
    adjustments in random order; a strength of 0 skips that adjustment."""
    b, c, s, hue = strengths
    for op in rng.permutation(4):
        if op == 0 and b > 0:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(max(0.0, 1 - b), 1 + b))
        elif op == 1 and c > 0:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(max(0.0, 1 - c), 1 + c))
        elif op == 2 and s > 0:
            img = ImageEnhance.Color(img).enhance(rng.uniform(max(0.0, 1 - s), 1 + s))
        elif op == 3 and hue > 0:
            shift = rng.uniform(-hue, hue)
            img = img if img.mode == "L" else adjust_hue(img, shift)  # grey has no hue (nor has its RGB copy)
    return img


def normalize(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (x / 255 - mean) / std, contiguous."""
    out = np.empty(x.shape, np.float32)
    for c in range(x.shape[-1]):  # per-channel loops beat broadcasting over a size-3 axis
        np.multiply(x[..., c], np.float32(1.0 / (255.0 * std[c])), out=out[..., c])
        out[..., c] -= np.float32(mean[c] / std[c])
    return out


def random_erasing(
    x: np.ndarray, area: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Sets a random rectangle (area fraction in `area`, aspect in [0.3, 3.3]) to 0, in place."""
    h, w = x.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(h - eh + 1)), int(rng.integers(w - ew + 1))
            x[top:top + eh, left:left + ew] = 0.0
            break
    return x


# ----------------------------------------------------------------------------- full pipelines


def train_transform(
    image: np.ndarray, cfg: TransformConfig, rng: np.random.Generator
) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> augmented, normalised float32 (S, S, 3)."""
    img = Image.fromarray(image)
    jitter_first = img.width * img.height < cfg.image_size**2
    angle = float(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees)) if cfg.rotate_degrees > 0 else 0.0
    if jitter_first and angle:  # a small source: rotated at its own size, colour jitter before the crop
        img = img.rotate(angle, resample=_TRAIN_RESAMPLE, fillcolor=(0, 0, 0))
    jitter = any(v > 0 for v in cfg.color_jitter) and rng.random() < cfg.color_jitter_prob
    if jitter and jitter_first:
        img = color_jitter(img, cfg.color_jitter, rng)
    if angle and not jitter_first:
        img = rotated_resized_crop(img, angle, cfg.image_size, cfg.crop_scale, cfg.crop_aspect, rng)
    else:
        img = random_resized_crop(img, cfg.image_size, cfg.crop_scale, cfg.crop_aspect, rng)
    if jitter and not jitter_first:
        img = color_jitter(img, cfg.color_jitter, rng)
    x = random_flips_rot90(np.asarray(img), cfg.hflip, cfg.vflip, cfg.rot90, rng)
    x = normalize(x, cfg.mean, cfg.std)
    if cfg.erasing_prob > 0 and rng.random() < cfg.erasing_prob:
        x = random_erasing(x, cfg.erasing_area, rng)
    return x


def eval_transform(image: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> resized, centre-cropped, normalised float32 (S, S, 3)."""
    img = resize_center_crop(Image.fromarray(image), cfg.image_size, cfg.crop_ratio)
    return normalize(np.asarray(img), cfg.mean, cfg.std)


@dataclasses.dataclass(frozen=True)
class RGBExample:
    """A source example {"path" | "image", other fields...} -> {"image": float32 (S, S, 3), other fields as
    arrays}: a path is decoded to 8-bit RGB (`load_image`; with a `cache_dir`, once per file, then read from
    <cache_dir>/rgb8: `jaxvit.data.cache`), an "image" is a uint8 (H, W, 3) array already; then `train_transform`
    (when called with an rng) or `eval_transform`. Picklable, for grain workers."""

    cfg: TransformConfig
    cache_dir: str = ""

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        if "image" in example:
            image = example["image"]
        elif self.cache_dir:
            path = example["path"]
            image = ArrayCache(self.cache_dir, "rgb8").get(path, {}, lambda: load_image(path))
        else:
            image = load_image(example["path"])
        x = eval_transform(image, self.cfg) if rng is None else train_transform(image, self.cfg, rng)
        return {"image": x, **{k: _as_array(v) for k, v in example.items() if k not in ("path", "image")}}


def _as_array(v: Any) -> np.ndarray:
    """int -> int32, float -> float32 (the dtypes batches carry)."""
    a = np.asarray(v)
    return a.astype(np.int32) if a.dtype.kind in "iu" else a.astype(np.float32) if a.dtype.kind == "f" else a
