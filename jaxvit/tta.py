"""Test-time augmentation (`eval.tta`): extra views of an already-transformed batch (normalised NHWC, square),
made on device inside the jitted function; a task averages its outputs over the plain batch and these views.

    hflip   the image mirrored left-right                                            (1 view)
    vflip   the image mirrored top-bottom                                            (1 view)
    rot90   the image rotated by 90, 180 and 270 degrees                             (3 views)
    crops5  4 corner crops and the centre crop, each CROP_FRACTION of the side, resized back (bicubic)  (5 views)
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxvit.errors import ConfigError

VIEWS = ("hflip", "vflip", "rot90", "crops5")
CROP_FRACTION = 0.875


def problem(names: Sequence[str]) -> str | None:
    """One line naming unknown view names, or None."""
    bad = [n for n in names if n not in VIEWS]
    if bad:
        return f"eval.tta={tuple(names)!r}: unknown view {', '.join(map(repr, bad))}; use any of {', '.join(VIEWS)}"
    return None


def check(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a tuple; a ConfigError (one line) for unknown ones."""
    if bad := problem(names):
        raise ConfigError(bad)
    return tuple(names)


def from_flag(value: str) -> tuple[str, ...]:
    """Views of a command-line value: 'hflip,vflip'; '' = none."""
    return tuple(n for n in value.split(",") if n)


def views(images: jax.Array, names: Sequence[str]) -> list[jax.Array]:
    """The batch itself, then the views each name adds, in order; each the shape of `images` [B, S, S, C]."""
    out = [images]
    for name in names:
        if name == "hflip":
            out.append(images[:, :, ::-1])
        elif name == "vflip":
            out.append(images[:, ::-1])
        elif name == "rot90":
            out += [jnp.rot90(images, k, axes=(1, 2)) for k in (1, 2, 3)]
        elif name == "crops5":
            h, w = images.shape[1:3]
            ch, cw = round(h * CROP_FRACTION), round(w * CROP_FRACTION)
            corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
            out += [jax.image.resize(images[:, y:y + ch, x:x + cw], images.shape, "cubic").astype(images.dtype)
                    for y, x in corners]
        else:
            raise ValueError(problem(names))
    return out


def average(fn: Callable[[jax.Array], jax.Array], images: jax.Array, names: Sequence[str]) -> jax.Array:
    """The mean of `fn` (per-example outputs) over the batch and its views."""
    outs = [fn(v) for v in views(images, names)]
    return sum(outs[1:], outs[0]) / len(outs)
