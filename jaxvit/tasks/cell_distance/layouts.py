"""Cell segmentation data as published, besides jaxvit's `<split>/images/` + `<split>/masks/` folders:

  LIVECell (COCO)  `livecell_coco_<split>.json` anywhere below data.data_dir (or `cell_distance.coco_json`, with
                   `{split}`): polygons per cell, rasterised to instance masks (cell id = the annotation's order in
                   its image, from 1; a later cell overwrites an earlier one where they overlap); the images are
                   found by file name below data.data_dir (e.g. images/livecell_train_val_images/*.tif).
  Cellpose         `<split>/NAME_img.EXT` beside `<split>/NAME_masks.EXT` (the Cellpose data sets' naming).

A COCO mask is named `<json>#<image id>` wherever a mask path goes (examples, reports, pre-flight); `load_coco_mask`
rasterises it, parsing each JSON file once per process.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from jaxvit.data.sources import IMAGE_EXTENSIONS, ImageLoadError
from jaxvit.errors import DataError, MissingDataError

COCO_DEFAULT = "livecell_coco_{split}.json"


def find_coco_json(data_dir: str | os.PathLike, split: str, pattern: str) -> Path | None:
    """The COCO file of `split`: `pattern` ({split} filled) relative to data_dir, or found by name below it."""
    name = (pattern or COCO_DEFAULT).format(split=split)
    direct = Path(data_dir) / name
    if direct.is_file():
        return direct
    found = sorted(Path(data_dir).rglob(Path(name).name)) if Path(data_dir).is_dir() else []
    if len(found) > 1:
        raise DataError(f"several {Path(name).name} below {str(data_dir)!r}: {[str(f) for f in found[:4]]}; set "
                        "cell_distance.coco_json to the one to use (relative to data.data_dir, with {split})")
    if pattern and not found:
        raise MissingDataError(f"cell_distance.coco_json={pattern!r}: {str(direct)!r} not found")
    return found[0] if found else None


def coco_index(json_path: str) -> dict[int, dict]:
    """image id -> {"file_name", "height", "width", "cells": [polygon arrays]} of a COCO instances file (parsed once
    per process while the file is unchanged)."""
    stat = os.stat(json_path)
    return _parse_coco(json_path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parse_coco(json_path: str, mtime_ns: int, size: int) -> dict[int, dict]:
    try:
        coco = json.loads(Path(json_path).read_text())
        images = {int(im["id"]): {"file_name": im["file_name"], "height": int(im["height"]),
                                  "width": int(im["width"]), "cells": []} for im in coco["images"]}
        annotations = coco["annotations"]
        annotations = annotations.values() if isinstance(annotations, dict) else annotations  # LIVECell: a dict
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{json_path}: not a COCO instances file ({type(e).__name__}: {e}); it needs 'images' "
                        "(id, file_name, height, width) and 'annotations' (image_id, segmentation)") from e
    for a in annotations:
        seg, image = a.get("segmentation"), images.get(int(a.get("image_id", -1)))
        if image is None:
            raise DataError(f"{json_path}: annotation {a.get('id')} names image_id {a.get('image_id')}, not in "
                            "'images'")
        if not isinstance(seg, list):
            raise DataError(f"{json_path}: annotation {a.get('id')} has an RLE segmentation; jaxvit reads polygons "
                            "(convert RLE masks to polygons or to mask images)")
        image["cells"].append([np.asarray(p, np.float32).reshape(-1, 2) for p in seg if len(p) >= 6])
    return images


def rasterise(cells: list[list[np.ndarray]], height: int, width: int) -> np.ndarray:
    """int32 [H, W] instance ids (1..N in order) from each cell's polygons: a pixel is the cell's when its centre
    (x + 0.5, y + 0.5 in COCO coordinates) lies inside."""
    from skimage.draw import polygon
    mask = np.zeros((height, width), np.int32)
    for cell_id, polygons in enumerate(cells, start=1):
        for p in polygons:
            rows, cols = polygon(p[:, 1] - 0.5, p[:, 0] - 0.5, shape=(height, width))
            mask[rows, cols] = cell_id
    return mask


def load_coco_mask(reference: str) -> np.ndarray:
    json_path, _, image_id = reference.rpartition("#")
    entry = coco_index(json_path).get(int(image_id))
    if entry is None:
        raise ImageLoadError(reference, f"no image id {image_id} in {json_path}")
    return rasterise(entry["cells"], entry["height"], entry["width"])


def coco_pairs(json_path: Path, data_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(image files, mask references) of a COCO file; images found by file name below data_dir."""
    index = coco_index(str(json_path))
    by_name: dict[str, Path] = {}
    for dirpath, _, filenames in os.walk(data_dir):
        for f in filenames:
            by_name.setdefault(f, Path(dirpath) / f)
    missing = [im["file_name"] for im in index.values() if Path(im["file_name"]).name not in by_name]
    if missing:
        raise MissingDataError(f"{len(missing)} of {len(index)} images of {json_path} are not below "
                               f"{str(data_dir)!r} (found by file name), e.g. {missing[:3]}")
    ids = sorted(index, key=lambda i: index[i]["file_name"])
    return ([str(by_name[Path(index[i]["file_name"]).name]) for i in ids], [f"{json_path}#{i}" for i in ids])


def cellpose_pairs(split_dir: Path) -> tuple[list[str], list[str]] | None:
    """(images, masks) of a Cellpose folder (NAME_img.EXT + NAME_masks.EXT), or None if it is not one."""
    files = [p for p in sorted(split_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    images = [p for p in files if p.stem.endswith("_img")]
    if not images:
        return None
    masks = {p.stem[:-len("_masks")]: p for p in files if p.stem.endswith("_masks")}
    missing = [p.name for p in images if p.stem[:-len("_img")] not in masks]
    if missing:
        raise DataError(f"{len(missing)} of {len(images)} Cellpose images in {str(split_dir)!r} have no NAME_masks "
                        f"file, e.g. {missing[:3]}")
    return [str(p) for p in images], [str(masks[p.stem[:-len("_img")]]) for p in images]
