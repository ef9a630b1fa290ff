"""Synthetic Cell Painting sites in the JUMP "load data" layout, for demos and tests of jaxvit.data.jump.

Each site shows a few cells that may touch: an irregular, possibly elongated cell body around a textured
elliptical nucleus. The stains follow Cell Painting: DNA (nuclei), ER (a reticular network, denser near the
nucleus), RNA (cytoplasm and nucleoli), AGP (plasma membrane, Golgi, actin fibres), Mito (puncta), plus two
low-contrast brightfield planes (in focus and defocused). Four treatments (TREATMENTS, one per well, several
sites per well) change cell number and size, nucleus size, elongation, stain levels and Mito puncta; each well
has a random potency between DMSO and the full phenotype. Plates differ by per-channel gain, offset and
illumination gradient (batch effects). The acquisition adds blur and shot + read noise, as 16-bit counts.

`write_dataset(out_dir)` writes (7 to 12 s on 2 CPU cores for the default 600 sites of 96 x 96 px):

    load_data.csv                                   one row per site (COLUMNS)
    images/<plate>/r01c01f01p01-ch1sk1fk1fl1.tiff   one uint16 TIFF per channel (ch1..ch7 = CHANNELS)
    masks/<plate>/r01c01f01.png                     uint16 cell labels (0 background, 1..n whole cells)

Wells are split 60/20/20 into train / val / test per plate and treatment (Metadata_Split), so no well straddles
splits; PathName_* columns are relative to out_dir; the masks are the channel "CellMask" of the table.

The same sites are also listed as the Cell Painting Gallery publishes CPJUMP1 (`PUBLISHED_TABLES`): per-plate
`load_data_csv/<BATCH>/<plate>/load_data.csv.gz` without treatment or split, PathName_* under the S3 prefix
DEMO_S3 (map it to out_dir with ssl.jump.path_map), and the treatments in `metadata/platemaps/<BATCH>/`
(barcode_platemap.csv + platemap/<name>.txt with well_position, broad_sample).
Run ``python -m jaxvit.demos.cells --out DIR`` to write the default set.
"""
from __future__ import annotations

import argparse
import csv
import functools
import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import measure

from jaxvit.demos.once import write_once
from jaxvit.files import write_csv

CHANNELS = ("OrigDNA", "OrigER", "OrigRNA", "OrigAGP", "OrigMito", "OrigBrightfield", "OrigBrightfield_H")
TREATMENTS = ("DMSO", "compound_A", "compound_B", "compound_C")
COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Treatment", "Metadata_Split",
           *(f"{k}_{c}" for c in (*CHANNELS, "CellMask") for k in ("FileName", "PathName")))
SPLITS = ("train", "val", "test")
TABLE_NAME = "load_data.csv"
BATCH = "2020_11_04_CPJUMP1"
DEMO_S3 = f"s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/{BATCH}"  # stands for out_dir
PUBLISHED_TABLES = f"load_data_csv/{BATCH}/*/load_data.csv.gz"
PLATEMAPS = f"metadata/platemaps/{BATCH}"
DEMO_NAME = "synthetic_cells"  # its marker: <out_dir>/.synthetic_cells.json
_VERSION = 1  # bump when the renderer changes so written sets are redone
_REF_AREA = 96 * 96  # cell counts are per 96 x 96 px; cells keep their size in pixels at any image size

# Phenotypes. cells: mean cells per 96 x 96 px; cell_r, nuc_r: radii (px); elong: axis ratio; dna .. agp: stain
# levels; puncta: Mito puncta per cell of radius 12; mito: diffuse Mito level; fibres: AGP actin fibre level.
PHENOTYPES: dict[str, dict[str, float]] = {
    "DMSO": dict(cells=7, cell_r=12, nuc_r=5.5, elong=1.2, dna=1.0, er=1.0, rna=1.0, agp=1.0, puncta=14,
                 mito=0.15, fibres=0.0),
    "compound_A": dict(cells=3.5, cell_r=15, nuc_r=7.0, elong=1.1, dna=0.75, er=0.8, rna=1.0, agp=0.8, puncta=24,
                       mito=0.08, fibres=0.0),
    "compound_B": dict(cells=6.5, cell_r=12.5, nuc_r=5.5, elong=2.2, dna=1.0, er=1.6, rna=0.9, agp=1.6, puncta=12,
                       mito=0.15, fibres=1.0),
    "compound_C": dict(cells=12, cell_r=9.5, nuc_r=4.0, elong=1.15, dna=1.8, er=0.9, rna=1.4, agp=1.0, puncta=5,
                       mito=0.45, fibres=0.0),
}
_POTENCY = (0.7, 1.0)  # a well's phenotype = DMSO + potency * (treatment - DMSO)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32)
    return np.meshgrid(c, c, indexing="ij")


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth Gaussian noise of unit standard deviation."""
    g = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return g / (g.std() + 1e-6)


def _spots(size: int, ys: np.ndarray, xs: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian spots of peak ~1 at (ys, xs)."""
    img = np.zeros((size, size), np.float32)
    np.add.at(img, (np.clip(ys.round().astype(int), 0, size - 1), np.clip(xs.round().astype(int), 0, size - 1)), 1)
    return gaussian_filter(img, sigma) * np.float32(2 * np.pi * sigma * sigma)


