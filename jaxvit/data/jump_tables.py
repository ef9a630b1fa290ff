"""JUMP load-data tables as published (the CPJUMP1 / Cell Painting Gallery layout) -> one table of sites.

  ssl.jump.load_data  a table or a glob of them, relative to data.data_dir: per-plate
                      `load_data_csv/<batch>/<plate>/load_data.csv.gz` or `load_data_with_illum.csv.gz` (CSV, gzipped
                      CSV or parquet); their rows are concatenated (columns missing from a table are empty)
  ssl.jump.path_map   ("s3://bucket/prefix=/local/mirror", ...): PathName_* prefixes rewritten to a local copy
                      (a relative mirror is relative to data.data_dir)
  ssl.jump.platemap_dir `metadata/platemaps/<batch>/` (barcode_platemap.csv: Assay_Plate_Barcode, Plate_Map_Name;
                      platemap/<Plate_Map_Name>.txt, tab-separated, with well_position): adds the platemap's
                      columns to each site by (plate, well); ssl.jump.label_column may then name one (e.g. broad_sample,
                      or pert_iname after joining your compound metadata)
  ssl.jump.split_column absent and data.val_fraction > 0: Metadata_Split is made here, "val" for the held-out plates or
                      wells (ssl.jump.holdout_by), "train" for the rest (jaxvit.data.holdout)
"""
from __future__ import annotations

import csv
import glob
import gzip
from pathlib import Path
from typing import Any

from jaxvit.data.holdout import held_out
from jaxvit.errors import ConfigError, DataError, MissingDataError

Columns = dict[str, list[str]]


