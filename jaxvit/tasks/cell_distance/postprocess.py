"""Distance map -> cell instances, as DINOCell / SAMCell: each connected region of map > peak_threshold is one
cell's marker; a watershed on the negated map grows the markers over the region map > fill_threshold, so cells
that touch meet at the valley of the map between their peaks."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

PEAK_THRESHOLD = 0.47  # DINOCell's cells_max
FILL_THRESHOLD = 0.09  # DINOCell's cell_fill


def instances(dist_map: np.ndarray, peak_threshold: float = PEAK_THRESHOLD,
              fill_threshold: float = FILL_THRESHOLD) -> np.ndarray:
    """int32 label image [H, W] (0 = background, cells 1..n) of a distance map [H, W]."""
    from skimage.segmentation import watershed

    dist_map = np.asarray(dist_map, np.float32)
    markers, n = ndimage.label(dist_map > peak_threshold)
    if n == 0:
        return np.zeros(dist_map.shape, np.int32)
    return watershed(-dist_map, markers, mask=dist_map > fill_threshold).astype(np.int32)
