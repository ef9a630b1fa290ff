"""Synthetic Galaxy Zoo 2 (five-class) images for demos and tests.

Renders toy galaxies from simple photometric profiles (Sersic spheroids, thin
exponential disks with dust lanes, logarithmic spirals), convolves them with a
Gaussian PSF, adds star/neighbour contaminants and Poisson + sky noise, then
applies a Lupton-style asinh colour stretch like SDSS gri composites.

``write_demo`` (data.demo="gz2") writes them as the Galaxy Zoo 2 release publishes its galaxies, then builds the
five-class folders of the Galaxy Zoo 2 DINOv3 project from them with ``python -m jaxvit.data.gz2``::

    root/gz2_hart16.csv.gz            Hart et al. (2016) style: dr7objid, ra, dec, ..., *_debiased vote fractions
    root/gz2_filename_mapping.csv     objid, sample, asset_id
    root/images_gz2/images/<asset_id>.jpg
    root/gz2_5class_{train,val,test}/<class>/<asset_id>.jpg, root/gz2_5class_metadata.csv   (built)

``write_dataset`` renders the five-class folders directly (lossless PNGs, for tests and benchmarks).
Run ``python -m jaxvit.demos.gz2 --root=DIR`` to write the demo set.
"""
from __future__ import annotations

import argparse
import csv
import functools
import gzip
import os
import pathlib
import zlib
from typing import Any

import numpy as np
from PIL import Image

from jaxvit.demos.once import write_once
from jaxvit.data import gz2 as gz2_builder
from jaxvit.data.gz2 import CLASSES, METADATA_NAME
from jaxvit.files import write_csv

DEFAULT_PER_CLASS: dict[str, int] = {"train": 400, "val": 60, "test": 100}
DEMO_NAME = "synthetic_gz2"  # its marker: <root>/.synthetic_gz2.json
_VERSION = 2  # bump when the renderer changes so cached datasets are redone

# Intrinsic axis-ratio and Sersic-index ranges for the smooth classes: round
# systems are concentrated ellipticals, flattened ones are disky (S0-like).
_SMOOTH_Q = {
    "completely_round_smooth": (0.9, 1.0),
    "in_between_smooth": (0.4, 0.62),
    "cigar_shaped_smooth": (0.16, 0.3),
}
_SMOOTH_N = {
    "completely_round_smooth": (2.5, 4.0),
    "in_between_smooth": (1.5, 3.0),
    "cigar_shaped_smooth": (0.8, 1.8),
}
# Metadata columns, in order; parameters a class does not use are left blank.
PARAM_COLUMNS: tuple[str, ...] = (
    "axis_ratio", "angle_deg", "radius_px", "sersic_n", "brightness",
    "bulge_frac", "n_arms", "pitch_deg", "dust_lane", "psf_sigma_px",
    "sky_sigma", "n_stars", "neighbour",
)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each of shape (size, size)."""
    c = np.arange(size, dtype=np.float64)
    return np.meshgrid(c, c, indexing="ij")


def _rotated(size: int, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) a major axis at `angle` radians."""
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    return dx * ca + dy * sa, -dx * sa + dy * ca


def _sersic(r: np.ndarray, re: float, n: float) -> np.ndarray:
    """Sersic profile normalised to 1 at the effective radius (b_n ~ 2n - 1/3)."""
    b = 2.0 * n - 1.0 / 3.0
    return np.exp(-b * ((r / re) ** (1.0 / n) - 1.0))


def _elliptical_r(u: np.ndarray, v: np.ndarray, q: float) -> np.ndarray:
    # Softened by a quarter pixel so the core stays finite on the pixel grid.
    return np.sqrt(u * u + (v / q) ** 2 + 0.25)


def _tint(rng: np.random.Generator, base: tuple[float, float, float], jitter: float = 0.06) -> np.ndarray:
    """RGB weights around `base` (R, G, B), normalised to unit mean."""
    c = np.asarray(base) * (1.0 + rng.normal(0.0, jitter, 3))
    return np.clip(c, 0.05, None) / np.clip(c, 0.05, None).mean()


_YELLOW = (1.25, 1.0, 0.72)  # old stellar populations (ellipticals, bulges)
_BLUE = (0.75, 0.95, 1.3)  # star-forming arms


