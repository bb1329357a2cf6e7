"""Read an NRRD volume (what Slicer saves and OHIF receives) with its IJK -> RAS affine.

MONAI's ``NrrdReader`` needs ``space directions`` and converts only an LPS space; Slicer also writes
RAS, and other tools write LAS or no space at all. This reader maps every anatomical space to RAS,
keeps the on-disk axis order (no reorientation) and sets non-spatial axes (``kinds`` such as
``vector`` or ``list``) apart so a colour or multi-channel file is reported as such.
"""

from __future__ import annotations

import os

import nrrd
import numpy as np

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
    else:
        spacings = np.asarray(header.get("spacings", [1.0] * int(header["dimension"])), dtype=float)
        for column, axis in enumerate(axes[:3]):
            spacing = spacings[axis] if np.isfinite(spacings[axis]) else 1.0
            affine[column, column] = spacing
    origin = header.get("space origin")
    if origin is not None:
        origin = np.asarray(origin, dtype=float)[:3]
        affine[: len(origin), 3] = np.nan_to_num(origin)
    space = str(header.get("space", "")).lower()
    if space in SPACE_TO_RAS:
        affine = np.diag([*SPACE_TO_RAS[space], 1.0]) @ affine
        return affine, "RAS"
    return affine, space or "unknown"


def read_nrrd(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode an NRRD file: the array (spatial axes first, in file order, then any other axes), its
    affine (see :func:`nrrd_affine_from_header`) and its space."""
    array, header = nrrd.read(str(path), index_order="F")
    axes = _spatial_axes(header)
    others = [a for a in range(array.ndim) if a not in axes]
    array = np.transpose(array, axes + others)
    affine, space = nrrd_affine_from_header(header)
    return array, affine, space


def nrrd_affine(path: str | os.PathLike) -> np.ndarray:
    """The affine of an NRRD file from its header alone."""
    return nrrd_affine_from_header(nrrd.read_header(str(path)))[0]
