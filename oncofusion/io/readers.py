"""Readers: decode what a user sends into a float32 ``MetaTensor`` carrying its geometry.

Every problem the user can fix is raised as :class:`~oncofusion.contract.InvalidRequest` naming the
file (never its folders, which may name the patient), so the server answers 4xx, never 500: 400 for a
missing file, 413 for an image larger than the server's :class:`~oncofusion.io.limits.ImageLimits`,
415 for a format or voxel type that cannot be read (complex voxels included), 422 for readable data of
the wrong shape, with NaN/infinite voxels or without a valid voxel size.

Every decoding reader checks the image's header against ``limits`` (default
:data:`~oncofusion.io.limits.DEFAULT_LIMITS`) before decoding, so an upload declaring a huge grid costs
a header read, not gigabytes.

A single-file NIfTI, the common study format, is decoded in one streaming pass: gzip through ISA-L
(``isal.igzip``, about 2.5x zlib's speed), a few slices at a time straight into the float32 result,
which keeps the file's own axis order (Fortran: ``i`` fastest). MONAI's ``NibabelReader`` makes a
C-ordered copy instead: on a 512x512x300 int16 CT that transpose, the zlib decode and the float
conversion took 8 s of a first click's 8.8 s. Integer voxels without scaling cannot be NaN, so they
skip the finiteness scan. ``read_volume(..., out=...)`` decodes into memory the caller provides (the
decoded-volume cache maps a file there).

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
from isal import igzip
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
#: slices decoded per step of the streaming NIfTI decode: 16 slices of 512x512 int16 are an 8 MiB
#: buffer, large enough that the per-step Python cost vanishes and small enough to stay in cache
SLICES_PER_STEP = 16
#: ``out(shape)``: float32 memory (Fortran order) a volume of that (I, J, K) shape is decoded into
Allocator = Callable[[tuple[int, int, int]], np.ndarray]


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


def _nifti_image(path: Path, what: str, limits: ImageLimits | None) -> tuple[NibabelReader, nib.Nifti1Image]:
    """The NIfTI's header (no voxel read yet), checked against ``limits`` and for a valid affine, with
    the reader that opened it (its ``get_data`` needs that same reader)."""
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
    return reader, image


def _decode_nifti(path: Path, what: str, limits: ImageLimits | None,
                  opened: tuple[NibabelReader, nib.Nifti1Image] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxels and metadata through nibabel (``opened``: its reader and header, already checked)."""
    reader, image = _nifti_image(path, what, limits) if opened is None else opened
    try:
        return reader.get_data(image)
    except Exception as e:
        raise InvalidRequest(f"cannot read {what} '{path.name}' with NibabelReader: {_reason(e, path)}", 415) from e