def _smooth(cls: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, s: float, p: dict) -> np.ndarray:
    q = rng.uniform(*_SMOOTH_Q[cls])
    re = rng.uniform(8.0, 13.0) * s  # large enough that the shape spans several ViT patches
    n = rng.uniform(*_SMOOTH_N[cls])
    p.update(axis_ratio=q, radius_px=re, sersic_n=n)
    prof = _sersic(_elliptical_r(u, v, q), re, n)
    return prof[None] * _tint(rng, _YELLOW)[:, None, None]


def _edge_on(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, s: float, p: dict) -> np.ndarray:
    h = rng.uniform(5.5, 9.0) * s  # radial scale length
    q = rng.uniform(0.06, 0.12)  # scale height / scale length
    z0 = q * h
    # Exponential along the major axis, sech^2 across it.
    disk = np.exp(-np.sqrt(u * u + 0.25) / h) / np.cosh(v / z0) ** 2
    bulge_frac = rng.uniform(0.1, 0.6)
    bulge = bulge_frac * 3.0 * _sersic(_elliptical_r(u, v, rng.uniform(0.6, 0.9)), 0.3 * h, 1.5)
    img = 5.0 * disk[None] * _tint(rng, (1.1, 1.0, 0.9))[:, None, None]
    img = img + bulge[None] * _tint(rng, _YELLOW)[:, None, None]
    dust = rng.random() < 0.7
    if dust:  # absorbing lane along the midplane, fading towards the disk ends
        w = z0 * rng.uniform(0.4, 0.7)
        depth = rng.uniform(0.4, 0.85) * np.exp(-((u / (2.5 * h)) ** 2))
        trans = 1.0 - depth * np.exp(-((v / w) ** 2))
        img = img * trans[None] ** np.array([1.2, 1.0, 0.8])[:, None, None]  # dust reddens
    p.update(axis_ratio=q, radius_px=h, bulge_frac=bulge_frac, dust_lane=int(dust))
    return img


def _spiral(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, s: float, p: dict) -> np.ndarray:
    h = rng.uniform(5.0, 8.0) * s
    q = rng.uniform(0.5, 1.0)  # cos(inclination)
    m = int(rng.choice([2, 2, 3, 4]))
    pitch = np.deg2rad(rng.uniform(12.0, 30.0))
    # Deproject onto the disk plane: radius and azimuth in the galaxy frame.
    vd = v / q
    r = np.sqrt(u * u + vd * vd + 0.25)
    theta = np.arctan2(vd, u)
    chirality = rng.choice([-1.0, 1.0])
    phase = m * (theta - chirality * np.log(r / h) / np.tan(pitch)) + rng.uniform(0, 2 * np.pi)
    sharp = rng.uniform(2.0, 4.0)
    arms = ((1.0 + np.cos(phase)) / 2.0) ** sharp
    arms *= 1.0 - np.exp(-((r / (0.8 * h)) ** 2))  # arms start outside the bulge
    disk = np.exp(-r / h)
    strength = rng.uniform(1.5, 3.0)
    bulge_frac = rng.uniform(0.3, 1.0)
    bulge = bulge_frac * 4.0 * _sersic(_elliptical_r(u, v, max(q, 0.8)), 0.25 * h, 2.0)
    img = (0.6 * disk)[None] * _tint(rng, (1.0, 1.0, 0.95))[:, None, None]
    img = img + (strength * disk * arms)[None] * _tint(rng, _BLUE)[:, None, None]
    img = img + bulge[None] * _tint(rng, _YELLOW)[:, None, None]
    p.update(axis_ratio=q, radius_px=h, bulge_frac=bulge_frac, n_arms=m, pitch_deg=np.rad2deg(pitch))
    return img


