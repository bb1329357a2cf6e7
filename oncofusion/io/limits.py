"""Bound what decoding an image may cost, judged from its header before a single voxel is decoded.

A gzip NIfTI of 2 MB can declare 1024x1024x512 float64 voxels: decoding it took 39 s and 4 GB on the
server, and a few such uploads exhausted it. Every reader therefore reads the header first (nibabel
header, pynrrd ``read_header``, DICOM tags with ``stop_before_pixels``, Pillow's lazy ``Image.open``),
describes what decoding would allocate as an :class:`ImageHeader`, and :func:`check_header` refuses it:

- 413 when it holds more voxels or bytes than :class:`ImageLimits` allows, naming the size found, the
  limit and the ``--conf`` key that sets it;
- 415 for complex voxels, which the float32 conversion would silently reduce to their real part;
- 422 for a volume whose voxel size (NIfTI pixdim, NRRD spacing, DICOM PixelSpacing, or the affine
  built from them) is zero, negative or not finite: nibabel silently turns pixdim 0 into 1 mm, and a
  crop in millimetres around the click would then be taken at the wrong scale.

Messages name the file, never its folders (they may name the patient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from oncofusion.contract import InvalidRequest

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_VOXELS",
    "FLOAT32_BYTES",
    "ImageHeader",
    "ImageLimits",
    "check_affine",
    "check_header",
    "check_spacing",
]

#: 2**28 = 268,435,456 voxels: a 512x512x1000 CT (262,144,000) fits, a 1024x1024x512 volume (2**29) does
#: not. Its float32 copy, what the server keeps, is at most 1 GiB: half the default image cache budget
#: (2048 MiB), so the largest admitted study still fits the cache beside another.
DEFAULT_MAX_VOXELS = 2**28
#: 2 GiB for the largest array decoding allocates: the same 512x512x1000 CT stored as float64 or as
#: scaled int16 (which nibabel decodes to float64) is 2,097,152,000 bytes and fits; a 1024x768 RGB
#: ultrasound cine of 300 frames (708 MB as decoded) fits; 1024x1024x512 float64 (4 GiB) does not.
DEFAULT_MAX_BYTES = 2**31
#: the readers hand every image over as float32
FLOAT32_BYTES = 4
MIB = 2**20


@dataclass(frozen=True)
class ImageLimits:
    """The most one image may cost to decode: ``max_voxels`` voxels (pixels of every decoded frame for
    2D images) and ``max_bytes`` bytes for the largest array decoding allocates (the samples as decoded,
    or their float32 copy, whichever is larger).

    The defaults admit a 512x512x1000 CT in any voxel type and long ultrasound cines, and refuse
    1024x1024x512 volumes; see :data:`DEFAULT_MAX_VOXELS` and :data:`DEFAULT_MAX_BYTES` for the sums.
    The server sets them with ``--conf max_image_voxels`` and ``--conf max_image_mb``.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"image limit {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> ImageLimits:
        """Limits from the app's ``--conf`` strings (``max_image_voxels``, ``max_image_mb``); a missing
        key keeps its default."""
        try:
            voxels = int(float(conf.get("max_image_voxels", DEFAULT_MAX_VOXELS)))
            nbytes = int(float(conf.get("max_image_mb", DEFAULT_MAX_BYTES / MIB)) * MIB)
        except (TypeError, ValueError) as e:
            raise ValueError(
                "--conf max_image_voxels and max_image_mb must be numbers, got "
                f"{conf.get('max_image_voxels')!r} and {conf.get('max_image_mb')!r}"
            ) from e
        return cls(max_voxels=voxels, max_bytes=nbytes)


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class ImageHeader:
    """What a header says decoding would produce, before decoding.

    ``shape``: the grid decoded at once, e.g. ``(I, J, K)`` or ``(frames, rows, columns)``;
    ``nbytes``: the largest array decoding allocates; ``dtype``: the voxel type as stored (complex
    types are refused); ``spacing``: voxel sizes in mm of a volume's spatial axes as the
    header writes them (``None`` for 2D frames, whose pixel size may legitimately be unknown);
    ``spacing_source``: the header field they come from, for the message; ``unit``: what one element
    of ``shape`` is called (voxels, pixels).
    """

    shape: tuple[int, ...]
    nbytes: int
    dtype: np.dtype | None = None
    spacing: tuple[float, ...] | None = None
    spacing_source: str = "voxel size"
    unit: str = "voxels"

    @property
    def voxels(self) -> int:
        return math.prod(int(s) for s in self.shape)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _check_dtype(dtype: np.dtype | None, name: str, what: str) -> None:
    """Complex voxels are refused here: converting them to float32 keeps the real part without a word.
    Structured voxels (RGB NIfTI) are left to the reader, whose float32 conversion names them."""
    if dtype is not None and dtype.kind == "c":
        raise InvalidRequest(
            f"{what} '{name}' has complex voxels ({dtype.name}): the server reads real values only and "
            "would drop the imaginary part; send the magnitude (or phase) image instead",
            415,
        )


