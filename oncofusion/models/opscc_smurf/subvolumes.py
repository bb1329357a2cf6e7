"""From a head-and-neck CT and its tumor and lymph-node masks to SMuRF's two CT inputs.

SMuRF reads each CT region (the primary tumor, the metastatic neck nodes) as four thin sub-volumes
stacked as four channels: one per quartile of the region's axial extent, so the encoder sees the top,
the middle and the bottom of the lesion rather than one slab. The steps, each a MONAI dictionary
transform that a bundle config composes (or :func:`subvolume_transforms` composes for it):

1. :class:`CheckRegionMasksd`: the CT is one 3D volume ``(1, X, Y, Z)`` with an affine; the masks lie
   on its grid; the tumor mask is not empty; an absent node mask (N0) becomes an empty one;
2. :class:`CropToRegionsd` (optional, on by default): the CT and masks cropped, on their own grid, to what
   the sub-volumes can reach, so that step 3 resamples centimetres, not the whole neck;
3. ``Spacingd`` to 1 mm isotropic (CT linear, masks nearest);
4. :class:`RegionBoxd`: each mask's bounding box grown by a ring in **millimetres**, clipped to the image;
5. :class:`QuartileSubVolumesd` (inference, centred) / :class:`RandQuartileSubVolumesd` (training,
   random centres): ``(4, 128, 128, 4)`` per region, padded with air outside the image;
6. ``ScaleIntensityRanged``: the soft-tissue window [-150, 250] HU (level 50, width 400) to [0, 1];
7. ``RandFlipd`` (training): in-plane flips, each axis with probability 0.5, the same for the 4 channels.

Where this differs from the authors' code (``RadPathDataset``) and why:

- the authors grow the box by 15 *voxels* on the native grid (15 voxels is 7 mm in-plane but 45 mm
  along z on a 0.5 x 0.5 x 3 mm scan); here the CT is resampled to 1 mm first and the ring is given in
  mm, the same along every axis;
- the authors' crop ``img[c-64:c+64, c-64:c+64, z-2:z+2]`` (their ``dim=[128, 128, 3]`` with
  ``ceil(3/2) = 2``) gives **4 slices** per sub-volume, not the 3 of the paper's table; the default
  ``depth=4`` keeps what the code feeds the network, slices ``z-2 .. z+1``;
- the authors do not pad (a crop running off the image would not stack); here the outside is air
  (-1000 HU), which the window maps to 0, the value the authors' windowed array has for air;
- a patient without node mask gets, in the authors' code, a zero box at the image corner, i.e. a crop of
  whatever lies there; here the node input is all zeros (air after windowing) and a presence flag
  (``ct_nodes_present``, 0.0 or 1.0) tells the network the region is absent;
- the authors flip each sub-volume on its own draw; here the 4 sub-volumes of a region (one input's 4
  channels) flip together, so the channels stay aligned; the two regions flip independently;
- the authors reseed NumPy and torch with 2031 before drawing, so their "random" centres and flips are
  the same every epoch (and they run in validation too); here they vary in training (seedable through
  ``Compose.set_random_state``) and inference is centred and unflipped.

Axes are the CT's own voxel axes (no reorientation): ``X, Y`` in-plane, ``Z`` along the slices.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    DeleteItemsd,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
)

from oncofusion.contract import InvalidRequest
from oncofusion.transforms.io import ReadImaged

#: the soft-tissue window (level 50, width 400) the authors apply, in HU
SOFT_TISSUE_WINDOW_HU = (-150.0, 250.0)
#: what lies outside the scan, and what an absent region is filled with, before windowing
AIR_HU = -1000.0
#: the ring around a region's bounding box (the authors: 15 voxels on the native grid)
DEFAULT_RING_MM = 15.0
#: the in-plane size of one sub-volume, in voxels of the resampled grid
DEFAULT_ROI_SIZE = (128, 128)
#: slices per sub-volume, as the authors' crop returns them
DEFAULT_DEPTH = 4
#: sub-volumes per region, one per quartile of the box's z-range; they are the network's 4 channels
N_SUBVOLUMES = 4


# -- checks ------------------------------------------------------------------------------------------
def _array(value: Any) -> np.ndarray:
    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def _affine(value: Any) -> np.ndarray | None:
    affine = getattr(value, "affine", None)
    return None if affine is None else _array(affine).astype(np.float64)


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.asarray(affine_to_spacing(affine, r=3), dtype=np.float64)


def _grid_text(shape: Sequence[int], affine: np.ndarray | None) -> str:
    text = "x".join(str(int(s)) for s in shape)
    if affine is None:
        return f"{text} (no affine)"
    spacing = ", ".join(f"{s:g}" for s in _spacing(affine))
    origin = ", ".join(f"{o:g}" for o in affine[:3, 3])
    return f"{text} voxels of ({spacing}) mm at ({origin})"


def _check_volume(value: Any, what: str) -> None:
    shape = tuple(int(s) for s in value.shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape[1:]) < 1:
        raise InvalidRequest(
            f"{what} must be one 3D volume, channel first (1, X, Y, Z), got shape {shape}: send a CT volume "
            "(not a slice, not a multi-channel image) read with LoadImaged + EnsureChannelFirstd or "
            "ReadImaged",
            422,
        )


def empty_tumor_error(key: Hashable) -> InvalidRequest:
    """The 422 for a tumor mask without a voxel inside."""
    return InvalidRequest(f"tumor mask '{key}' is empty: draw the primary tumor on the CT", 422)


class CheckRegionMasksd(MapTransform):
    """Refuse inputs the sub-volumes cannot come from; give an absent optional mask as an empty one.

    ``data[image_key]`` must be a ``(1, X, Y, Z)`` MetaTensor (the ring is in mm, so the CT needs its
    affine). Each mask under ``keys`` must be ``(1, X, Y, Z)`` on the CT's grid: same shape, and an affine
    equal to the CT's within ``atol_mm`` (a mask without an affine is taken on the CT's grid). Masks may be
    binary or labelled (any value > 0 is inside). A mask under ``required`` must have a voxel inside;
    another mask may be missing or None (a patient without nodes), and becomes an all-zero mask on the
    CT's grid, so the steps after this one see every key.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", required: Sequence[str] = ("tumor_mask",),
                 atol_mm: float = 1e-3):
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.required = tuple(required)
        self.atol_mm = float(atol_mm)

    def _check_grid(self, key: Hashable, mask: Any, image: Any) -> None:
        mask_affine, image_affine = _affine(mask), _affine(image)
        same_shape = tuple(mask.shape[1:]) == tuple(image.shape[1:])
        same_affine = mask_affine is None or np.allclose(mask_affine, image_affine, atol=self.atol_mm)
        if not (same_shape and same_affine):
            raise InvalidRequest(
                f"mask '{key}' is not on the CT's grid: mask {_grid_text(mask.shape[1:], mask_affine)}, CT "
                f"{_grid_text(image.shape[1:], image_affine)}: export the mask on the CT's grid (same size, "
                "spacing and origin)",
                422,
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key not in d or d[self.image_key] is None:
            raise InvalidRequest(f"no CT under '{self.image_key}': send the CT volume", 422)
        image = d[self.image_key]
        _check_volume(image, f"the CT '{self.image_key}'")
        if _affine(image) is None:
            raise InvalidRequest(
                f"the CT '{self.image_key}' carries no affine, so its voxel size is unknown: read it as a "
                "MetaTensor (LoadImaged or ReadImaged), the ring and the 1 mm resampling are in mm",
                422,
            )
        for key in self.keys:
            mask = d.get(key)
            if mask is None:
                if key in self.required:
                    raise InvalidRequest(f"no mask under '{key}': draw the primary tumor on the CT", 422)
                d[key] = MetaTensor(torch.zeros(tuple(image.shape), dtype=torch.uint8), affine=image.affine)
                continue
            _check_volume(mask, f"mask '{key}'")
            self._check_grid(key, mask, image)
            if key in self.required and not (_array(mask) > 0).any():
                raise empty_tumor_error(key)
        return d


# -- boxes -------------------------------------------------------------------------------------------
def region_box(mask: np.ndarray, spacing_mm: Sequence[float], ring_mm: float) -> np.ndarray | None:
    """The inclusive voxel box ``[[x0, y0, z0], [x1, y1, z1]]`` of ``mask > 0`` (X, Y, Z) grown by ``ring_mm``
    along each axis (``ring_mm / spacing``, rounded to whole voxels) and clipped to the image; None when the
    mask is empty."""
    points = np.argwhere(mask > 0)
    if points.size == 0:
        return None
    ring = np.rint(float(ring_mm) / np.asarray(spacing_mm, dtype=np.float64)).astype(np.int64)
    lo = np.maximum(points.min(axis=0) - ring, 0)
    hi = np.minimum(points.max(axis=0) + ring, np.asarray(mask.shape) - 1)
    return np.stack([lo, hi]).astype(np.int64)


class RegionBoxd(MapTransform):
    """Each mask under ``keys`` -> its bounding box grown by ``ring_mm`` mm, under ``f"{key}{box_suffix}"``.

    The box is an int64 ``(2, 3)`` array of inclusive voxel indices (row 0 the low corner, row 1 the high
    one) on the mask's grid, the ring converted with the mask's own spacing, so it is the same in mm along
    every axis. The authors' ring is 15 voxels on the native grid without resampling; this module resamples
    to 1 mm first and gives the ring in mm (default 15 mm). An empty mask gets None, unless it is under
    ``required`` (then :func:`empty_tumor_error`).
    """

    def __init__(self, keys: KeysCollection, ring_mm: float = DEFAULT_RING_MM, box_suffix: str = "_box",
                 required: Sequence[str] = ("tumor_mask",)):
        super().__init__(keys)
        if not ring_mm >= 0:
            raise ValueError(f"ring_mm must be >= 0 mm, got {ring_mm}")
        self.ring_mm = float(ring_mm)
        self.box_suffix = box_suffix
        self.required = tuple(required)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            _check_volume(mask, f"mask '{key}'")
            affine = _affine(mask)
            spacing = np.ones(3) if affine is None else _spacing(affine)
            box = region_box(_array(mask)[0], spacing, self.ring_mm)
            if box is None and key in self.required:
                raise empty_tumor_error(key)
            d[f"{key}{self.box_suffix}"] = box
        return d


class CropToRegionsd(MapTransform):
    """Crop the images under ``keys`` (the CT and its masks, on the CT's native grid) to the part the
    sub-volumes can reach: the union of the masks under ``mask_keys`` grown by ``margin_mm`` (one value, or
    one per axis) plus ``extra_voxels`` native voxels for the interpolation at the crop's border.

    Resampling a whole neck CT to 1 mm costs seconds and a cached 1 mm copy of each CT and mask costs
    hundreds of MB per patient; the sub-volumes read a few centimetres around the regions. The crop is clipped
    to the image, so the padding at the image's edges does not change. Empty masks are ignored; with all
    masks empty nothing is cropped.
    """

    def __init__(self, keys: KeysCollection, mask_keys: Sequence[str], margin_mm: float | Sequence[float],
                 extra_voxels: int = 2):
        super().__init__(keys)
        self.mask_keys = tuple(mask_keys)
        margin = np.broadcast_to(np.asarray(margin_mm, dtype=np.float64), (3,))
        if not (margin >= 0).all():
            raise ValueError(f"margin_mm must be >= 0 mm, got {margin_mm}")
        self.margin_mm = margin.copy()
        self.extra_voxels = int(extra_voxels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        masks = [d[key] for key in self.mask_keys if d.get(key) is not None]
        if not masks:
            return d
        affine = _affine(masks[0])
        spacing = np.ones(3) if affine is None else _spacing(affine)
        margin = np.ceil(self.margin_mm / spacing - 1e-6).astype(np.int64) + self.extra_voxels
        boxes = [box for mask in masks if (box := region_box(_array(mask)[0], spacing, 0.0)) is not None]
        if not boxes:
            return d
        shape = np.asarray(masks[0].shape[1:])
        lo = np.maximum(np.min([box[0] for box in boxes], axis=0) - margin, 0)
        hi = np.minimum(np.max([box[1] for box in boxes], axis=0) + margin, shape - 1)
        cropper = SpatialCrop(roi_start=lo.tolist(), roi_end=(hi + 1).tolist())
        for key in self.key_iterator(d):
            d[key] = cropper(d[key])
        return d


# -- sub-volumes -------------------------------------------------------------------------------------
def quartile_ranges(z0: int, z1: int) -> list[tuple[int, int]]:
    """The 4 inclusive z-ranges splitting the box's ``[z0, z1]`` into quartiles (shared edges, as the
    authors' ``Z_min + int(k * (Z_max - Z_min) / 4)``)."""
    edges = [int(z0) + (int(z1) - int(z0)) * k // N_SUBVOLUMES for k in range(N_SUBVOLUMES + 1)]
    return [(edges[k], edges[k + 1]) for k in range(N_SUBVOLUMES)]


def centre_range(lo: int, hi: int, size: int) -> tuple[int, int]:
    """The inclusive range of in-plane centres for a ``size`` sub-volume in the box ``[lo, hi]``: keeping the
    sub-volume inside the box when the box is at least ``size`` long, anywhere in the box otherwise."""
    half = size // 2
    if hi - lo + 1 >= size:
        return lo + half, hi - size + half + 1
    return lo, hi


def middle(lo: int, hi: int) -> int:
    """The centre of the inclusive range ``[lo, hi]`` (for an even length, the upper of the two middle voxels,
    so that a crop whose voxel ``size // 2`` is the centre covers the range exactly)."""
    return (lo + hi + 1) // 2


def extract_subvolume(volume: np.ndarray, centre: Sequence[int], size: Sequence[int], pad_value: float
                      ) -> np.ndarray:
    """The ``size`` block of ``volume`` (X, Y, Z) whose voxel ``size // 2`` is ``centre`` (float32); voxels
    outside the volume are ``pad_value``. For a depth of 4 the slices are ``z-2 .. z+1``, the authors'
    ``z - ceil(3/2) : z + ceil(3/2)``."""
    out = np.full(tuple(int(s) for s in size), pad_value, dtype=np.float32)
    source, target = [], []
    for axis in range(3):
        start = int(centre[axis]) - int(size[axis]) // 2
        lo, hi = max(start, 0), min(start + int(size[axis]), volume.shape[axis])
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[tuple(target)] = volume[tuple(source)]
    return out


class QuartileSubVolumesd(MapTransform):
    """The image under ``keys`` and the box under ``box_key`` -> ``(4, *roi_size, depth)`` float32 under
    ``output_key`` (inference: deterministic).

    Sub-volume ``k`` (channel ``k``) is centred, in-plane, on the box's centre and, along z, on the centre of
    the box's ``k``-th z-quartile (:func:`quartile_ranges`). Values keep the image's units (HU); voxels
    outside the image are ``pad_value`` (air), so the soft-tissue window maps them to 0. A None box (an
    empty optional mask) gives a region of ``pad_value`` only. With ``present_key``, 1.0 or 0.0 (float32)
    says whether the region was there.
    """

    def __init__(self, keys: KeysCollection, box_key: str, output_key: str,
                 roi_size: Sequence[int] = DEFAULT_ROI_SIZE, depth: int = DEFAULT_DEPTH,
                 pad_value: float = AIR_HU, present_key: str | None = None):
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"one image key per region, got {list(self.keys)}")
        roi = tuple(int(s) for s in roi_size)
        if len(roi) != 2 or min(roi) < 1 or int(depth) < 1:
            raise ValueError(f"roi_size must be two positive in-plane sizes and depth >= 1, "
                             f"got {roi_size}, {depth}")
        self.box_key = box_key
        self.output_key = output_key
        self.size = (*roi, int(depth))
        self.pad_value = float(pad_value)
        self.present_key = present_key

    def centres(self, box: np.ndarray) -> np.ndarray:
        """``(4, 3)`` voxel centres of the sub-volumes in ``box``; the centred ones here."""
        (x0, y0, z0), (x1, y1, z1) = (tuple(int(v) for v in corner) for corner in box)
        x, y = middle(*centre_range(x0, x1, self.size[0])), middle(*centre_range(y0, y1, self.size[1]))
        return np.array([[x, y, middle(lo, hi)] for lo, hi in quartile_ranges(z0, z1)], dtype=np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            _check_volume(image, f"the CT '{key}'")
            box = d[self.box_key]
            if box is None:
                out = np.full((N_SUBVOLUMES, *self.size), self.pad_value, dtype=np.float32)
            else:
                volume = _array(image)[0]
                out = np.stack([extract_subvolume(volume, centre, self.size, self.pad_value)
                                for centre in self.centres(box)])
            d[self.output_key] = torch.from_numpy(out)
            if self.present_key is not None:
                d[self.present_key] = np.float32(box is not None)
        return d


class RandQuartileSubVolumesd(RandomizableTransform, QuartileSubVolumesd):
    """:class:`QuartileSubVolumesd` for training: each sub-volume's in-plane centre is drawn in the box
    (keeping the sub-volume inside the box when the box is large enough, :func:`centre_range`) and its z
    in its quartile, independently for the 4 sub-volumes, as the authors draw them."""

    def __init__(self, keys: KeysCollection, box_key: str, output_key: str,
                 roi_size: Sequence[int] = DEFAULT_ROI_SIZE, depth: int = DEFAULT_DEPTH,
                 pad_value: float = AIR_HU, present_key: str | None = None):
        RandomizableTransform.__init__(self, prob=1.0)
        QuartileSubVolumesd.__init__(self, keys, box_key, output_key, roi_size, depth, pad_value, present_key)

    def centres(self, box: np.ndarray) -> np.ndarray:
        (x0, y0, z0), (x1, y1, z1) = (tuple(int(v) for v in corner) for corner in box)
        x_lo, x_hi = centre_range(x0, x1, self.size[0])
        y_lo, y_hi = centre_range(y0, y1, self.size[1])
        draws = [[self.R.randint(x_lo, x_hi + 1), self.R.randint(y_lo, y_hi + 1), self.R.randint(lo, hi + 1)]
                 for lo, hi in quartile_ranges(z0, z1)]
        return np.array(draws, dtype=np.int64)


# -- the whole pipeline ------------------------------------------------------------------------------
def subvolume_transforms(
    train: bool,
    image_key: str = "image",
    tumor_key: str = "tumor_mask",
    nodes_key: str = "node_mask",
    tumor_output_key: str = "ct_tumor",
    nodes_output_key: str = "ct_nodes",
    nodes_present_key: str = "ct_nodes_present",
    spacing_mm: float = 1.0,
    ring_mm: float = DEFAULT_RING_MM,
    roi_size: Sequence[int] = DEFAULT_ROI_SIZE,
    depth: int = DEFAULT_DEPTH,
    window_hu: Sequence[float] = SOFT_TISSUE_WINDOW_HU,
    flip_prob: float = 0.5,
    read: bool = False,
    crop_first: bool = True,
    keep_inputs: bool = False,
    seed: int | None = None,
) -> Compose:
    """The preprocessing of a record ``{image_key: CT, tumor_key: mask, nodes_key: mask or None}`` into
    ``tumor_output_key`` and ``nodes_output_key`` (each ``(4, *roi_size, depth)`` float32 in [0, 1]) and
    ``nodes_present_key`` (float32 1.0 / 0.0), for training (``train``: random centres and flips) or
    inference (centred, no flips).

    The CT and masks are ``(1, X, Y, Z)`` MetaTensors in HU (or, with ``read``, paths that
    :class:`~oncofusion.transforms.io.ReadImaged` reads the way the server does; an N0 record gives its node
    mask as None). With ``crop_first`` the CT and masks are cropped on their native grid to what the
    sub-volumes can reach before the 1 mm resampling (:class:`CropToRegionsd`; the 1 mm grid then starts
    at the crop's corner, a shift under one native voxel). Unless ``keep_inputs``, the CT, the masks and the
    boxes are dropped at the end, so a batch collates only the network's inputs (and a ``CacheDataset``
    keeps only the cropped volumes). ``seed`` seeds the random steps.
    """
    masks = (tumor_key, nodes_key)
    boxes = tuple(f"{key}_box" for key in masks)
    outputs = (tumor_output_key, nodes_output_key)
    crop = RandQuartileSubVolumesd if train else QuartileSubVolumesd
    steps: list[Any] = [ReadImaged(keys=(image_key, *masks), kind="volume")] if read else []
    steps.append(CheckRegionMasksd(keys=masks, image_key=image_key, required=(tumor_key,)))
    if crop_first:
        # a sub-volume reaches half its size beyond the box, the box a ring beyond the mask (+1 mm rounding)
        reach = [ring_mm + (int(n) // 2 + 1) * spacing_mm for n in (*roi_size, depth)]
        steps.append(CropToRegionsd(keys=(image_key, *masks), mask_keys=masks, margin_mm=reach))
    steps += [
        Spacingd(keys=(image_key, *masks), pixdim=(spacing_mm,) * 3, mode=("bilinear", "nearest", "nearest"),
                 padding_mode="border", dtype=np.float32),
        RegionBoxd(keys=masks, ring_mm=ring_mm, required=(tumor_key,)),
        crop(keys=image_key, box_key=boxes[0], output_key=tumor_output_key, roi_size=roi_size, depth=depth),
        crop(keys=image_key, box_key=boxes[1], output_key=nodes_output_key, roi_size=roi_size, depth=depth,
             present_key=nodes_present_key),
        ScaleIntensityRanged(keys=outputs, a_min=float(window_hu[0]), a_max=float(window_hu[1]), b_min=0.0,
                             b_max=1.0, clip=True),
    ]
    if train:
        # each region flips on its own; the 4 sub-volumes of a region flip together (they are its channels)
        steps += [RandFlipd(keys=key, prob=flip_prob, spatial_axis=axis)
                  for key in outputs for axis in (0, 1)]
    if not keep_inputs:
        steps.append(DeleteItemsd(keys=(image_key, *masks, *boxes)))
    compose = Compose(steps)
    if seed is not None:
        compose.set_random_state(seed=seed)
    return compose
