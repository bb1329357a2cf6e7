"""The nine 2D views through a nodule: three orthogonal planes and two planes of each 45-degree rotation.

The authors' cube comes out of ``Orientationd(axcodes="LPS")`` and ``Transposed(indices=(0, 3, 2, 1))``,
so its axes run along S, P, L: view 0 (normal to axis 0) is axial with rows running anterior to
posterior and columns right to left, view 1 coronal and view 2 sagittal, both with rows running
inferior to superior. ``ResampleCube`` gives an (L, P, S) cube; :class:`NineViewsd` transposes it to
(S, P, L) first, so a pretrained encoder sees the images the authors trained on.

The authors rotate the whole cube three times with ``scipy.ndimage.rotate`` and slice it. Only nine
50x50 planes are ever used, so here each plane's sample points are mapped back through the rotation
and interpolated directly: the same numbers (cubic B-spline interpolation is separable and exact at
grid nodes) for a fraction of the work.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from scipy.ndimage import map_coordinates, rotate

# (axes of the 45-degree rotation or None, axis normal to the sampled plane) on the (S, P, L) cube,
# in the authors' order
VIEW_PLANES: tuple[tuple[tuple[int, int] | None, int], ...] = (
    (None, 0),
    (None, 1),
    (None, 2),
    ((0, 2), 0),
    ((0, 2), 2),
    ((0, 1), 0),
    ((0, 1), 1),
    ((1, 2), 1),
    ((1, 2), 2),
)
NUM_VIEWS = len(VIEW_PLANES)
VIEW_NAMES: tuple[str, ...] = (
    "axial",
    "coronal",
    "sagittal",
    "oblique S-L 1",
    "oblique S-L 2",
    "oblique S-P 1",
    "oblique S-P 2",
    "oblique P-L 1",
    "oblique P-L 2",
)
ROTATION_DEGREES = 45.0
# ResampleCube's (L, P, S) axes -> the authors' (S, P, L)
LPS_TO_VIEW_AXES = (2, 1, 0)
CUBE_AXCODES = ("L", "P", "S")


def _plane_coordinates(
    shape: tuple[int, int, int],
    rotation_axes: tuple[int, int] | None,
    normal_axis: int,
    view_size: int,
    slice_offset: int,
    shifts: tuple[int, int],
) -> np.ndarray:
    """Source-cube coordinates (3, view_size, view_size) of one view, as ``scipy.ndimage.rotate`` defines them."""
    size = np.asarray(shape)
    in_plane = [axis for axis in range(3) if axis != normal_axis]
    rotated = np.zeros((3, view_size, view_size))
    rotated[normal_axis] = size[normal_axis] // 2 + slice_offset
    for grid_axis, (axis, shift) in enumerate(zip(in_plane, shifts, strict=False)):
        start = size[axis] // 2 - view_size // 2 + shift
        line = np.arange(start, start + view_size, dtype=np.float64)
        rotated[axis] = line[:, None] if grid_axis == 0 else line[None, :]
    if rotation_axes is None:
        return rotated
    a, b = rotation_axes
    cos, sin = np.cos(np.deg2rad(ROTATION_DEGREES)), np.sin(np.deg2rad(ROTATION_DEGREES))
    center = (size[[a, b]] - 1) / 2.0
    ua, ub = rotated[a] - center[0], rotated[b] - center[1]
    source = rotated.copy()
    source[a] = cos * ua + sin * ub + center[0]
    source[b] = -sin * ua + cos * ub + center[1]
    return source


def extract_nine_views(
    cube: np.ndarray,
    view_size: int = 50,
    output_size: int = 224,
    order: int = 3,
    slice_offsets: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
) -> np.ndarray:
    """Nine views (9, output_size, output_size) of an (S, P, L) cube centred on the nodule.

    ``shifts`` (9, 2) move each view's 2D crop, as the authors' training jitter does;
    ``slice_offsets`` (9,) move each plane along its normal, which the authors never do. Both are zero
    at inference. Each view is resized bilinearly (corners aligned, like ``scipy.ndimage.zoom(order=1)``)
    to ``output_size``. Samples beyond the cube read 0, like ``scipy.ndimage.rotate``'s default.
    """
    if cube.ndim != 3:
        raise ValueError(f"expected a 3D cube (S, P, L), got shape {cube.shape}")
    slice_offsets = np.zeros(NUM_VIEWS, int) if slice_offsets is None else slice_offsets
    shifts = np.zeros((NUM_VIEWS, 2), int) if shifts is None else shifts
    coords = np.stack(
        [
            _plane_coordinates(cube.shape, axes, normal, view_size, int(offset), tuple(shift))
            for (axes, normal), offset, shift in zip(VIEW_PLANES, slice_offsets, shifts, strict=False)
        ],
        axis=1,
    )  # (3, 9, view_size, view_size)
    views = map_coordinates(
        cube.astype(np.float32, copy=False), coords, order=order, mode="constant", cval=0.0
    )
    return resize_views(views, output_size)


def resize_views(views: np.ndarray, output_size: int) -> np.ndarray:
    """Bilinear resize of (V, h, w) views to (V, output_size, output_size)."""
    if views.shape[-1] == output_size and views.shape[-2] == output_size:
        return views
    tensor = torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32))[None]
    resized = F.interpolate(tensor, size=(output_size, output_size), mode="bilinear", align_corners=True)
    return resized[0].numpy()


def reference_nine_views(cube: np.ndarray, view_size: int = 50, order: int = 3) -> np.ndarray:
    """The authors' recipe on an (S, P, L) cube, plane by plane with ``scipy.ndimage.rotate``: slow, kept to
    test and benchmark against."""
    center = [n // 2 for n in cube.shape]
    views = []
    for axes, normal in VIEW_PLANES:
        volume = (
            cube if axes is None else rotate(cube, ROTATION_DEGREES, axes=axes, reshape=False, order=order)
        )
        plane = np.take(volume, center[normal], axis=normal)
        in_plane = [center[axis] for axis in range(3) if axis != normal]
        rows = slice(in_plane[0] - view_size // 2, in_plane[0] - view_size // 2 + view_size)
        cols = slice(in_plane[1] - view_size // 2, in_plane[1] - view_size // 2 + view_size)
        views.append(plane[rows, cols])
    return np.stack(views).astype(np.float32)


def lps_cube_to_view_axes(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(1, L, P, S) cube, as ``ResampleCube`` makes it -> (S, P, L) array, as the authors slice it.

    A cube that carries an affine must have L, P, S axes; a plain array is taken to have them.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a single-channel cube (1, L, P, S), got shape {tuple(image.shape)}")
    if isinstance(image, MetaTensor):
        axcodes = nib.orientations.aff2axcodes(image.affine.numpy())
        if tuple(axcodes) != CUBE_AXCODES:
            raise ValueError(
                f"the nine views need a cube with L, P, S axes, got {''.join(axcodes)}: crop it with "
                "ResampleCubed or orient it with Orientationd(axcodes='LPS') first"
            )
    cube = image[0].detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)[0]
    return cube.transpose(LPS_TO_VIEW_AXES)


class NineViewsd(Randomizable, MapTransform):
    """(1, L, P, S) cube -> (9, output_size, output_size) views, one view per channel, in the authors'
    orientation and order (see the module docstring).

    With ``max_shift`` > 0 (training; the authors use 5) each view's crop moves by a random integer in
    ``[-max_shift, max_shift)`` along both of its axes. ``max_slice_shift`` > 0 also moves each plane
    along its normal by an integer in ``[-max_slice_shift, max_slice_shift)``: not in the authors' code,
    so off by default.
    """

    def __init__(
        self,
        keys: KeysCollection,
        view_size: int = 50,
        output_size: int = 224,
        order: int = 3,
        max_shift: int = 0,
        max_slice_shift: int = 0,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if max_shift < 0 or max_slice_shift < 0:
            raise ValueError(
                f"max_shift ({max_shift}) and max_slice_shift ({max_slice_shift}) must be >= 0; use 0 for none"
            )
        self.view_size = view_size
        self.output_size = output_size
        self.order = order
        self.max_shift = max_shift
        self.max_slice_shift = max_slice_shift
        self._shifts = np.zeros((NUM_VIEWS, 2), int)
        self._slice_offsets = np.zeros(NUM_VIEWS, int)

    def randomize(self, data: object = None) -> None:
        if self.max_shift > 0:
            self._shifts = self.R.randint(-self.max_shift, self.max_shift, size=(NUM_VIEWS, 2))
        if self.max_slice_shift > 0:
            self._slice_offsets = self.R.randint(-self.max_slice_shift, self.max_slice_shift, size=NUM_VIEWS)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            views = extract_nine_views(
                lps_cube_to_view_axes(d[key]),
                self.view_size,
                self.output_size,
                self.order,
                self._slice_offsets,
                self._shifts,
            )
            d[key] = torch.from_numpy(views)
        return d