def _place_cells(ph: dict[str, float], rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) and radii (n,) of cells that may touch but hardly overlap."""
    n = max(1, round(ph["cells"] * size * size / _REF_AREA * rng.lognormal(0.0, 0.15)))
    centres, radii = np.zeros((0, 2)), np.zeros(0)
    for _ in range(30 * n):
        if len(radii) == n:
            break
        c, r = rng.uniform(0, size, 2), ph["cell_r"] * rng.lognormal(0.0, 0.12)
        if np.all(np.hypot(*(centres - c).T) > 0.8 * (radii + r)):
            centres, radii = np.vstack([centres, c]), np.append(radii, r)
    return centres, radii


def _geometry(ph: dict[str, float], rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Cells as per-pixel fields: owner (cell index), d (0 at the owner's centre, 1 at its edge), inside, nucleus,
    dn (0 .. 1 across the nucleus), v (across the cell's long axis); and per cell: radii, nucleus centres / radii."""
    yy, xx = _grid(size)
    centres, radii = _place_cells(ph, rng, size)
    n = len(radii)
    col = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1)  # noqa: E731 - per cell, broadcast over pixels
    angle = rng.uniform(0, np.pi, n)
    q = col(np.sqrt(ph["elong"] * rng.lognormal(0.0, 0.1, n)))  # square root of the axis ratio (area kept)
    dx, dy = xx - col(centres[:, 1]), yy - col(centres[:, 0])
    u = dx * col(np.cos(angle)) + dy * col(np.sin(angle))  # along the cell's long axis
    v = -dx * col(np.sin(angle)) + dy * col(np.cos(angle))
    phi = np.arctan2(v, u)
    wobble = 1 + col(rng.uniform(0, 0.12, n)) * np.cos(2 * phi + col(rng.uniform(0, 6.3, n))) \
        + col(rng.uniform(0, 0.1, n)) * np.cos(3 * phi + col(rng.uniform(0, 6.3, n)))
    d = np.hypot(u / q, v * q) / (col(radii) * wobble)  # < 1 inside each cell
    owner = d.argmin(axis=0)  # touching cells split the pixels they share
    own = lambda a: np.take_along_axis(a, owner[None], 0)[0]  # noqa: E731 - the owning cell's value per pixel
    inside = own(d) < 1
    # Nucleus: an ellipse near the centre, less elongated than the cell.
    nuc_r = ph["nuc_r"] * rng.lognormal(0.0, 0.1, n)
    off = rng.normal(0.0, 0.12, (2, n)) * radii  # along / across the long axis
    qn = np.sqrt(q)
    dn = own(np.hypot((u - col(off[0])) / qn, (v - col(off[1])) * qn) / col(nuc_r))
    nuc_y = centres[:, 0] + off[0] * np.sin(angle) + off[1] * np.cos(angle)
    nuc_x = centres[:, 1] + off[0] * np.cos(angle) - off[1] * np.sin(angle)
    return {"owner": owner, "d": own(d), "inside": inside, "nucleus": inside & (dn < 1), "dn": dn, "v": own(v),
            "radii": radii, "nuc_y": nuc_y, "nuc_x": nuc_x, "nuc_r": nuc_r}


