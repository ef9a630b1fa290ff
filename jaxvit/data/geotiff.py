"""GeoTIFF georeferencing carried from an input tile to an output made on the same grid.

The tags that place a raster on the Earth (GeoTIFF 1.0 / GDAL): pixel scale, tie points, the transformation
matrix, the GeoKey directory with its double and ASCII parameters (the CRS), and GDAL's nodata. They are copied
verbatim, so an output of the input's size has the input's transform and CRS.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GEO_TAGS = {33550: "ModelPixelScaleTag", 33922: "ModelTiepointTag", 34264: "ModelTransformationTag",
            34735: "GeoKeyDirectoryTag", 34736: "GeoDoubleParamsTag", 34737: "GeoAsciiParamsTag",
            42113: "GDAL_NODATA"}


def read_georeference(path: str | Path) -> list[tuple]:
    """The input's geo tags as tifffile `extratags` ((code, dtype, count, value, writeonce), ...); [] if none (or
    not a TIFF)."""
    import tifffile
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return []
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            return [(t.code, t.dtype, t.count, t.value, True) for t in tags.values() if t.code in GEO_TAGS]
    except (OSError, ValueError, tifffile.TiffFileError):
        return []


def write_geotiff(path: str | Path, bands: np.ndarray, georeference: list[tuple]) -> None:
    """bands [H, W, C] as a C-band float32 GeoTIFF (one plane per band, as GDAL writes) with `georeference`."""
    import tifffile
    data = np.moveaxis(np.asarray(bands, np.float32), -1, 0)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate", extratags=georeference,
                     compression="zlib")