def _check_size(header: ImageHeader, name: str, what: str, limits: ImageLimits) -> None:
    if header.voxels > limits.max_voxels:
        raise InvalidRequest(
            f"{what} '{name}' is {_shape_text(header.shape)} = {header.voxels:,} {header.unit}; this server "
            f"accepts at most {limits.max_voxels:,} (--conf max_image_voxels): crop or downsample it",
            413,
        )
    if header.nbytes > limits.max_bytes:
        kind = f" {header.dtype.name}" if header.dtype is not None and header.dtype.kind in "biufc" else ""
        raise InvalidRequest(
            f"{what} '{name}' ({_shape_text(header.shape)}{kind}) needs {header.nbytes / MIB:,.0f} MiB to "
            f"decode; this server accepts at most {limits.max_bytes / MIB:,.0f} MiB (--conf max_image_mb): "
            "crop it or store it with a smaller voxel type",
            413,
        )


def check_spacing(spacing: Sequence[float], source: str, name: str, what: str = "image") -> None:
    """Refuse voxel sizes that are zero, negative or not finite (422), naming the header field."""
    values = [float(s) for s in spacing]
    if all(math.isfinite(v) and v > 0 for v in values):
        return
    shown = " x ".join(f"{v:g}" for v in values)
    raise InvalidRequest(
        f"{what} '{name}' has voxel size {shown} mm ({source}): every voxel size must be a positive, finite "
        "number of mm and none is ever assumed; export the volume again with its spacing",
        422,
    )


def check_header(header: ImageHeader, name: str, what: str = "image", limits: ImageLimits | None = None) -> None:
    """Refuse an image from its header alone: complex voxels (415), too big (413), invalid voxel size
    (422). ``name`` is the file's name (never its path); ``limits`` defaults to
    :data:`DEFAULT_LIMITS`."""
    limits = DEFAULT_LIMITS if limits is None else limits
    _check_dtype(header.dtype, name, what)
    _check_size(header, name, what, limits)
    if header.spacing is not None:
        check_spacing(header.spacing, header.spacing_source, name, what)


def check_affine(affine: np.ndarray, name: str, what: str = "image", spatial_dims: int = 3) -> None:
    """Refuse a voxel-to-world affine with a non-finite entry or a zero voxel size along an axis (422):
    a degenerate affine puts every crop, distance and label at the wrong place."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:spatial_dims, :spatial_dims]
    if not np.all(np.isfinite(affine[:spatial_dims, : spatial_dims + 1])):
        raise InvalidRequest(
            f"{what} '{name}' has a voxel-to-world affine with NaN/infinite entries: export the volume again "
            "with its geometry",
            422,
        )
    check_spacing(np.linalg.norm(linear, axis=0), "length of each affine column", name, what)