def read_any(path: Path) -> Columns:
    """A CSV, gzipped CSV or parquet table as columns of stripped strings ("" where missing)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        data = pq.read_table(path).to_pydict()
        return {k.strip(): ["" if v is None else str(v).strip() for v in col] for k, col in data.items()}
    opener = gzip.open if path.suffix == ".gz" else open
    delimiter = "\t" if path.name.endswith((".txt", ".tsv", ".txt.gz", ".tsv.gz")) else ","
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise DataError(f"{path} is empty: expected a header row")
            columns: Columns = {h: [] for h in header}
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}: line {reader.line_num} has {len(row)} fields, the header "
                                    f"{len(header)}; fix that row")
                for h, v in zip(header, row):
                    columns[h].append(v.strip())
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the table ({e})") from e
    return columns


def concat(tables: list[Columns]) -> Columns:
    names = list(dict.fromkeys(c for t in tables for c in t))
    out: Columns = {c: [] for c in names}
    for t in tables:
        n = len(next(iter(t.values()), []))
        for c in names:
            out[c].extend(t.get(c, [""] * n))
    return out


def find_tables(data_dir: str, pattern: str) -> list[Path]:
    full = pattern if Path(pattern).is_absolute() else str(Path(data_dir) / pattern)
    found = sorted(Path(p) for p in glob.glob(full, recursive=True))
    if not found:
        raise MissingDataError(f"ssl.jump.load_data={pattern!r}: no table matches {full!r}; set data.data_dir and "
                               "ssl.jump.load_data (a file, or a glob such as load_data_csv/*/*/load_data.csv.gz)")
    return found


def map_paths(cols: Columns, path_map: tuple[str, ...], data_dir: str = "") -> None:
    """Rewrites PathName_* values that start with a mapped prefix (in place); a relative LOCAL_DIR is relative to
    data_dir."""
    rules = []
    for rule in path_map:
        prefix, sep, local = rule.partition("=")
        if not sep or not prefix:
            raise ConfigError(f"ssl.jump.path_map entry {rule!r} is not PREFIX=LOCAL_DIR (e.g. "
                              "'s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images=/data/jump/images')")
        local = str((Path(data_dir) / local).absolute())  # an absolute LOCAL_DIR stays as it is
        rules.append((prefix.rstrip("/"), local.rstrip("/")))
    for name, values in cols.items():
        if name.startswith("PathName_"):
            for i, v in enumerate(values):
                for prefix, local in rules:
                    if v == prefix or v.startswith(prefix + "/"):
                        values[i] = local + v[len(prefix):]
                        break


def join_platemaps(cols: Columns, platemap_dir: Path) -> None:
    """Adds each site's platemap columns (matched on Metadata_Plate = Assay_Plate_Barcode, Metadata_Well =
    well_position) in place; a plate or well missing from the platemaps is an error naming it."""
    barcodes = read_any(_exists(platemap_dir / "barcode_platemap.csv"))
    for c in ("Assay_Plate_Barcode", "Plate_Map_Name"):
        if c not in barcodes:
            raise DataError(f"{platemap_dir / 'barcode_platemap.csv'}: no column {c!r} (found {list(barcodes)})")
    plate_map = dict(zip(barcodes["Assay_Plate_Barcode"], barcodes["Plate_Map_Name"]))
    maps: dict[str, dict[str, dict[str, str]]] = {}
    for name in set(plate_map.values()):
        path = _exists(platemap_dir / "platemap" / f"{name}.txt")
        table = read_any(path)
        if "well_position" not in table:
            raise DataError(f"{path}: no column 'well_position' (found {list(table)})")
        rows = [dict(zip(table, values)) for values in zip(*table.values())]
        maps[name] = {r["well_position"]: r for r in rows}
    added = list(dict.fromkeys(k for m in maps.values() for r in m.values() for k in r if k != "well_position"))
    for k in added:
        cols.setdefault(k, [""] * len(cols["Metadata_Plate"]))
    for i, (plate, well) in enumerate(zip(cols["Metadata_Plate"], cols["Metadata_Well"])):
        if plate not in plate_map:
            raise DataError(f"plate {plate!r} of the load-data tables is not in {platemap_dir / 'barcode_platemap.csv'}"
                            " (Assay_Plate_Barcode); add it or leave that plate's table out of ssl.jump.load_data")
        row = maps[plate_map[plate]].get(well)
        if row is None:
            raise DataError(f"well {well!r} of plate {plate!r} is not in platemap {plate_map[plate]}.txt")
        for k in added:
            cols[k][i] = row.get(k, "")


def add_split(cols: Columns, split_column: str, fraction: float, by: str) -> None:
    keys = {"plate": cols["Metadata_Plate"],
            "well": [f"{p}/{w}" for p, w in zip(cols["Metadata_Plate"], cols["Metadata_Well"])]}
    if by not in keys:
        raise ConfigError(f"ssl.jump.holdout_by={by!r}: use 'plate' or 'well'")
    cols[split_column] = ["val" if v else "train" for v in held_out(keys[by], fraction)]


def _exists(path: Path) -> Path:
    if not path.is_file():
        raise MissingDataError(f"{str(path)!r} not found (ssl.jump.platemap_dir must be metadata/platemaps/<batch>/ with "
                               "barcode_platemap.csv and platemap/<Plate_Map_Name>.txt)")
    return path


def _absolute_paths(cols: Columns, folder: Path) -> Columns:
    """Relative PathName_* values (not URLs) resolved against their table's folder."""
    for name, values in cols.items():
        if name.startswith("PathName_"):
            cols[name] = [v if not v or "://" in v or Path(v).is_absolute() else str(folder.absolute() / v)
                          for v in values]
    return cols


def site_table(data_cfg: Any, get) -> tuple[Columns, str]:
    """(columns, location) of the sites that data_cfg names, assembled as the module docstring says."""
    tables = find_tables(data_cfg.data_dir, get("load_data"))
    cols = concat([_absolute_paths(read_any(t), t.parent) for t in tables])
    location = str(tables[0]) if len(tables) == 1 else f"{len(tables)} tables {get('load_data')!r}"
    map_paths(cols, tuple(get("path_map")), data_cfg.data_dir)
    if get("platemap_dir"):
        join_platemaps(cols, Path(data_cfg.data_dir) / get("platemap_dir"))
    fraction = getattr(data_cfg, "val_fraction", 0.0)
    if fraction and get("split_column") not in cols and "Metadata_Plate" in cols:
        add_split(cols, get("split_column"), fraction, get("holdout_by"))
    return cols, location
