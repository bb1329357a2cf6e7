"""Readers: decode what a user sends into a float32 ``MetaTensor`` carrying its geometry.

Every problem the user can fix is raised as :class:`~oncofusion.contract.InvalidRequest` naming the
file (never its folders, which may name the patient), so the server answers 4xx, never 500: 400 for a
missing file, 413 for an image larger than the server's :class:`~oncofusion.io.limits.ImageLimits`,
415 for a format or voxel type that cannot be read (complex voxels included), 422 for readable data of
the wrong shape, with NaN/infinite voxels or without a valid voxel size.

Every decoding reader checks the image's header against ``limits`` (default
:data:`~oncofusion.io.limits.DEFAULT_LIMITS`) before decoding, so an upload declaring a huge grid costs
a header read, not gigabytes.

Three kinds of input, one reader each, registered in :data:`READERS` so a bundle can declare per named
image input which one it needs (:func:`read_image`):

- ``"volume"`` (:func:`read_volume`): NIfTI, NRRD or a DICOM series folder, as ``(1, I, J, K)`` with a
  4x4 IJK -> RAS affine. No reorientation: Slicer sends click indices (IJK) in the image's own voxel
  grid, so the array keeps the on-disk axis order for ``image[0, i, j, k]`` to be the clicked voxel;
- ``"frame"`` (:func:`~oncofusion.io.frames.read_frame`): one 2D DICOM (ultrasound) or PNG/JPEG frame
  as ``(C, W, H)``;
- ``"slide"`` (:func:`~oncofusion.io.slides.open_slide`): a whole-slide image, opened lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.utils import SpaceKeys
from nibabel.openers import ImageOpener

from oncofusion.contract import InvalidRequest
from oncofusion.io.dicom_series import read_series, series_affine
from oncofusion.io.frames import read_frame
from oncofusion.io.limits import (
    FLOAT32_BYTES,
    ImageHeader,
    ImageLimits,
    check_affine,
    check_header,
    check_spacing,
)
from oncofusion.io.nrrd_volume import NRRD_SUFFIXES, is_nrrd, nrrd_affine, read_nrrd
from oncofusion.io.slides import SlideImage, open_slide

__all__ = [
    "NIFTI_SUFFIXES",
    "NRRD_SUFFIXES",
    "READERS",
    "SlideImage",
    "image_affine",
    "is_nifti",
    "nifti_image_header",
    "is_nrrd",
    "open_slide",
    "read_frame",
    "read_image",
    "read_volume",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: nibabel decodes scaled voxels (scl_slope/scl_inter set) as float64
SCALED_BYTES = 8
VOLUME_FORMATS = "a NIfTI file (.nii, .nii.gz), an NRRD file (.nrrd, .nhdr) or a DICOM series folder"


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _reason(error: Exception, path: Path) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return reason.replace(str(path), path.name)  # directories may name the patient


def _raw_pixdim(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """pixdim as the file writes it: nibabel's loader silently turns a 0 into 1 mm."""
    with ImageOpener(str(path)) as f:
        return np.asarray(type(image.header).from_fileobj(f, check=False)["pixdim"], dtype=np.float64)


def nifti_image_header(path: str | os.PathLike, image: nib.Nifti1Image) -> ImageHeader:
    """What decoding a loaded (not yet decoded) NIfTI allocates: its voxels as nibabel returns them
    (float64 when scaled), or their float32 copy; and its voxel sizes as written (pixdim)."""
    dtype = image.get_data_dtype()
    slope = float(getattr(image.dataobj, "slope", 1.0))
    inter = float(getattr(image.dataobj, "inter", 0.0))
    scaled = (np.isfinite(slope) and slope != 1.0) or (np.isfinite(inter) and inter != 0.0)
    itemsize = max(dtype.itemsize, FLOAT32_BYTES, SCALED_BYTES if scaled else 0)
    shape = tuple(int(s) for s in image.shape)
    spatial = min(len(shape), 3)
    pixdim = _raw_pixdim(Path(path), image)[1 : 1 + spatial]
    return ImageHeader(shape=shape, nbytes=int(np.prod(shape)) * itemsize, dtype=dtype,
                       spacing=tuple(float(v) for v in pixdim), spacing_source="NIfTI pixdim")


def _decode_nifti(path: Path, what: str, limits: ImageLimits | None) -> tuple[np.ndarray, dict[str, Any]]:
    # one reader used directly: ``LoadImage`` falls back to every installed reader when the chosen one
    # fails, including ``np.load(allow_pickle=True)``, which must never see an uploaded file
    reader = NibabelReader()
    try:
        image = reader.read(str(path))  # the header only: voxels are read by get_data
        header = nifti_image_header(path, image)
    except Exception as e:  # any decoder failure means the file is not a readable scan
        raise InvalidRequest(f"cannot read {what} '{path.name}' with NibabelReader: {_reason(e, path)}", 415) from e
    check_header(header, path.name, what, limits)
    check_affine(image.affine, path.name, what)
    try:
        return reader.get_data(image)
    except Exception as e:
        raise InvalidRequest(f"cannot read {what} '{path.name}' with NibabelReader: {_reason(e, path)}", 415) from e


