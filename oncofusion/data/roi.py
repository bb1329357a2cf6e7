"""The lesion region of a :class:`~oncofusion.contract.Roi` on the image grid, and its size.

A click is a point, so it is widened to a ball of ``radius_mm``; a box and a mask are taken as drawn.
The region bounds where an explanation is drawn and tells whether the lesion fits the model's crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oncofusion.contract import Roi


def roi_region(roi: Roi, shape: Sequence[int], affine: np.ndarray, radius_mm: float = 10.0) -> np.ndarray:
    """Boolean mask on the image grid: the mask, the box (inclusive, rounded outwards) or balls at the clicks."""
    shape = tuple(int(s) for s in shape)
    if roi.mask is not None:
        return np.asarray(roi.mask) > 0
    region = np.zeros(shape, bool)
    if roi.box is not None:
        lo = np.clip(np.floor(np.asarray(roi.box[0], float)).astype(int), 0, np.asarray(shape) - 1)
        hi = np.clip(np.ceil(np.asarray(roi.box[1], float)).astype(int), 0, np.asarray(shape) - 1)
        region[tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))] = True
        return region
    spacing = np.sqrt((np.asarray(affine, float)[:-1, :-1] ** 2).sum(axis=0))  # mm per voxel step, per axis
    for point in roi.points:
        point = np.asarray(point, float)
        reach = np.ceil(radius_mm / spacing).astype(int)
        lo = np.clip(np.floor(point).astype(int) - reach, 0, np.asarray(shape) - 1)
        hi = np.clip(np.ceil(point).astype(int) + reach, 0, np.asarray(shape) - 1)
        axes = [np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)]
        grid = np.meshgrid(*axes, indexing="ij")
        distance2 = sum(((g - p) * s) ** 2 for g, p, s in zip(grid, point, spacing, strict=True))
        region[tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))] |= distance2 <= radius_mm**2
    return region


def roi_extent_mm(region: np.ndarray, center_ijk: Sequence[float], affine: np.ndarray) -> float:
    """Largest distance (mm) from the centre to a voxel of the region; 0 for an empty region."""
    points = np.argwhere(region)
    if points.size == 0:
        return 0.0
    offsets = (points - np.asarray(center_ijk, float)) @ np.asarray(affine, float)[:-1, :-1].T
    return float(np.sqrt((offsets**2).sum(axis=1)).max())
