"""Paired microscopy images and instance masks and their transforms.

Layout: `<data.data_dir>/<split>/images/` and `<data.data_dir>/<split>/masks/` (or `*_<split>/`), a mask for every
image under the same relative path and file name (any supported extension, e.g. `a/001.tif` and `a/001.png`); or
LIVECell's COCO files and Cellpose's NAME_img / NAME_masks pairs (`layouts.py`).
Images are grayscale or multi-channel (PNG, TIFF stacks or CHW / HWC TIFFs, .npy; `jaxvit.data.decode`), any bit
depth; masks are one channel of integer cell ids (0 background; 8/16-bit PNG or TIFF, integral floats accepted).

Each image's channels are clipped to their 0.1 / 99.9 percentiles and scaled to [0, 1] (per image, as the JUMP
source's ssl.jump.intensity="image"), optionally reduced to `cell_distance.channels`, then mapped to the backbone's
input channels by `cell_distance.channel_mode`: `average` (their mean as grey, replicated: DINOCell's grayscale
input), `first3` (channels 0-2 as RGB) or `all` (every channel, for a backbone with that many input channels);
optional CLAHE (`cell_distance.clahe`), then normalised with data.mean / data.std.

Training: the distance-map target is computed from the mask (only the cells that meet the crop window: exact,
each cell's values depend on that cell alone); with data.cache_dir the scaled image and its whole distance map
are computed once per image and kept there (`jaxvit.data.cache`: keyed by both files and the channel selection).
Then image and target get one geometry (`jaxvit.data.geometry`): a square window of data.image_size / s source
pixels (s ~ U(cell_distance.scale_range)) at a random position (images smaller than the window are padded: each
channel with its median, the background; the target with 0), resized to data.image_size, random flips and
quarter turns (data.aug.hflip / vflip / rot90); then brightness and inversion (`cell_distance.brightness`,
`invert_prob`). The random stream is the pipeline's, a function of (seed, step). Evaluation keeps the image
whole on a square canvas of side max(cell_distance.eval_size, data.image_size), padded at the bottom and right:
NaN image (the prediction fills it with each channel's median, as training pads, and marks it -1 in the map),
zero target and labels.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from jaxvit.data.cache import ArrayCache
from jaxvit.data.changes import stamps
from jaxvit.data.decode import load_array, normalize_channels
from jaxvit.data.geometry import Geometry, apply_geometry
from jaxvit.data.photo_aug import clahe_channel
from jaxvit.data.sources import ImageLoadError, find_split_dir, list_images
from jaxvit.errors import ConfigError, DataError, MissingDataError
from jaxvit.tasks.cell_distance import layouts
from jaxvit.tasks.cell_distance.targets import distance_map

log = logging.getLogger("jaxvit")

CHANNEL_MODES = ("average", "first3", "all")
PERCENTILES = (0.1, 99.9)
CACHE_VERSION = 1  # of the cached images and distance maps: bumped when the code makes different ones


# ------------------------------------------------------------------------------------------- source

class PairedSource:
    """Random-access source of one split: examples {"path": image file, "mask": mask file}."""

    files = True  # `paths` are files (read by the pre-flight check)

    def __init__(self, data_dir: str | os.PathLike, split: str, coco_json: str = ""):
        self.split = split
        coco = layouts.find_coco_json(data_dir, split, coco_json)
        if coco is not None:
            self.location = str(coco)
            self.paths, self.mask_paths = layouts.coco_pairs(coco, data_dir)
            return
        split_dir = find_split_dir(data_dir, split)
        self.location = str(split_dir)
        cellpose = layouts.cellpose_pairs(split_dir)
        if cellpose is not None:
            self.paths, self.mask_paths = cellpose
            return
        self.paths, self.mask_paths = _folder_pairs(split_dir)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"path": self.paths[i], "mask": self.mask_paths[i]}

    def __repr__(self) -> str:
        return f"PairedSource({self.location!r}, split={self.split!r}, n={len(self)})"


def _folder_pairs(split_dir: Path) -> tuple[list[str], list[str]]:
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise MissingDataError(f"{str(d)!r} not found: the cell_distance task reads <data_dir>/<split>/images/ "
                                   "and <data_dir>/<split>/masks/ (a mask with the same file name per image), "
                                   "Cellpose pairs (<split>/NAME_img.png + NAME_masks.png) or LIVECell's COCO files "
                                   "(livecell_coco_<split>.json below data.data_dir)")
    images = list_images(images_dir)
    if not images:
        raise MissingDataError(f"no images in {str(images_dir)!r}")
    masks: dict[Path, Path] = {}
    for m in list_images(masks_dir):
        key = m.relative_to(masks_dir).with_suffix("")
        if key in masks:
            raise DataError(f"{masks_dir}: two masks for {str(key)!r} ({masks[key].name}, {m.name}); keep one")
        masks[key] = m
    keys = [p.relative_to(images_dir).with_suffix("") for p in images]
    if len(set(keys)) < len(keys):
        raise DataError(f"{images_dir}: several images share a name without extension; rename them")
    missing = [str(k) for k in keys if k not in masks]
    if missing:
        raise DataError(f"{len(missing)} of {len(keys)} images in {str(images_dir)!r} have no mask in "
                        f"{str(masks_dir)!r} (same relative path and name, any extension), e.g. "
                        f"{', '.join(missing[:5])}")
    extra = len(masks) - len(keys)
    if extra:
        log.warning("%s: %d masks without an image are ignored", masks_dir, extra)
    return [str(p) for p in images], [str(masks[k]) for k in keys]


def load_mask(path: str) -> np.ndarray:
    """A mask file as int32 [H, W] cell ids; ImageLoadError naming the problem for anything else."""
    if "#" in path and path.partition("#")[0].endswith(".json"):
        return layouts.load_coco_mask(path)
    m = load_array(path)
    if m.shape[2] != 1:
        raise ImageLoadError(path, f"a mask must be one channel of integer cell ids (e.g. a 16-bit grayscale PNG or "
                             f"TIFF), this one has {m.shape[2]} channels")
    m = m[:, :, 0]
    if m.dtype.kind == "b":
        raise ImageLoadError(path, "a boolean mask has no cell ids: label each cell with its own integer (e.g. "
                             "scipy.ndimage.label for cells that do not touch)")
    if m.dtype.kind == "f":
        if not np.all(np.isfinite(m)) or np.any(m != np.round(m)):
            bad = m[~np.isfinite(m) | (m != np.round(m))].flat[0]
            raise ImageLoadError(path, f"non-integer value {bad} in a mask: masks hold integer cell ids")
    if m.size and m.min() < 0:
        raise ImageLoadError(path, f"negative value {m.min()} in a mask: cell ids are > 0, background 0")
    if m.size and m.max() > np.iinfo(np.int32).max:
        raise ImageLoadError(path, f"cell id {m.max()} does not fit int32")
    return m.astype(np.int32)


def scale_percentiles(x: np.ndarray) -> np.ndarray:
    """float32 [H, W, C] in [0, 1]: each channel clipped to its PERCENTILES and stretched (a flat channel -> 0)."""
    x = np.nan_to_num(x.astype(np.float32))
    lo, hi = np.percentile(x, PERCENTILES, axis=(0, 1)).astype(np.float32)
    span = np.where(hi > lo, hi - lo, np.inf)
    return np.clip((x - lo) / span, 0.0, 1.0)


# ------------------------------------------------------------------------------------------- transform

@dataclasses.dataclass(frozen=True)
class CellExample:
    """example [, rng] -> {"image" [S, S, in_channels], "target" [S, S]} (train), or on the evaluation canvas
    {"image", "target", "labels" int32} (eval; "image" alone for an example without a mask). Picklable."""

    image_size: int
    canvas: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: tuple[int, ...] = ()
    channel_mode: str = "average"
    clahe: bool = False
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    scale_range: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    invert_prob: float = 0.0
    cache_dir: str = ""  # training: scaled images + whole distance maps kept here (data.cache_dir; "": not kept)

    def __post_init__(self):
        if self.channel_mode not in CHANNEL_MODES:
            raise ConfigError(f"cell_distance.channel_mode={self.channel_mode!r}: use one of "
                              f"{', '.join(CHANNEL_MODES)}")
        if self.channel_mode == "first3" and self.in_channels != 3:
            raise ConfigError(f"cell_distance.channel_mode='first3' needs a backbone with 3 input channels, not "
                              f"{self.in_channels}")
        if len(self.mean) not in (1, self.in_channels) or len(self.std) != len(self.mean):
            raise ConfigError(f"data.mean / data.std have {len(self.mean)} / {len(self.std)} values; the backbone "
                              f"takes {self.in_channels} channels: give 1 or {self.in_channels} of each")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"cell_distance.scale_range={tuple(self.scale_range)}: need 0 < low <= high")

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        if rng is not None and self.cache_dir and "image" not in example and "mask" in example:
            mask_file = example["mask"].partition("#")[0]  # a COCO mask: its json (the id is in the settings)
            settings = dict(version=CACHE_VERSION, mask=example["mask"], mask_file=stamps([mask_file]),
                            channels=list(self.channels), percentiles=PERCENTILES)
            site = ArrayCache(self.cache_dir, "cell_sites").get(example["path"], settings, lambda: self._site(example))
            return self._train(site[:-1].transpose(1, 2, 0), lambda window: site[-1], rng)
        stack, labels, path = self._load(example)
        if rng is None:
            return self._eval(stack, labels, path)
        if labels is None:
            raise DataError(f"training example {path} has no mask")
        return self._train(stack, lambda window: distance_map(labels, window), rng)

    def _site(self, example: dict) -> np.ndarray:
        """float32 [C + 1, H, W]: the scaled stack's channels and the whole distance map (what the cache keeps)."""
        stack, labels, path = self._load(example)
        if labels is None:
            raise DataError(f"training example {path} has no mask")
        return np.concatenate([stack.transpose(2, 0, 1), distance_map(labels)[None]])

    def _load(self, example: dict) -> tuple[np.ndarray, np.ndarray | None, str]:
        """The scaled stack [H, W, C], the mask's cell ids (None without one) and the image's path."""
        path = example.get("path", "<array>")
        raw = np.asarray(example["image"]) if "image" in example else load_array(path)
        stack = self._select(raw if raw.ndim == 3 else raw[:, :, None], path)
        labels = None
        if "mask" in example:
            labels = load_mask(example["mask"])
            if labels.shape != stack.shape[:2]:
                (h, w), (hi, wi) = labels.shape, stack.shape[:2]
                raise ImageLoadError(example["mask"], f"mask size {w}x{h} (WxH) differs from its image's {wi}x{hi} "
                                     f"({path})")
        return stack, labels, path

    def _select(self, raw: np.ndarray, path: str) -> np.ndarray:
        if self.channels:
            if max(self.channels) >= raw.shape[2]:
                raise ImageLoadError(path, f"{raw.shape[2]} channels; cell_distance.channels={self.channels} asks "
                                     f"for channel {max(self.channels)}")
            raw = raw[:, :, list(self.channels)]
        return scale_percentiles(raw)

    def _to_model(self, stack: np.ndarray, path: str) -> np.ndarray:
        """[H, W, C] in [0, 1] -> normalised [H, W, in_channels]."""
        if self.channel_mode == "average":
            x = stack.mean(axis=-1, keepdims=True)
        elif self.channel_mode == "first3":
            if stack.shape[2] < 3:
                raise ImageLoadError(path, f"{stack.shape[2]} channel(s); cell_distance.channel_mode='first3' needs 3")
            x = stack[:, :, :3]
        else:
            x = stack
            if x.shape[2] != self.in_channels:
                raise ImageLoadError(path, f"{x.shape[2]} channels but the backbone takes {self.in_channels} "
                                     "(cell_distance.channel_mode='all'); pick channels with cell_distance.channels")
        if self.clahe:
            u8 = np.rint(x * 255).astype(np.uint8)
            x = np.stack([clahe_channel(u8[:, :, c]) for c in range(x.shape[2])], -1)
            x = x.astype(np.float32) / 255
        if x.shape[2] == 1 and self.in_channels > 1:
            x = np.repeat(x, self.in_channels, axis=2)
        return normalize_channels(x, self.mean, self.std)

    def _train(self, stack: np.ndarray, target_of, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`target_of(window)`: the distance map, exact at least in the window's rows and columns."""
        side = self.image_size / rng.uniform(*self.scale_range)  # source pixels of the window
        need = int(np.ceil(side))
        h0, w0 = stack.shape[:2]
        pad = ((0, max(need - h0, 0)), (0, max(need - w0, 0)))
        h, w = h0 + pad[0][1], w0 + pad[1][1]
        x0, y0 = (float(rng.integers(0, int(n - side) + 1)) for n in (w, h))
        # The target only where the resize reads: the window and the filter's reach around it (PIL's bilinear
        # support is max(1, source px per output px)); cells outside it are skipped (exact, `distance_map`).
        reach = int(np.ceil(max(1.0, side / self.image_size))) + 1
        window = (int(y0) - reach, int(np.ceil(y0 + side)) + reach, int(x0) - reach, int(np.ceil(x0 + side)) + reach)
        target = target_of(window)
        if pad != ((0, 0), (0, 0)):
            fill = np.median(stack, axis=(0, 1))  # the background's level: padding shows no cells
            stack = np.concatenate([np.pad(stack[:, :, k], pad, constant_values=v)[:, :, None]
                                    for k, v in enumerate(fill)], axis=2)
            target = np.pad(target, pad)
        g = Geometry((x0, y0, x0 + side, y0 + side), self.image_size, hflip=self.hflip and bool(rng.random() < 0.5),
                     vflip=self.vflip and bool(rng.random() < 0.5), rot90=int(rng.integers(4)) if self.rot90 else 0)
        stack = apply_geometry(stack, g, "bilinear")
        if self.brightness:
            stack = np.clip(stack * rng.uniform(1 - self.brightness, 1 + self.brightness), 0, 1)
        if self.invert_prob and rng.random() < self.invert_prob:
            stack = 1 - stack
        return {"image": self._to_model(stack, ""), "target": apply_geometry(target, g, "bilinear")}

    def _eval(self, stack: np.ndarray, labels: np.ndarray | None, path: str) -> dict[str, np.ndarray]:
        h, w = stack.shape[:2]
        if max(h, w) > self.canvas:
            raise ImageLoadError(path, f"{w}x{h} px is larger than the evaluation canvas of {self.canvas} px: set "
                                 f"cell_distance.eval_size to at least {max(h, w)}")
        pad = ((0, self.canvas - h), (0, self.canvas - w))
        out = {"image": np.pad(self._to_model(stack, path), (*pad, (0, 0)), constant_values=np.nan)}
        if labels is not None:
            out["target"] = np.pad(distance_map(labels), pad)
            out["labels"] = np.pad(labels, pad)
        return out