def _psf_matrix(size: int, sigma: float) -> np.ndarray:
    """Row-normalised 1-D Gaussian convolution as a (size, size) matrix."""
    c = np.arange(size, dtype=np.float64)
    k = np.exp(-0.5 * ((c[:, None] - c[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _render(cls: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
    s = size / 64.0  # all lengths are tuned at 64 px and scale with the image
    cx, cy = (size - 1) / 2 + rng.normal(0.0, 1.0 * s, 2)
    angle = rng.uniform(0.0, 2 * np.pi)  # galaxies have no "up"
    u, v = _rotated(size, cx, cy, angle)
    p: dict[str, Any] = {"angle_deg": np.rad2deg(angle)}
    if cls == "edge_on":
        img = _edge_on(rng, u, v, s, p)
    elif cls == "spiral":
        img = _spiral(rng, u, v, s, p)
    else:
        img = _smooth(cls, rng, u, v, s, p)
    brightness = rng.uniform(0.6, 1.6)
    img = img * (0.12 * brightness)  # surface brightness at ~1 effective radius

    # Contaminants: background stars (delta functions, PSF-blurred below) and,
    # occasionally, a small faint neighbour galaxy away from the centre.
    n_stars = int(rng.poisson(1.2))
    if n_stars:
        ang = rng.uniform(0, 2 * np.pi, n_stars)
        rad = rng.uniform(0.3, 0.48, n_stars) * size
        iy = np.clip(np.round(cy + rad * np.sin(ang)).astype(int), 0, size - 1)
        ix = np.clip(np.round(cx + rad * np.cos(ang)).astype(int), 0, size - 1)
        flux = np.exp(rng.uniform(np.log(0.5), np.log(6.0), n_stars)) * s * s
        col = np.stack([_tint(rng, (1.0, 1.0, 1.0), 0.15) for _ in range(n_stars)], axis=1)
        np.add.at(img, (slice(None), iy, ix), col * flux)
    neighbour = rng.random() < 0.25
    if neighbour:
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.33, 0.45) * size
        nu, nv = _rotated(size, cx + d * np.cos(a), cy + d * np.sin(a), rng.uniform(0, np.pi))
        nb = _sersic(_elliptical_r(nu, nv, rng.uniform(0.4, 1.0)), rng.uniform(1.0, 2.5) * s, 1.5)
        img = img + (rng.uniform(0.03, 0.1) * nb)[None] * _tint(rng, _YELLOW)[:, None, None]

    # PSF: separable Gaussian blur applied as K @ img @ K^T per channel.
    psf = rng.uniform(0.7, 1.3) * s
    k = _psf_matrix(size, psf)
    img = k @ img @ k.T

    # Noise: photon noise on galaxy + sky (Gaussian approximation of Poisson,
    # variance = counts / gain) plus Gaussian sky/read noise, in one draw.
    gain = rng.uniform(150.0, 400.0)
    sky_sigma = rng.uniform(0.006, 0.015)
    sigma = np.sqrt((np.clip(img, 0, None) + 0.02) / gain + sky_sigma**2)
    img = img + sigma * rng.standard_normal(img.shape)

    # Lupton-style asinh stretch on total intensity (preserves colour).
    beta, alpha = 0.02, rng.uniform(0.9, 1.1)
    total = np.maximum(img.mean(axis=0), 1e-6)
    scale = np.arcsinh(total / beta) / np.arcsinh(alpha / beta) / total
    rgb = np.clip(img, 0, None) * scale[None]
    rgb = rgb / np.maximum(rgb.max(axis=0, keepdims=True), 1.0)  # clip without hue shift
    out = np.round(rgb.transpose(1, 2, 0) * 255.0).astype(np.uint8)

    p.update(brightness=brightness, psf_sigma_px=psf, sky_sigma=sky_sigma,
             n_stars=n_stars, neighbour=int(neighbour))
    return out, p


def render_galaxy(cls: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Render one synthetic galaxy of class `cls` as a uint8 (size, size, 3) image."""
    return _render(cls, rng, size)[0]


def render_galaxy_with_params(
    cls: str, rng: np.random.Generator, size: int = 64
) -> tuple[np.ndarray, dict[str, Any]]:
    """Like `render_galaxy`, also returning the drawn rendering parameters."""
    return _render(cls, rng, size)


def split_dir(root: str | os.PathLike, split: str) -> pathlib.Path:
    return pathlib.Path(root) / f"gz2_5class_{split}"


def _split_rng(seed: int, split: str, class_index: int) -> np.random.Generator:
    # Keyed by split *name* so each split (and class) has its own stream.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), class_index])


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_dataset(
    root: str | os.PathLike,
    *,
    per_class: dict[str, int] | None = None,
    size: int = 64,
    seed: int = 0,
) -> pathlib.Path:
    """Render the five-class folders directly (lossless PNGs, with the rendering parameters in the metadata; for
    tests and benchmarks), once (`jaxvit.demos.write_once`). `per_class` maps split name -> images per class."""
    per_class = dict(DEFAULT_PER_CLASS if per_class is None else per_class)
    params = {"version": _VERSION, "classes": list(CLASSES), "per_class": per_class, "size": size, "seed": seed}

    def write(out: pathlib.Path) -> None:
        rows: list[dict[str, Any]] = []
        for split, n in per_class.items():
            for ci, cls in enumerate(CLASSES):
                folder = split_dir(out, split) / cls
                folder.mkdir(parents=True)
                rng = _split_rng(seed, split, ci)
                for i in range(n):
                    img, p = _render(cls, rng, size)
                    name = f"{split}_{ci}_{i:05d}.png"
                    Image.fromarray(img).save(folder / name, compress_level=1)
                    rows.append({"split": split, "class": cls, "label": ci, "filename": name, **p})
        fields = ["split", "class", "label", "filename", *PARAM_COLUMNS]
        write_csv(out / METADATA_NAME, fields, [{k: _fmt(v) for k, v in r.items()} for r in rows])

    entries = (*(split_dir("", s).name for s in per_class), METADATA_NAME)
    return write_once(root, DEMO_NAME, params, write, entries)


# The Galaxy Zoo 2 public release (Hart et al. 2016 table, filename mapping, images_gz2/images/<asset_id>.jpg).
HART_NAME, MAPPING_NAME, IMAGES_DIR = "gz2_hart16.csv.gz", "gz2_filename_mapping.csv", "images_gz2/images"
GZ2_CLASS = {"completely_round_smooth": "Er", "in_between_smooth": "Ei", "cigar_shaped_smooth": "Ec",
             "edge_on": "Ser", "spiral": "Sc"}  # the table's gz2_class of a typical member
_ANSWERS = ("t01_smooth_or_features_a01_smooth", "t01_smooth_or_features_a02_features_or_disk",
            "t01_smooth_or_features_a03_star_or_artifact", "t02_edgeon_a04_yes", "t02_edgeon_a05_no",
            "t04_spiral_a08_spiral", "t04_spiral_a09_no_spiral", "t07_rounded_a16_completely_round",
            "t07_rounded_a17_in_between", "t07_rounded_a18_cigar_shaped")
HART_COLUMNS = ("dr7objid", "ra", "dec", "sample", "gz2_class", "total_classifications",
                *(f"{a}_debiased" for a in _ANSWERS))
JPEG_QUALITY = 95


def _votes(cls: str | None, rng: np.random.Generator) -> dict[str, float]:
    """Debiased vote fractions of a galaxy the volunteers saw as `cls` (None: undecided, meeting no rule of
    jaxvit.data.gz2). Each question's answers sum to 1; the decisive ones are above the rules' 0.5."""
    majority = lambda: rng.uniform(0.55, 0.95)  # noqa: E731
    smooth_classes = CLASSES[:3]
    if cls is None:  # split between smooth and disk (the rest: star or artifact)
        smooth, disk = rng.uniform(0.3, 0.48, 2)
    elif cls in smooth_classes:
        smooth = majority()
        disk = (1 - smooth) * rng.uniform(0.9, 1.0)
    else:
        disk = majority()
        smooth = (1 - disk) * rng.uniform(0.9, 1.0)
    edge = majority() if cls == "edge_on" else rng.uniform(0.0, 0.3)
    spiral = majority() if cls == "spiral" else rng.uniform(0.0, 0.45)
    rounded = rng.dirichlet((1.0, 1.0, 1.0))  # how rounded: a majority for smooth classes only
    if cls in smooth_classes:
        k, top = smooth_classes.index(cls), majority()
        rounded = np.insert(np.delete(rounded, k) / (1 - rounded[k]) * (1 - top), k, top)
    return dict(zip((f"{a}_debiased" for a in _ANSWERS),
                    (smooth, disk, 1 - smooth - disk, edge, 1 - edge, spiral, 1 - spiral, *rounded)))


def write_release(out: str | os.PathLike, per_class: int, size: int = 64, seed: int = 0,
                  undecided: float = 0.1) -> pathlib.Path:
    """Write synthetic galaxies as Galaxy Zoo 2 publishes them into `out`: gz2_hart16.csv.gz (one row per galaxy:
    dr7objid, position, debiased vote fractions that make it its class), gz2_filename_mapping.csv (objid, sample,
    asset_id) and images_gz2/images/<asset_id>.jpg. `per_class` galaxies of each class, plus a share `undecided`
    of galaxies whose votes meet no rule (the builder leaves them out)."""
    out = pathlib.Path(out)
    (out / IMAGES_DIR).mkdir(parents=True)
    table, mapping = [], []
    undecided_n = round(undecided * per_class * len(CLASSES))
    shown = [(cls, ci) for ci, cls in enumerate(CLASSES) for _ in range(per_class)]
    shown += [(None, i % len(CLASSES)) for i in range(undecided_n)]  # rendered as some class, voted undecided
    order = np.random.default_rng([seed, 1]).permutation(len(shown))  # objids are not sorted by class
    streams = [_split_rng(seed, "release", ci) for ci in range(len(CLASSES))]
    for k, j in enumerate(order):
        cls, ci = shown[j]
        rng = streams[ci]
        img = render_galaxy(CLASSES[ci], rng, size)
        objid, asset = str(587722981736000000 + 4096 * (k + 1)), str(k + 1)
        Image.fromarray(img).save(out / IMAGES_DIR / f"{asset}.jpg", quality=JPEG_QUALITY)
        votes = {c: f"{v:.3f}" for c, v in _votes(cls, rng).items()}
        table.append({"dr7objid": objid, "ra": f"{rng.uniform(0, 360):.6f}", "dec": f"{rng.uniform(-10, 70):.6f}",
                      "sample": "original", "gz2_class": GZ2_CLASS.get(cls, "S"),
                      "total_classifications": int(rng.integers(28, 60)), **votes})
        mapping.append({"objid": objid, "sample": "original", "asset_id": asset})
    with gzip.open(out / HART_NAME, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(HART_COLUMNS))
        writer.writeheader()
        writer.writerows(table)
    write_csv(out / MAPPING_NAME, ["objid", "sample", "asset_id"], mapping)
    return out


def write_demo(root: str | os.PathLike, *, per_class: dict[str, int] | None = None, size: int = 64,
               seed: int = 0) -> pathlib.Path:
    """The GZ2 demo (data.demo="gz2"), once: the synthetic release (`write_release`) in `root`, and the five-class
    folders built from it by `python -m jaxvit.data.gz2` (per_class[split] galaxies of each class per split)."""
    per_class = dict(DEFAULT_PER_CLASS if per_class is None else per_class)
    params = {"version": _VERSION, "release": True, "per_class": per_class, "size": size, "seed": seed}

    def write(out: pathlib.Path) -> None:
        write_release(out, sum(per_class.values()), size, seed)
        built = out / "built"
        args = ["--hart_csv", str(out / HART_NAME), "--mapping_csv", str(out / MAPPING_NAME),
                "--images_dir", str(out / IMAGES_DIR), "--out", str(built), "--seed", str(seed),
                *(f"--{s}={per_class.get(s, 0) * len(CLASSES)}" for s in gz2_builder.SPLITS)]
        gz2_builder.build(gz2_builder.parser().parse_args(args))
        for entry in built.iterdir():
            os.replace(entry, out / entry.name)
        built.rmdir()

    entries = (HART_NAME, MAPPING_NAME, IMAGES_DIR.split("/")[0], METADATA_NAME,
               *(split_dir("", s).name for s in gz2_builder.SPLITS))
    return write_once(root, DEMO_NAME, params, write, entries)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="output directory")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=DEFAULT_PER_CLASS["train"], help="images per class")
    ap.add_argument("--val", type=int, default=DEFAULT_PER_CLASS["val"])
    ap.add_argument("--test", type=int, default=DEFAULT_PER_CLASS["test"])
    a = ap.parse_args(argv)
    root = write_demo(a.root, per_class={"train": a.train, "val": a.val, "test": a.test}, size=a.size, seed=a.seed)
    print(f"synthetic GZ2 release and five-class folders at {root}")


if __name__ == "__main__":
    main()
