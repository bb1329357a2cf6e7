"""Whole-slide images for tests: small tiled pyramidal TIFFs that OpenSlide reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pyramid(
    path: Path, base: np.ndarray, levels: int = 3, mpp: float | None = 0.5, unit: str = "CENTIMETER"
):
    """A tiled pyramidal TIFF, each level half the previous (exact decimation, so reads are checkable)."""
    import tifffile

    per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit]
    with tifffile.TiffWriter(path) as tif:
        level = base
        for index in range(levels):
            kwargs = {}
            if mpp is not None:
                res = per_unit / (mpp * 2**index)
                kwargs = {"resolution": (res, res), "resolutionunit": unit}
            tif.write(
                level,
                tile=(128, 128),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if index == 0 else 1,
                **kwargs,
            )
            level = np.ascontiguousarray(level[::2, ::2])
    return path