def render_site(ph: dict[str, float], rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One site's true stain images, float32 [len(CHANNELS), size, size] (~0..1, brightfield ~1), and its cell
    labels, uint16 [size, size] (0 background, 1..n)."""
    g = _geometry(ph, rng, size)
    owner, inside, nucleus, dn, n = g["owner"], g["inside"], g["nucleus"], g["dn"], len(g["radii"])
    cyto = inside & ~nucleus
    radial = np.clip(1 - g["d"], 0, 1)  # 1 at a cell's centre, 0 at its edge
    level = {k: rng.lognormal(0.0, 0.15, n).astype(np.float32)[owner] * ph[k] for k in ("dna", "er", "rna", "agp")}

    dna = nucleus * level["dna"] * (0.7 + 0.3 * np.sqrt(np.clip(1 - dn * dn, 0, 1))) \
        * (1 + 0.2 * _noise(rng, size, 0.8))
    ridge = np.exp(-(_noise(rng, size, 1.5) / 0.45) ** 2)  # thin lines along zero crossings: a network
    er = cyto * level["er"] * (0.2 + 0.8 * ridge) * (0.4 + 0.8 * radial)
    k = rng.integers(1, 4, n)  # nucleoli per nucleus
    a, r = rng.uniform(0, 2 * np.pi, k.sum()), np.repeat(0.4 * g["nuc_r"], k) * np.sqrt(rng.uniform(0, 1, k.sum()))
    nucleoli = _spots(size, np.repeat(g["nuc_y"], k) + r * np.sin(a), np.repeat(g["nuc_x"], k) + r * np.cos(a), 0.9)
    rna = level["rna"] * (cyto * (0.3 + 0.7 * radial) * (1 + 0.15 * _noise(rng, size, 2))
                          + nucleus * (0.25 + 0.8 * nucleoli))
    a, r = rng.uniform(0, 2 * np.pi, n), g["nuc_r"] + 2  # Golgi beside the nucleus
    golgi = _spots(size, g["nuc_y"] + r * np.sin(a), g["nuc_x"] + r * np.cos(a), 1.6)
    fibres = ((1 + np.cos(2 * np.pi * g["v"] / 3.0)) / 2) ** 3  # stripes along the long axis
    agp = level["agp"] * (inside * (np.exp(-((1 - g["d"]) / 0.1) ** 2) + 0.6 * golgi)
                          + cyto * (0.1 + 0.5 * ph["fibres"] * fibres))
    cyto_idx = np.flatnonzero(cyto)  # Mito puncta at random cytoplasm pixels of each cell
    picks = [rng.choice(pool, rng.poisson(ph["puncta"] * (g["radii"][i] / 12) ** 2))
             for i in range(n) if (pool := cyto_idx[owner.ravel()[cyto_idx] == i]).size]
    ys, xs = np.divmod(np.concatenate([np.zeros(0, int), *picks]), size)
    mito = 0.8 * _spots(size, ys, xs, 0.8) + ph["mito"] * cyto * (0.5 + radial)
    edge = gaussian_filter(inside.astype(np.float32), 1.0)
    bf = 1 + 0.03 * inside * _noise(rng, size, 1.5) + 0.16 * edge * (1 - edge) + 0.02 * nucleus  # bright rims
    bf_h = 1 + 0.08 * (edge - gaussian_filter(inside.astype(np.float32), 5))  # defocused: a halo
    stains = np.stack([dna, er, rna, agp, mito, bf, bf_h]).astype(np.float32)
    labels = np.where(inside, owner + 1, 0)
    present = np.unique(labels[labels > 0])  # keep labels consecutive should a cell own no pixel
    relabel = np.zeros(n + 1, np.uint16)
    relabel[present] = np.arange(1, present.size + 1)
    return stains, relabel[labels]


def plate_effects(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Per-channel gain, offset (counts) and illumination field of one plate."""
    c = len(CHANNELS)
    yy, xx = _grid(size)
    y0, x0 = rng.uniform(0.2, 0.8, (2, c, 1, 1)) * size
    strength = rng.uniform(0.1, 0.35, (c, 1, 1))
    illum = 1 - strength * ((yy - y0) ** 2 + (xx - x0) ** 2) / (size * size / 2)
    return {"gain": np.exp(rng.uniform(-0.5, 0.5, (c, 1, 1))), "offset": rng.uniform(100, 600, (c, 1, 1)),
            "illum": illum.astype(np.float32)}


def acquire(stains: np.ndarray, plate: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Microscope counts, uint16 [C, H, W]: blur, plate gain / offset / illumination, shot and read noise."""
    fluor = len(CHANNELS) - 2
    x = gaussian_filter(stains, (0, 0.7, 0.7))
    full = np.full((len(CHANNELS), 1, 1), 9000.0)  # counts of a level-1 stain (brightfield: of the background)
    full[:fluor] = 12000.0
    x[:fluor] += 0.03  # autofluorescence
    counts = plate["offset"] + plate["illum"] * plate["gain"] * rng.lognormal(0.0, 0.05) * full * x
    counts += rng.standard_normal(counts.shape) * np.sqrt(np.maximum(counts, 0) * 0.5 + 20.0**2)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def _layout(n_plates: int, wells_per_treatment: int, seed: int, fractions: tuple[float, float]) -> list[dict[str, Any]]:
    """The wells: plate, row, column, treatment, split. One platemap for all plates; splits per plate."""
    n_wells = wells_per_treatment * len(TREATMENTS)
    if n_wells > 384:
        raise ValueError(f"{n_wells} wells do not fit a 384-well plate; lower wells_per_treatment")
    platemap = np.random.default_rng([seed, 0]).permutation(np.arange(n_wells) % len(TREATMENTS))
    a = round(wells_per_treatment * fractions[0])
    b = round(wells_per_treatment * (fractions[0] + fractions[1]))
    wells = []
    for p in range(n_plates):
        rng = np.random.default_rng([seed, 1, p])
        split = np.empty(n_wells, object)
        for t in range(len(TREATMENTS)):
            order = rng.permutation(np.flatnonzero(platemap == t))
            split[order[:a]], split[order[a:b]], split[order[b:]] = SPLITS
        for w in range(n_wells):
            wells.append({"plate": f"SYN{p + 1:05d}", "plate_index": p, "well_index": w, "row": w // 24 + 1,
                          "col": w % 24 + 1, "treatment": TREATMENTS[platemap[w]], "split": split[w]})
    return wells


def _table_rows(wells: list[dict[str, Any]], sites_per_well: int) -> list[dict[str, Any]]:
    rows = []
    for w in wells:
        for s in range(1, sites_per_well + 1):
            site_id = f"r{w['row']:02d}c{w['col']:02d}f{s:02d}"
            row = {"Metadata_Plate": w["plate"], "Metadata_Well": f"{chr(64 + w['row'])}{w['col']:02d}",
                   "Metadata_Site": s, "Metadata_Treatment": w["treatment"], "Metadata_Split": w["split"]}
            for c, name in enumerate(CHANNELS, 1):
                row[f"FileName_{name}"] = f"{site_id}p01-ch{c}sk1fk1fl1.tiff"
                row[f"PathName_{name}"] = f"images/{w['plate']}"
            row["FileName_CellMask"], row["PathName_CellMask"] = f"{site_id}.png", f"masks/{w['plate']}"
            rows.append(row)
    return rows


def write_dataset(out_dir: str | os.PathLike, seed: int = 0, n_plates: int = 3, wells_per_treatment: int = 10,
                  sites_per_well: int = 5, image_size: int = 96,
                  fractions: tuple[float, float] = (0.6, 0.2)) -> Path:
    """Write the set under `out_dir` once (`jaxvit.demos.write_once`: redone when incomplete or the parameters
    change); returns out_dir.

    n_plates x (4 x wells_per_treatment) wells x sites_per_well sites of image_size^2 px; `fractions` of each
    plate's wells per treatment go to train and val, the rest to test.
    """
    params = {"version": _VERSION, "seed": seed, "n_plates": n_plates, "wells_per_treatment": wells_per_treatment,
              "sites_per_well": sites_per_well, "image_size": image_size, "fractions": list(fractions)}
    wells = _layout(n_plates, wells_per_treatment, seed, fractions)
    rows = _table_rows(wells, sites_per_well)

    def write(root: Path) -> None:
        plates = [plate_effects(np.random.default_rng([seed, 2, p]), image_size) for p in range(n_plates)]
        for wi, w in enumerate(wells):
            (root / "images" / w["plate"]).mkdir(parents=True, exist_ok=True)
            (root / "masks" / w["plate"]).mkdir(parents=True, exist_ok=True)
            potency = np.random.default_rng([seed, 3, w["plate_index"], w["well_index"]]).uniform(*_POTENCY)
            for s in range(sites_per_well):
                rng = np.random.default_rng([seed, 4, w["plate_index"], w["well_index"], s])
                stains, labels = render_site(_phenotype(w["treatment"], potency), rng, image_size)
                counts = acquire(stains, plates[w["plate_index"]], rng)
                row = rows[wi * sites_per_well + s]
                for c, name in enumerate(CHANNELS):
                    tifffile.imwrite(root / row[f"PathName_{name}"] / row[f"FileName_{name}"], counts[c])
                Image.fromarray(labels).save(root / row["PathName_CellMask"] / row["FileName_CellMask"],
                                             compress_level=1)
        write_csv(root / TABLE_NAME, COLUMNS, rows)
        write_published(root, rows)

    entries = ("images", "masks", TABLE_NAME, "load_data_csv", "metadata")
    return write_once(out_dir, DEMO_NAME, params, write, entries)


def _phenotype(treatment: str, potency: float) -> dict[str, float]:
    """A well's phenotype: DMSO + potency * (treatment - DMSO)."""
    base, full = PHENOTYPES["DMSO"], PHENOTYPES[treatment]
    return {k: base[k] + potency * (full[k] - base[k]) for k in base}


def write_published(root: Path, rows: list[dict[str, Any]]) -> None:
    """The sites' per-plate gzipped load-data tables (S3 paths) and platemaps, as the gallery publishes them."""
    kept = [c for c in COLUMNS if c not in ("Metadata_Treatment", "Metadata_Split") and not c.endswith("CellMask")]
    plates = sorted({r["Metadata_Plate"] for r in rows})
    for plate in plates:
        table = root / "load_data_csv" / BATCH / plate / "load_data.csv.gz"
        table.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(table, "wt", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=kept, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**r, **{k: f"{DEMO_S3}/{r[k]}" for k in kept if k.startswith("PathName_")}}
                             for r in rows if r["Metadata_Plate"] == plate)
    maps = root / PLATEMAPS
    (maps / "platemap").mkdir(parents=True, exist_ok=True)
    name = "JUMP-Target-1_synthetic_platemap"  # one platemap for every plate, as _layout draws it
    (maps / "barcode_platemap.csv").write_text("Assay_Plate_Barcode,Plate_Map_Name\n"
                                               + "".join(f"{p},{name}\n" for p in plates))
    wells = dict.fromkeys((r["Metadata_Well"], r["Metadata_Treatment"]) for r in rows if r["Metadata_Plate"] == plates[0])
    (maps / "platemap" / f"{name}.txt").write_text("plate_map_name\twell_position\tbroad_sample\n" + "".join(
        f"{name}\t{well}\t{treatment}\n" for well, treatment in wells))


def write_livecell(out_dir: str | os.PathLike, seed: int = 0, counts: tuple[int, int, int] = (240, 48, 48),
                   size: int = 96) -> Path:
    """Synthetic sites in LIVECell's published layout (the DINOCell demo; once, `jaxvit.demos.write_once`):

        images/livecell_train_val_images/<split>_site_NNNN.tif   the 5 fluorescent channels, one uint16 CYX TIFF
        images/livecell_test_images/test_site_NNNN.tif
        annotations/LIVECell/livecell_coco_{train,val,test}.json  COCO instances: one polygon annotation per cell

    `counts` sites per split (train, val, test), of 4 treatments and 3 plates' gains and illumination.
    """
    params = {"version": _VERSION, "seed": seed, "counts": list(counts), "size": size}

    def write(root: Path) -> None:
        fluor = len(CHANNELS) - 2
        plates = [plate_effects(np.random.default_rng([seed, 2, p]), size) for p in range(3)]
        (root / "annotations" / "LIVECell").mkdir(parents=True)
        for s, (split, n) in enumerate(zip(SPLITS, counts)):
            folder = root / "images" / ("livecell_test_images" if split == "test" else "livecell_train_val_images")
            folder.mkdir(parents=True, exist_ok=True)
            images, annotations = [], {}
            for i in range(n):
                rng = np.random.default_rng([seed, 7, s, i])
                treatment = TREATMENTS[i % len(TREATMENTS)]
                stains, labels = render_site(_phenotype(treatment, rng.uniform(*_POTENCY)), rng, size)
                name = f"{split}_site_{i:04d}.tif"
                tifffile.imwrite(folder / name, acquire(stains, plates[i % len(plates)], rng)[:fluor],
                                 photometric="minisblack", metadata={"axes": "CYX"})
                images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
                for cell in range(1, int(labels.max()) + 1):
                    k = len(annotations) + 1
                    annotations[str(k)] = {"id": k, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                           "area": int((labels == cell).sum()),
                                           "segmentation": cell_polygons(labels == cell)}
            coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cell"}]}
            (root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json").write_text(json.dumps(coco))

    return write_once(out_dir, "synthetic_livecell", params, write, ("images", "annotations"))


def cell_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons [x1, y1, x2, y2, ...] of a cell's pixels (one per connected piece, holes left out): the
    outlines half-way between the cell's pixel centres and the others', pixel (r, c) centred at (c + 0.5, r + 0.5)."""
    contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    signed = [0.5 * np.sum(c[:-1, 0] * c[1:, 1] - c[1:, 0] * c[:-1, 1]) for c in contours]
    outer = np.sign(signed[int(np.argmax(np.abs(signed)))])  # the largest outline is outer; holes turn the other way
    return [np.round(c[:-1, ::-1] - 0.5, 2).ravel().tolist() for c, a in zip(contours, signed) if np.sign(a) == outer]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(f"synthetic Cell Painting set at {write_dataset(a.out, seed=a.seed)}")


if __name__ == "__main__":
    main()
