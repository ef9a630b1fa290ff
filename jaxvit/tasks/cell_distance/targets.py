"""Distance-map targets (SAMCell, which DINOCell follows): inside each cell, the Euclidean distance to the nearest
pixel outside that cell (background or a neighbouring cell), divided by the cell's largest such distance, so every
cell peaks at 1 and touching cells are separated by a valley; background is 0."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def distance_map(labels: np.ndarray, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """float32 [H, W] in [0, 1] from an integer label image [H, W] (0 = background, any positive ids).

    Each cell's transform is computed in its bounding box grown by one pixel (clipped to the image), which
    holds the nearest outside pixel of every cell pixel, so the result equals a whole-image transform of
    `labels == id` per cell. As in scipy, the image border is not a boundary. With `window` (y0, y1, x0, x1),
    only the cells with a pixel in those rows and columns are computed (each whole: a cell's values depend on
    that cell alone), the rest stay 0: inside the window the map is exactly the full one."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.float32)
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None or (window is not None and not _meets(box, window)):
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        cell = labels[grown] == index + 1
        if cell.all():  # the cell fills the image: no outside pixel to measure from
            out[grown] = 1.0
            continue
        dist = ndimage.distance_transform_edt(cell)
        out[grown][cell] = (dist[cell] / dist.max()).astype(np.float32)
    return out


def _meets(box: tuple[slice, slice], window: tuple[int, int, int, int]) -> bool:
    y0, y1, x0, x1 = window
    return box[0].start < y1 and box[0].stop > y0 and box[1].start < x1 and box[1].stop > x0