def _decode_volume(path: Path, what: str, limits: ImageLimits | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The raw array and MONAI metadata (``affine`` IJK -> RAS) of a volume file or series folder, its
    header checked against ``limits`` first."""
    if path.is_dir():
        array, affine = read_series(path, what, limits)
        return array, {"affine": affine, "original_affine": affine, "space": SpaceKeys.RAS}
    if is_nrrd(path):
        try:
            array, affine, space = read_nrrd(path, limits, what)
        except InvalidRequest:
            raise
        except Exception as e:  # pynrrd raises NRRDError, ValueError, OSError... for a broken file
            raise InvalidRequest(f"cannot read {what} '{path.name}' as NRRD: {_reason(e, path)}", 415) from e
        return array, {"affine": affine, "original_affine": affine, "space": space}
    if is_nifti(path):
        return _decode_nifti(path, what, limits)
    raise InvalidRequest(f"unsupported image format for '{path.name}': send {VOLUME_FORMATS}", 415)


def read_volume(path: str | os.PathLike, what: str = "image", limits: ImageLimits | None = None) -> MetaTensor:
    """Decode a 3D scan into a float32 ``MetaTensor`` (1, I, J, K) carrying its IJK -> RAS affine.

    NIfTI, NRRD (any anatomical space, converted to RAS) and DICOM series folders (slices ordered by
    position along the slice normal, rescale applied, I = column, J = row, K = slice). The header is
    checked against ``limits`` (default: :data:`~oncofusion.io.limits.DEFAULT_LIMITS`) before decoding.
    Missing files, images over the limits, unreadable formats, complex voxels, invalid voxel sizes, 2D or
    4D data and NaN voxels are raised as :class:`InvalidRequest` naming the file.
    """
    path = Path(path)
    if not str(path) or not path.exists():
        raise InvalidRequest(f"{what} '{path.name or path}' not found", 400)
    array, meta = _decode_volume(path, what, limits)
    meta["filename_or_obj"] = str(path)
    if np.iscomplexobj(array):  # any reader: the float32 cast below would keep the real part silently
        raise InvalidRequest(
            f"{what} '{path.name}' has complex voxels ({np.asarray(array).dtype.name}): send the magnitude "
            "(or phase) image instead",
            415,
        )
    try:
        array = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(
            f"{what} '{path.name}' holds non-numeric voxels ({_reason(e, path)})", 415
        ) from e
    # a 3D file sometimes carries trailing singleton dimensions (I, J, K, 1)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != 3 or min(shape) < 2:
        raise InvalidRequest(
            f"{what} '{path.name}' has shape {'x'.join(map(str, shape))}: "
            "a 3D volume (I, J, K) with at least 2 voxels along each axis is required",
            422,
        )
    meta["spatial_shape"] = np.asarray(shape)
    meta.setdefault("original_channel_dim", float("nan"))  # MONAI's "no channel"
    data = MetaTensor.ensure_torch_and_prune_meta(array, meta)
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        detail = "only NaN/infinite voxels" if bad == finite.numel() else f"{bad} NaN/infinite voxels"
        raise InvalidRequest(f"{what} '{path.name}' contains {detail}: re-export the volume", 422)
    if not isinstance(data, MetaTensor):  # pragma: no cover - ensure_torch_and_prune_meta returns one
        data = MetaTensor(data)
    return data.unsqueeze(0)


def image_affine(path: str | os.PathLike) -> np.ndarray:
    """The 4x4 voxel-to-world (RAS) affine that :func:`read_volume` would attach, from the headers alone
    for NIfTI, NRRD and DICOM series (training builds a datalist over every study and must not decode
    them all)."""
    path = Path(path)
    try:
        affine = _header_affine(path)
    except InvalidRequest:
        raise
    except Exception as e:
        raise InvalidRequest(f"cannot read the header of '{path.name}': {_reason(e, path)}", 415) from e
    if affine is None:
        return np.asarray(read_volume(path).affine, dtype=np.float64)
    check_affine(affine, path.name)
    return affine


def _header_affine(path: Path) -> np.ndarray | None:
    """The affine of a NIfTI, NRRD or series from its headers, its voxel sizes checked as
    :func:`read_volume` checks them; None for other paths."""
    if is_nifti(path):
        image = nib.load(str(path))
        header = nifti_image_header(path, image)
        check_spacing(header.spacing, header.spacing_source, path.name)
        return np.asarray(image.affine, dtype=np.float64)
    if is_nrrd(path):
        return nrrd_affine(path)
    if path.is_dir():
        return series_affine(path)
    return None


#: reader kind -> reader; a bundle names the kind of each image input it declares
READERS: dict[str, Callable[..., Any]] = {"volume": read_volume, "frame": read_frame, "slide": open_slide}
#: reader kinds that decode pixels, and so take ``limits``; a slide is opened lazily and read by regions
BOUNDED_KINDS = frozenset({"volume", "frame"})


def read_image(path: str | os.PathLike, kind: str = "volume", limits: ImageLimits | None = None,
               **options: Any) -> Any:
    """Read ``path`` with the reader registered for ``kind`` (see :data:`READERS`), passing ``options``
    (e.g. ``frame=3`` for a cine, ``what="label mask"`` for messages); a decoding reader checks the
    header against ``limits`` (default: :data:`~oncofusion.io.limits.DEFAULT_LIMITS`) first."""
    try:
        reader = READERS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown image reader kind {kind!r}: use one of {', '.join(sorted(READERS))}"
        ) from None
    if kind in BOUNDED_KINDS:
        options["limits"] = limits
    return reader(path, **options)
