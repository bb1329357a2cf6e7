"""The way back from a resampled cube to the image it was cut from.

:class:`~oncofusion.transforms.geometry.ResampleCube` samples a cube around a lesion through the image
affine; a map computed on the cube (a Grad-CAM heatmap, a segmentation) is drawn for the user on the
original image grid. This samples the cube's values at every image voxel inside the cube, through the
two affines, so it is exact for any image orientation and spacing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates

from oncofusion.transforms.geometry import voxel_to_world, world_to_voxel


def cube_to_image(values: np.ndarray, cube_affine: np.ndarray, image_affine: np.ndarray,
                  image_shape: Sequence[int], order: int = 1, fill: float = 0.0) -> np.ndarray:
    """``values`` ``(N, N, N)`` on the cube grid -> ``image_shape`` array, ``fill`` outside the cube.

    Only the image voxels in the cube's bounding box are visited, so a small cube in a large scan costs
    little.
    """
    values = np.asarray(values, np.float32)
    shape = np.asarray(image_shape, int)
    corners = np.array([[a, b, c] for a in (0, values.shape[0] - 1) for b in (0, values.shape[1] - 1)
                        for c in (0, values.shape[2] - 1)], float)
    corner_ijk = world_to_voxel(image_affine, voxel_to_world(cube_affine, corners))
    low = np.clip(np.floor(corner_ijk.min(0)).astype(int), 0, shape)
    high = np.clip(np.ceil(corner_ijk.max(0)).astype(int) + 1, 0, shape)
    out = np.full(tuple(shape), fill, np.float32)
    if np.any(high <= low):
        return out
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=True)], indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    cube_ijk = world_to_voxel(cube_affine, voxel_to_world(image_affine, grid))
    inside = np.all((cube_ijk >= -0.5) & (cube_ijk <= np.asarray(values.shape) - 0.5), axis=1)
    sampled = map_coordinates(values, cube_ijk[inside].T, order=order, mode="nearest")
    out[tuple(grid[inside].T)] = sampled
    return out
