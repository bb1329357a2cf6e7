"""Read an NRRD volume (what Slicer saves and OHIF receives) with its IJK -> RAS affine.

MONAI's ``NrrdReader`` needs ``space directions`` and converts only an LPS space; Slicer also writes
RAS, and other tools write LAS or no space at all. This reader maps every anatomical space to RAS,
keeps the on-disk axis order (no reorientation) and sets non-spatial axes (``kinds`` such as
``vector`` or ``list``) apart so a colour or multi-channel file is reported as such.

The header is read and checked against the server's :class:`~oncofusion.io.limits.ImageLimits` before
the data: a voxel size is never assumed, so a file whose spatial axes have no ``space directions`` and
no ``spacings`` (or zero or NaN ones) is refused rather than read as 1 mm.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import nrrd
import nrrd.reader
import numpy as np

from oncofusion.io.limits import FLOAT32_BYTES, ImageHeader, ImageLimits, check_header

#: sign of each world axis when going from an NRRD anatomical space to RAS
SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
NRRD_SUFFIXES = (".nrrd", ".nhdr")
#: bytes per sample assumed for a type pynrrd does not know (its decoder then refuses the file)
UNKNOWN_TYPE_BYTES = 8


def is_nrrd(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NRRD_SUFFIXES)


def _spatial_axes(header: dict) -> list[int]:
    """Indices of the axes that lie in space; the others (channels, time, lists) have no direction."""
    dimension = int(header["dimension"])
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=float)
        return [a for a in range(dimension) if np.all(np.isfinite(directions[a]))]
    kinds = header.get("kinds")
    if kinds is not None:
        return [a for a, k in enumerate(kinds) if str(k).lower() in ("domain", "space", "time")]
    return list(range(dimension))


def nrrd_affine_from_header(header: dict) -> tuple[np.ndarray, str]:
    """The 4x4 affine mapping spatial indices (in file axis order) to RAS mm, and the space it is in.

    The space is ``"RAS"`` for anatomical spaces; for a file without one (``scanner-xyz`` or none) the
    affine is returned as written and the space named as the file names it.
    """
    axes = _spatial_axes(header)
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=float)
        for column, axis in enumerate(axes[:3]):
            affine[: directions.shape[1], column] = directions[axis][:3]
    else:  # no spacing means an unknown one (NaN), refused by the readers, never 1 mm
        spacings = np.asarray(header.get("spacings", [np.nan] * int(header["dimension"])), dtype=float)
        for column, axis in enumerate(axes[:3]):
            affine[column, column] = spacings[axis]
    origin = header.get("space origin")
    if origin is not None:
        origin = np.asarray(origin, dtype=float)[:3]
        affine[: len(origin), 3] = np.nan_to_num(origin)
    space = str(header.get("space", "")).lower()
    if space in SPACE_TO_RAS:
        affine = np.diag([*SPACE_TO_RAS[space], 1.0]) @ affine
        return affine, "RAS"
    return affine, space or "unknown"


def nrrd_image_header(header: dict) -> ImageHeader:
    """What decoding an NRRD file allocates (its samples, then their float32 copy) and its voxel sizes
    along the spatial axes, from the parsed header alone."""
    shape = tuple(int(n) for n in header.get("sizes", ()))
    typestring = nrrd.reader._TYPEMAP_NRRD2NUMPY.get(str(header.get("type", "")))
    if typestring == "V":  # "block" samples: opaque bytes of a declared size
        dtype, itemsize = np.dtype((np.void, int(header.get("block size", 1)))), int(header.get("block size", 1))
    elif typestring is not None:
        dtype = np.dtype(typestring)
        itemsize = dtype.itemsize
    else:
        dtype, itemsize = None, UNKNOWN_TYPE_BYTES
    voxels = math.prod(shape)
    affine, _ = nrrd_affine_from_header(header)
    spatial = min(len(_spatial_axes(header)), 3)
    return ImageHeader(
        shape=shape,
        nbytes=voxels * max(itemsize, FLOAT32_BYTES),
        dtype=dtype,
        spacing=tuple(float(v) for v in np.linalg.norm(affine[:3, :spatial], axis=0)),
        spacing_source="NRRD space directions" if header.get("space directions") is not None else "NRRD spacings",
    )


def read_nrrd(
    path: str | os.PathLike, limits: ImageLimits | None = None, what: str = "image"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode an NRRD file: the array (spatial axes first, in file order, then any other axes), its
    affine (see :func:`nrrd_affine_from_header`) and its space.

    The header is checked against ``limits`` (default: the server's) before the data is read, so a file
    declaring a huge grid is refused (413) without decoding it.
    """
    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)
        check_header(nrrd_image_header(header), Path(path).name, what, limits)
        array = nrrd.read_data(header, fh, str(path), index_order="F")
    axes = _spatial_axes(header)
    others = [a for a in range(array.ndim) if a not in axes]
    array = np.transpose(array, axes + others)
    affine, space = nrrd_affine_from_header(header)
    return array, affine, space


def nrrd_affine(path: str | os.PathLike) -> np.ndarray:
    """The affine of an NRRD file from its header alone."""
    return nrrd_affine_from_header(nrrd.read_header(str(path)))[0]
