"""Read a DICOM series folder as one 3D volume, slices ordered by their position in space.

File names and ``InstanceNumber`` say nothing reliable about where a slice lies: scanners number
feet-first series from either end, and exports rename files. A volume stacked in the wrong order puts
the prediction on the mirrored slice, so slices are ordered by the projection of
``ImagePositionPatient`` onto the slice normal (row cosine x column cosine), as ITK and Slicer do.

The voxel grid keeps DICOM's own axes (I = column, J = row, K = position along the normal) and the
affine maps it to MONAI's RAS world (DICOM patient space is LPS), with no reorientation.

Every file's header is read first (``stop_before_pixels``): the slices are ordered and the volume's
size (Rows x Columns x slices) and voxel size are checked against the server's
:class:`~oncofusion.io.limits.ImageLimits` before any pixel is decoded. Pixels are then decoded one
slice at a time into the output volume, so only one slice's raw bytes are held at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from oncofusion.contract import InvalidRequest
from oncofusion.io.frames import undecodable_reason
from oncofusion.io.limits import FLOAT32_BYTES, ImageHeader, ImageLimits, check_header

logger = logging.getLogger(__name__)

#: LPS (DICOM patient space) to RAS (MONAI, NIfTI): flip x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: orientation cosines written with a few decimals differ by rounding only
ORIENTATION_TOLERANCE = 1e-3
#: a slice farther than this fraction of the slice step from its place on an even grid means a missing
#: slice or a second series; the affine could not place it, so the series is refused
SPACING_TOLERANCE = 0.05


def _header(ds: Dataset, keyword: str, file: Path, what: str, folder: str) -> list[float]:
    value = ds.get(keyword)
    if value is None or len(value) == 0:
        raise InvalidRequest(
            f"{what} '{folder}': slice '{file.name}' has no {keyword}, so it cannot be placed in the "
            "volume; export the series again with its geometry, or send a NIfTI/NRRD file",
            422,
        )
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"{what} '{folder}': slice '{file.name}' has a malformed {keyword}", 422) from e


def _load(folder: Path, what: str) -> list[tuple[Path, Dataset]]:
    """The header (no pixels) of every DICOM image file directly inside ``folder``; other files
    (DICOMDIR, notes) are skipped."""
    items = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError) as e:
            logger.debug("skipping %s: %s", file.name, e)
            continue
        if "Rows" not in ds:
            continue
        items.append((file, ds))
    if not items:
        raise InvalidRequest(
            f"{what} '{folder.name}' holds no DICOM image files: send a DICOM series folder", 415
        )
    return items


def _check_one_series(items: Sequence[tuple[Path, Dataset]], what: str, folder: str) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in items} - {""}
    if len(series) > 1:
        raise InvalidRequest(
            f"{what} '{folder}' mixes {len(series)} DICOM series: put each series in its own folder", 422
        )
    for file, ds in items:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InvalidRequest(
                f"{what} '{folder}': '{file.name}' is a multi-frame (enhanced) DICOM with {frames} frames; "
                "send a classic one-slice-per-file series or a NIfTI/NRRD file",
                415,
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InvalidRequest(
                f"{what} '{folder}': '{file.name}' is a colour image; a 3D volume needs grey-scale slices",
                422,
            )
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise InvalidRequest(
            f"{what} '{folder}' mixes slice sizes ({listed} rows x columns): send one series per folder", 422
        )


def order_slices(
    items: Sequence[tuple[Path, Dataset]], what: str = "image", folder: str = "series"
) -> tuple[list[tuple[Path, Dataset]], np.ndarray]:
    """Sort the slices of one series by position along the slice normal and build the RAS affine.

    Returns the sorted items and the 4x4 affine mapping (column, row, slice) indices to RAS mm. The third
    affine column is the mean step between consecutive slice positions, so a tilted gantry (positions
    not along the normal) is kept as a shear instead of being squeezed onto the normal.
    """
    _check_one_series(items, what, folder)
    orientations = np.array([_header(ds, "ImageOrientationPatient", f, what, folder) for f, ds in items])
    if orientations.shape[1] != 6:
        raise InvalidRequest(f"{what} '{folder}': ImageOrientationPatient must hold 6 values", 422)
    distinct = [orientations[0]]
    for o in orientations[1:]:
        if not any(np.allclose(o, d, atol=ORIENTATION_TOLERANCE) for d in distinct):
            distinct.append(o)
    if len(distinct) > 1:
        raise InvalidRequest(
            f"{what} '{folder}' mixes {len(distinct)} slice orientations (ImageOrientationPatient): "
            "it holds more than one series (e.g. a localizer); send one series per folder",
            422,
        )
    row_cos, col_cos = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise InvalidRequest(
            f"{what} '{folder}': ImageOrientationPatient {orientations[0].tolist()} is not two orthogonal "
            "unit vectors",
            422,
        )
    positions = np.array([_header(ds, "ImagePositionPatient", f, what, folder) for f, ds in items])
    order = np.argsort(positions @ normal, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    along = positions @ normal

    if len(items) > 1:
        gaps = np.diff(along)
        dup = int(np.argmin(gaps))
        if gaps[dup] < 1e-3:
            raise InvalidRequest(
                f"{what} '{folder}': slices '{items[dup][0].name}' and '{items[dup + 1][0].name}' lie at the "
                f"same position ({along[dup]:.2f} mm along the normal): the folder holds repeated slices or "
                "more than one series",
                422,
            )
        step = (positions[-1] - positions[0]) / (len(items) - 1)
        expected = positions[0] + np.arange(len(items))[:, None] * step
        error = np.linalg.norm(positions - expected, axis=1)
        if error.max() > SPACING_TOLERANCE * np.linalg.norm(step):
            worst = int(np.argmax(np.abs(gaps - gaps.mean())))
            raise InvalidRequest(
                f"{what} '{folder}': slices are unevenly spaced (gap of {gaps[worst]:.2f} mm between "
                f"'{items[worst][0].name}' and '{items[worst + 1][0].name}' where {gaps.mean():.2f} mm is the "
                "mean): a slice is missing or the folder mixes series",
                422,
            )
    else:
        thickness = float(items[0][1].get("SliceThickness", 1.0) or 1.0)
        step = normal * thickness

    first_file, first = items[0]
    row_spacing, col_spacing = _header(first, "PixelSpacing", first_file, what, folder)[:2]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing  # I: along a row, one column to the next
    affine_lps[:3, 1] = col_cos * row_spacing  # J: down a column, one row to the next
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return items, LPS_TO_RAS @ affine_lps


def _decode(file: Path, ds: Dataset, what: str, folder: str) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as e:  # the decoder names a missing plugin or a corrupt stream
        raise InvalidRequest(
            f"cannot decode {what} '{folder}': slice '{file.name}': {undecodable_reason(ds, e)}", 415
        ) from e
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def series_affine(folder: str | os.PathLike, what: str = "image") -> np.ndarray:
    """The RAS affine of a series folder from its headers alone (no pixel decoding)."""
    folder = Path(folder)
    _, affine = order_slices(_load(folder, what), what, folder.name)
    return affine


def series_image_header(items: Sequence[tuple[Path, Dataset]], affine: np.ndarray) -> ImageHeader:
    """The float32 volume (columns x rows x slices) a sorted series decodes to, and its voxel sizes (the
    affine's column lengths: PixelSpacing and the step between slice positions)."""
    first = items[0][1]
    shape = (int(first.Columns), int(first.Rows), len(items))
    return ImageHeader(
        shape=shape,
        nbytes=int(np.prod(shape)) * FLOAT32_BYTES,
        spacing=tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)),
        spacing_source="DICOM PixelSpacing and slice positions",
    )


