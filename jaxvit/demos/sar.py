"""Synthetic paired Sentinel-1 / Sentinel-2 tiles in the layout of jaxvit.tasks.sar_grounding.pairs, for the stage-3 demo.

Each scene (256 x 256 px at 10 m) is a land-cover map: rectangular parcels from recursive splits (vegetation
of varying cover, bare soil of varying moisture, urban blocks of buildings and streets), a meandering river,
straight roads. Both sensors are rendered from that one map and its per-parcel parameters, so their edges
coincide:
  S2L2A  12 bands (B01 ... B12, no B10) as reflectance x 10000 (uint16, like the L2A product): per-class
         spectra, vegetation as a linear mix of canopy and soil by its cover, darker wet soil, a smooth
         within-parcel variation and 1 % sensor noise;
  S1GRD  VV, VH in dB (float32): water dark (specular), urban bright (double bounce), vegetation brighter in
         VH with cover, soil brighter with moisture, roads dark; multiplicative gamma speckle (ENL 4.4, as the
         IW GRD high-resolution product) applied to linear backscatter.
Scenes are cut into 64 x 64 tiles; splits hold whole scenes (spatially disjoint, as EO splits should be).

    root/pairs.csv            s1_path,s2_path,split,id
    root/s1/<id>.tif          (2, 64, 64) float32 GeoTIFF (UTM 32N, 10 m pixels), or <id>.npy with fmt="npy"
    root/s2/<id>.tif          (12, 64, 64) uint16 GeoTIFF, or .npy
    root/.synthetic_sar.json  marker with the parameters, written last

`write_dataset(root, seed=0)` writes the default 16 scenes (192/32/32 tiles) in a few seconds, into a temporary
folder first, then moved in place; a complete set with the same parameters is not written again. Run
`python -m jaxvit.demos.sar --root=DIR` to write it.
"""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from jaxvit.demos.once import write_once

DEMO_NAME = "synthetic_sar"  # its marker: <root>/.synthetic_sar.json
SCENE, TILE = 256, 64
DEFAULT_SCENES: dict[str, int] = {"train": 12, "val": 2, "test": 2}
ENL = 4.4  # equivalent number of looks of Sentinel-1 IW GRD (high resolution)
_VERSION = 1  # bump when the renderer changes so cached sets are redone
WATER, VEGETATION, SOIL, URBAN, ROAD = range(5)

# Reflectance x 10000 of B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12.
_SPECTRA = {
    "water": (700, 600, 500, 350, 300, 250, 230, 200, 180, 170, 60, 40),
    "canopy": (250, 300, 600, 300, 1000, 3000, 3800, 4000, 4100, 4000, 2000, 900),
    "soil": (1100, 1300, 1700, 2100, 2400, 2600, 2750, 2900, 3000, 3000, 3600, 3000),
    "roof": (1500, 1700, 1800, 1900, 2000, 2100, 2200, 2300, 2350, 2300, 2600, 2400),
    "asphalt": (900, 950, 1000, 1050, 1100, 1150, 1200, 1250, 1280, 1250, 1400, 1300),
}


def _parcels(rng: np.random.Generator, size: int) -> list[tuple[int, int, int, int]]:
    """Recursive splits of the scene into rectangles (y0, x0, y1, x1) with sides of about 12 to 96 px."""
    todo, done = [(0, 0, size, size)], []
    while todo:
        y0, x0, y1, x1 = todo.pop()
        h, w = y1 - y0, x1 - x0
        if max(h, w) < 24 or (max(h, w) < 96 and rng.random() < 0.3):
            done.append((y0, x0, y1, x1))
            continue
        t = rng.uniform(0.3, 0.7)
        if h >= w:
            cut = y0 + int(round(h * t))
            todo += [(y0, x0, cut, x1), (cut, x0, y1, x1)]
        else:
            cut = x0 + int(round(w * t))
            todo += [(y0, x0, y1, cut), (y0, cut, y1, x1)]
    return done


