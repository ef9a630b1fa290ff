"""iBOT block masks: the official DINOv2 `MaskingGenerator` (dinov2/data/masking.py) and the masks of its
`collate_data_and_cast` (dinov2/data/collate.py), in numpy driven by one `np.random.Generator`.

Random numbers are drawn in the official order, with `random.uniform(a, b)` as `a + (b - a) * rng.random()`,
`random.randint(a, b)` as `rng.integers(a, b + 1)` and `random.shuffle` as a permutation by `rng.permutation`,
so the official code fed those draws gives the same masks (tested).

Top-up: DINOv2 does NOT top the mask up: blocks are added until the target count is reached, the next block
would overshoot it, or 10 proposals in a row add nothing; the count is then <= the target (often below it).
DINOv3 (dinov3/data/masking.py) adds `complete_mask_randomly`: the shortfall is filled with uniformly random
single patches, so the count is exact; its collate also uses the stratum's upper ratio (not a uniform draw).
`top_up=True` / `style="dinov3"` select that behaviour (DINOv3's optional random circular shift is not offered).
"""
from __future__ import annotations

import math

import numpy as np


def _propose(rng, grid, max_patches, min_num_patches, log_aspect):
    """One official block proposal: area ~ U(min, max), aspect = exp U(log range); (top, left, h, w) or None."""
    area = min_num_patches + (max_patches - min_num_patches) * rng.random()
    aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
    h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if not (w < grid[1] and h < grid[0]):  # strictly smaller than the grid, as the official code
        return None
    return int(rng.integers(0, grid[0] - h + 1)), int(rng.integers(0, grid[1] - w + 1)), h, w


def _add_block(rng, mask, max_patches, min_num_patches, log_aspect):
    """The official `_mask`: up to 10 proposals; the first one adding 1..max_patches new patches is masked.
    Returns the number of patches added (0: none fitted)."""
    for _ in range(10):
        block = _propose(rng, mask.shape, max_patches, min_num_patches, log_aspect)
        if block is None:
            continue
        top, left, h, w = block
        window = mask[top:top + h, left:left + w]
        new = h * w - int(window.sum())
        if 0 < new <= max_patches:
            window[...] = True
            return new
    return 0


def block_mask(rng: np.random.Generator, grid, num_masking_patches: int, min_num_patches: int = 4,
               max_num_patches=None, min_aspect: float = 0.3, max_aspect=None, top_up: bool = False) -> np.ndarray:
    """bool[h, w] with about `num_masking_patches` patches masked in random rectangles (the official algorithm).

    Blocks of area U(min_num_patches, min(remaining, max_num_patches)) and log-uniform aspect in
    [min_aspect, max_aspect or 1/min_aspect] are added until the count reaches the target or no block fits.
    max_num_patches=None: no cap beyond the target. top_up: fill the shortfall with random patches (DINOv3)."""
    h, w = grid
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    cap = num_masking_patches if max_num_patches is None else max_num_patches
    mask = np.zeros((h, w), bool)
    count = 0
    while count < num_masking_patches:
        added = _add_block(rng, mask, min(num_masking_patches - count, cap), min_num_patches, log_aspect)
        if added == 0:
            break
        count += added
    if top_up and count < num_masking_patches:
        free = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[rng.choice(free, size=num_masking_patches - count, replace=False)] = True
    return mask


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 values bit-identical to `torch.linspace(start, end, steps)` on CPU (fused multiply-add halves)."""
    lo, hi = np.float32(start), np.float32(end)
    step = np.float64((hi - lo) / np.float32(max(steps - 1, 1)))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, np.float64(lo) + step * i, np.float64(hi) - step * (steps - 1 - i))
    return out.astype(np.float32)


def batch_masks(rng: np.random.Generator, batch: int, grid, mask_probability: float = 0.5, ratio=(0.1, 0.5),
                max_num_patches=None, style: str = "dinov2") -> np.ndarray:
    """bool[batch, h*w]: int(batch * p) images masked with stratified ratios, the rest unmasked, shuffled.

    The official collate: probs = linspace(*ratio, n + 1) (float32); masked image i gets
    block_mask(int(N * U(probs[i], probs[i+1]))) ("dinov2") or block_mask(int(N * probs[i+1]), top_up=True)
    ("dinov3"). max_num_patches=None is 0.5 * h * w; the official train.py passes
    `0.5 * img // patch * img // patch` (equal for 224/14; pass it to match other sizes exactly)."""
    if style not in ("dinov2", "dinov3"):
        raise ValueError(f"style={style!r}: use 'dinov2' or 'dinov3'")
    h, w = grid
    n_tokens = h * w
    cap = 0.5 * n_tokens if max_num_patches is None else max_num_patches
    n_masked = int(batch * mask_probability)
    probs = _torch_linspace(*ratio, n_masked + 1)
    masks = np.zeros((batch, h, w), bool)
    for i in range(n_masked):
        lo, hi = probs[i], probs[i + 1]
        frac = hi if style == "dinov3" else lo + (hi - lo) * rng.random()  # float32, as the official tensors
        masks[i] = block_mask(rng, grid, int(n_tokens * frac), max_num_patches=cap, top_up=style == "dinov3")
    return masks[rng.permutation(batch)].reshape(batch, n_tokens)