def _pixels(file: Path, what: str, folder: str) -> Dataset:
    """The whole DICOM file of a slice already ordered from its header."""
    try:
        ds = pydicom.dcmread(file)
    except (InvalidDicomError, EOFError, OSError) as e:
        raise InvalidRequest(f"cannot read {what} '{folder}': slice '{file.name}' is unreadable", 415) from e
    if "PixelData" not in ds:
        raise InvalidRequest(f"{what} '{folder}': slice '{file.name}' has no pixel data", 415)
    return ds


def read_series(
    folder: str | os.PathLike, what: str = "image", limits: ImageLimits | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a series folder into a float32 array (I=column, J=row, K=slice) and its 4x4 RAS affine.

    Rescale slope and intercept are applied per slice, so CT comes out in Hounsfield units. The size
    and voxel size are checked against ``limits`` (default: the server's) from the headers first.
    """
    folder = Path(folder)
    items, affine = order_slices(_load(folder, what), what, folder.name)
    header = series_image_header(items, affine)
    check_header(header, folder.name, what, limits)
    volume = np.empty(header.shape, np.float32)
    for k, (file, _) in enumerate(items):
        pixels = _decode(file, _pixels(file, what, folder.name), what, folder.name)  # (rows, cols)
        if pixels.shape != header.shape[1::-1]:
            raise InvalidRequest(
                f"{what} '{folder.name}': slice '{file.name}' decodes to {pixels.shape[0]}x{pixels.shape[1]} "
                f"pixels where its header says {header.shape[1]}x{header.shape[0]} (rows x columns)",
                415,
            )
        volume[:, :, k] = pixels.T
    return volume, affine