def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-scale noise varying over about `cell` pixels (a coarse grid resized bilinearly)."""
    coarse = rng.normal(0.0, 1.0, (size // cell + 2, size // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def render_scene(rng: np.random.Generator, size: int = SCENE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (land-cover class map int [H, W], S2L2A float32 [H, W, 12] reflectance x 10000,
    S1 float32 [H, W, 2] VV/VH dB)."""
    cls = np.full((size, size), VEGETATION, np.int32)
    cover = np.zeros((size, size), np.float32)  # vegetation fraction
    moisture = np.zeros((size, size), np.float32)  # soil moisture 0..1
    yy, xx = np.mgrid[:size, :size]
    for y0, x0, y1, x1 in _parcels(rng, size):
        kind = rng.choice([VEGETATION, SOIL, URBAN, WATER], p=[0.5, 0.3, 0.14, 0.06])
        cls[y0:y1, x0:x1] = kind
        cover[y0:y1, x0:x1] = rng.uniform(0.35, 1.0) if kind == VEGETATION else 0.0
        moisture[y0:y1, x0:x1] = rng.uniform(0.0, 1.0)
        if kind == URBAN:  # buildings on a street grid; the streets are ROAD pixels
            block = int(rng.integers(6, 11))
            street = ((yy[y0:y1, x0:x1] - y0) % block < 2) | ((xx[y0:y1, x0:x1] - x0) % block < 2)
            cls[y0:y1, x0:x1][street] = ROAD
    texture = _smooth_noise(rng, size, 12)
    cover = np.where(cls == VEGETATION, np.clip(cover + 0.08 * texture, 0.0, 1.0), 0.0)
    moisture = np.clip(moisture + 0.1 * texture, 0.0, 1.0)
    if rng.random() < 0.8:  # a river meandering across the scene
        amp, period, phase = rng.uniform(10, 40), rng.uniform(80, 250), rng.uniform(0, 2 * np.pi)
        along, across = (xx, yy) if rng.random() < 0.5 else (yy, xx)
        centre = rng.uniform(0.25, 0.75) * size + amp * np.sin(2 * np.pi * along / period + phase)
        cls[np.abs(across - centre) < rng.uniform(2.5, 7.0)] = WATER
    for _ in range(int(rng.integers(0, 3))):  # straight roads
        pos, width = int(rng.integers(8, size - 8)), int(rng.integers(1, 3))
        road = (np.abs(yy - pos) < width) if rng.random() < 0.5 else (np.abs(xx - pos) < width)
        cls[road & (cls != WATER)] = ROAD

    spec = {k: np.asarray(v, np.float32) for k, v in _SPECTRA.items()}
    soil = spec["soil"] * (1.0 - 0.45 * moisture)[..., None]  # wet soil is darker
    s2 = np.where((cls == VEGETATION)[..., None], cover[..., None] * spec["canopy"]
                  + (1.0 - cover[..., None]) * soil, soil)
    for kind, name in ((WATER, "water"), (URBAN, "roof"), (ROAD, "asphalt")):
        s2[cls == kind] = spec[name]
    s2 = s2 * (1.0 + 0.03 * texture[..., None]) * rng.normal(1.0, 0.01, s2.shape) + rng.normal(0, 15, s2.shape)

    vv = np.select([cls == WATER, cls == VEGETATION, cls == SOIL, cls == URBAN, cls == ROAD],
                   [-22.0, -13.0 + 4.0 * cover, -16.0 + 8.0 * moisture, -2.0, -17.0])
    vh = np.select([cls == WATER, cls == VEGETATION, cls == SOIL, cls == URBAN, cls == ROAD],
                   [-29.0, -21.0 + 7.0 * cover, -24.0 + 6.0 * moisture, -9.0, -25.0])
    linear = 10.0 ** (np.stack([vv, vh], -1) / 10.0) * rng.gamma(ENL, 1.0 / ENL, (size, size, 2))
    s1 = 10.0 * np.log10(linear)
    return cls, np.clip(s2, 1, 65535).astype(np.float32), s1.astype(np.float32)


def _geotags(x0: float, y0: float) -> list[tuple]:
    """GeoTIFF tags: 10 m pixels, upper-left corner (x0, y0) in UTM zone 32N (EPSG:32632)."""
    keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632)
    return [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True),
            (34735, "H", len(keys), keys, True)]


def _save(path: Path, bands: np.ndarray, tags: list[tuple]) -> None:
    """A (C, H, W) stack as a band-interleaved GeoTIFF or a .npy file."""
    if path.suffix == ".npy":
        np.save(path, bands)
    else:
        tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate", metadata=None,
                         extratags=tags)


def write_dataset(root: str | os.PathLike, *, scenes: dict[str, int] | None = None, seed: int = 0,
                  fmt: str = "tif", tile: int = TILE) -> Path:
    """Write the synthetic pairs under `root` once (`jaxvit.demos.write_once`: redone when incomplete or the
    parameters change). `scenes` maps split -> number of 256 x 256 scenes, each cut into tile x tile tiles
    (default 16 of 64 px; 256: one tile per scene, TerraMind's tile size); `fmt` is "tif" or "npy"."""
    if SCENE % tile:
        raise ValueError(f"tile must divide the scene size {SCENE}, got {tile}")
    if fmt not in ("tif", "npy"):
        raise ValueError(f"fmt must be 'tif' or 'npy', got {fmt!r}")
    scenes = dict(DEFAULT_SCENES if scenes is None else scenes)
    params = {"version": _VERSION, "scenes": scenes, "seed": seed, "fmt": fmt}
    if tile != TILE:  # the default sets keep their marker
        params["tile"] = tile

    def write(out: Path) -> None:
        (out / "s1").mkdir()
        (out / "s2").mkdir()
        rows, index = [], 0
        for split, n in scenes.items():
            for _ in range(n):
                rng = np.random.default_rng([seed, index])
                _, s2, s1 = render_scene(rng)
                e0, n0 = 300000.0 + 5000.0 * index, 5000000.0  # scenes side by side, 2.56 km apart
                for r in range(SCENE // tile):
                    for c in range(SCENE // tile):
                        tile_id = f"scene{index:03d}_r{r}c{c}"
                        win = np.s_[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                        tags = _geotags(e0 + 10.0 * c * tile, n0 - 10.0 * r * tile)
                        _save(out / "s2" / f"{tile_id}.{fmt}", np.moveaxis(np.rint(s2[win]), -1, 0).astype(np.uint16),
                              tags)
                        _save(out / "s1" / f"{tile_id}.{fmt}", np.moveaxis(s1[win], -1, 0).copy(), tags)
                        rows.append((f"s1/{tile_id}.{fmt}", f"s2/{tile_id}.{fmt}", split, tile_id))
                index += 1
        with open(out / "pairs.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("s1_path", "s2_path", "split", "id"))
            w.writerows(rows)

    return write_once(root, DEMO_NAME, params, write, ("pairs.csv", "s1", "s2"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fmt", choices=("tif", "npy"), default="tif")
    for split, n in DEFAULT_SCENES.items():
        ap.add_argument(f"--{split}", type=int, default=n, help=f"scenes in {split} (16 tiles each)")
    a = ap.parse_args(argv)
    root = write_dataset(a.root, scenes={s: getattr(a, s) for s in DEFAULT_SCENES}, seed=a.seed, fmt=a.fmt)
    print(f"synthetic SAR/optical pairs at {root}")


if __name__ == "__main__":
    main()
