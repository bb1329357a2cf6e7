"""Resample a fixed-size, 1 mm, LPS-aligned cube around a world-space point.

Resampling the whole scan to 1 mm and then cropping costs seconds on a 512x512x300 CT; sampling
only the cube's own grid through the image affine gives the same voxels in milliseconds, which is
what makes an interactive click affordable.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy.ndimage import map_coordinates

# a step along L, P, S in world RAS coordinates (MONAI's convention)
_LPS_SIGNS = np.array([-1.0, -1.0, 1.0])


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Map (N, D) world (RAS) points to continuous voxel indices of an image with the (D+1)^2 ``affine``."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    dims = inverse.shape[0] - 1
    homogeneous = np.concatenate([np.asarray(points_mm, float), np.ones((len(points_mm), 1))], axis=1)
    return (homogeneous @ inverse.T)[:, :dims]


def voxel_to_world(affine: np.ndarray, points_ijk: np.ndarray) -> np.ndarray:
    """Map (N, D) voxel indices to world millimetres through the (D+1)^2 ``affine`` (D = 2 or 3)."""
    affine = np.asarray(affine, dtype=np.float64)
    homogeneous = np.concatenate([np.asarray(points_ijk, float), np.ones((len(points_ijk), 1))], axis=1)
    return (homogeneous @ affine.T)[:, : affine.shape[0] - 1]


def cube_affine(center_mm: Sequence[float], size: int, spacing: float) -> np.ndarray:
    """Affine (RAS) of a ``size``^3 cube of ``spacing`` mm whose voxel axes run along L, P, S.

    Voxel ``size // 2`` sits on the centre, as in a centre crop of an even-sized array.
    """
    affine = np.eye(4)
    affine[:3, :3] = np.diag(_LPS_SIGNS * spacing)
    affine[:3, 3] = np.asarray(center_mm, dtype=np.float64) - affine[:3, :3] @ np.full(3, size // 2)
    return affine


class ResampleCube(Transform):
    """Sample a ``size``^3 cube of ``spacing`` mm around ``center_mm`` (world RAS) with linear interpolation.

    Points outside the scan get ``padding_value``, in the image's own units (HU for CT): air by
    default; a bundle that follows a recipe padding with 0 HU before the HU window sets 0.
    """

    def __init__(self, size: int = 100, spacing: float = 1.0, padding_value: float = -1000.0, order: int = 1):
        self.size = size
        self.spacing = spacing
        self.padding_value = padding_value
        self.order = order

    def __call__(self, image: torch.Tensor, center_mm: Sequence[float]) -> MetaTensor:
        """``image``: (1, I, J, K) MetaTensor -> (1, size, size, size) MetaTensor with the cube's affine."""
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected a single-channel 3D image (1, I, J, K), got shape {tuple(image.shape)}")
        center = np.asarray(center_mm, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(center)):
            raise ValueError(f"lesion centre {center.tolist()} is not a finite point in millimetres")
        affine = cube_affine(center, self.size, self.spacing)
        grid = np.stack(np.meshgrid(*[np.arange(self.size)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
        source_affine = image.affine.numpy() if isinstance(image, MetaTensor) else np.eye(4)
        coords = world_to_voxel(source_affine, voxel_to_world(affine, grid)).T
        volume = image[0].detach().cpu().numpy().astype(np.float32, copy=False)
        cube = map_coordinates(volume, coords, order=self.order, mode="constant", cval=self.padding_value)
        cube = cube.reshape(1, self.size, self.size, self.size)
        return MetaTensor(torch.from_numpy(cube), affine=torch.from_numpy(affine))


class ResampleCubed(MapTransform):
    """Dictionary version of :class:`ResampleCube`; the centre is read from ``data[center_key]``."""

    def __init__(
        self,
        keys: KeysCollection,
        center_key: str = "center_mm",
        size: int = 100,
        spacing: float = 1.0,
        padding_value: float = -1000.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.center_key = center_key
        self.resampler = ResampleCube(size=size, spacing=spacing, padding_value=padding_value)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler(d[key], d[self.center_key])
        return d