def _without_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 3D file sometimes carries trailing singleton dimensions (I, J, K, 1)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _volume_shape(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """A 3D shape once trailing singleton axes are dropped; None for anything else."""
    shape = _without_trailing_ones(shape)
    return shape if len(shape) == 3 and min(shape) >= 2 else None  # type: ignore[return-value]


def _streamable(path: Path, image: nib.Nifti1Image) -> bool:
    """A single-file NIfTI of real, plain voxels (no RGB records) with a 3D grid: what the streaming
    decode handles; anything else goes through nibabel and its error messages."""
    dtype = image.get_data_dtype()
    single = isinstance(image, nib.Nifti1Image) and str(path).lower().endswith(NIFTI_SUFFIXES)
    return single and dtype.fields is None and dtype.kind in "iuf" and _volume_shape(image.shape) is not None


def _nifti_scaling(image: nib.Nifti1Image) -> tuple[float, float] | None:
    """(slope, intercept) when the header scales the voxels, else None (nibabel's reading of them)."""
    slope = float(getattr(image.dataobj, "slope", 1.0))
    inter = float(getattr(image.dataobj, "inter", 0.0))
    return None if (slope, inter) == (1.0, 0.0) else (slope, inter)


def _stream_nifti(path: Path, image: nib.Nifti1Image, out: np.ndarray, what: str) -> None:
    """Decode the voxels of a single-file NIfTI into ``out`` (float32, the image's 3D shape), a few
    slices at a time: the file stores ``i`` fastest, so each step is one contiguous run of bytes."""
    dtype = image.get_data_dtype()
    scaling = _nifti_scaling(image)
    shape = out.shape
    plane = shape[0] * shape[1]
    buffer = np.empty(plane * min(SLICES_PER_STEP, shape[2]), dtype)
    opener = igzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        f.seek(int(image.dataobj.offset))
        for k in range(0, shape[2], SLICES_PER_STEP):
            count = min(SLICES_PER_STEP, shape[2] - k)
            chunk = buffer[: plane * count]
            if f.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise InvalidRequest(f"cannot read {what} '{path.name}': the file ends before its voxels do "
                                     "(truncated); send the whole file", 415)
            block = chunk.reshape((shape[0], shape[1], count), order="F")
            if scaling is not None:
                block = block * scaling[0] + scaling[1]  # float64, as nibabel scales
            out[:, :, k : k + count] = block


def _nifti_meta(image: nib.Nifti1Image, shape: tuple[int, int, int]) -> dict[str, Any]:
    """The metadata MONAI's ``NibabelReader`` attaches (header fields, affine, shape, RAS space)."""
    try:
        header = image.header.as_byteswapped("<")
    except ValueError:
        header = image.header
    # the numeric fields as MONAI keeps them (text fields such as ``descrip`` are left out, as it does)
    meta: dict[str, Any] = {key: value for key, value in dict(header).items() if value.dtype.kind not in "SaUO"}
    affine = np.array(image.affine, dtype=np.float64)
    meta.update({"affine": affine, "original_affine": affine.copy(), "as_closest_canonical": False,
                 "spatial_shape": np.asarray(shape), "space": SpaceKeys.RAS})
    return meta


def _allocate(shape: tuple[int, int, int]) -> np.ndarray:
    return np.empty(shape, np.float32, order="F")


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


def read_volume(path: str | os.PathLike, what: str = "image", limits: ImageLimits | None = None,
                out: Allocator | None = None) -> MetaTensor:
    """Decode a 3D scan into a float32 ``MetaTensor`` (1, I, J, K) carrying its IJK -> RAS affine.

    NIfTI, NRRD (any anatomical space, converted to RAS) and DICOM series folders (slices ordered by
    position along the slice normal, rescale applied, I = column, J = row, K = slice). The header is
    checked against ``limits`` (default: :data:`~oncofusion.io.limits.DEFAULT_LIMITS`) before decoding.
    Missing files, images over the limits, unreadable formats, complex voxels, invalid voxel sizes, 2D or
    4D data and NaN voxels are raised as :class:`InvalidRequest` naming the file.

    ``out(shape)`` (default: a new Fortran-ordered array) gives the float32 memory the voxels end in.
    """
    path = Path(path)
    if not str(path) or not path.exists():
        raise InvalidRequest(f"{what} '{path.name or path}' not found", 400)
    if is_nifti(path) and path.is_file():
        opened = _nifti_image(path, what, limits)
        image = opened[1]
        if _streamable(path, image):
            shape = _volume_shape(tuple(int(s) for s in image.shape))
            array = (out or _allocate)(shape)
            _stream_nifti(path, image, array, what)
            may_be_nan = image.get_data_dtype().kind == "f" or _nifti_scaling(image) is not None
            return _as_volume(array, _nifti_meta(image, shape), path, what, may_be_nan)
        array, meta = _decode_nifti(path, what, limits, opened)
    else:
        array, meta = _decode_volume(path, what, limits)
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
    found = _without_trailing_ones(tuple(int(s) for s in array.shape))
    shape = _volume_shape(found)
    if shape is None:
        raise InvalidRequest(
            f"{what} '{path.name}' has shape {'x'.join(map(str, found))}: "
            "a 3D volume (I, J, K) with at least 2 voxels along each axis is required",
            422,
        )
    array = array.reshape(shape, order="A")
    if out is not None:
        target = out(shape)
        target[...] = array
        array = target
    meta["spatial_shape"] = np.asarray(shape)
    return _as_volume(array, meta, path, what, may_be_nan=True)


def _as_volume(array: np.ndarray, meta: dict[str, Any], path: Path, what: str, may_be_nan: bool) -> MetaTensor:
    """``(1, I, J, K)`` MetaTensor sharing ``array``'s memory, refused when it holds NaN/infinite voxels
    (checked only where the source type can hold them)."""
    meta["filename_or_obj"] = str(path)
    meta.setdefault("original_channel_dim", float("nan"))  # MONAI's "no channel"
    # a tensor, not the array: MONAI makes a C-ordered copy of a numpy array (seconds on a CT)
    data = MetaTensor.ensure_torch_and_prune_meta(torch.from_numpy(array), meta)
    if may_be_nan:
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
