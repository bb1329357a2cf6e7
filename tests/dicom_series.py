"""CT series written slice by slice, for the DICOM reader and geometry tests: a small synthetic one, and a
marker phantom (a real CT slice restacked at chosen positions, InstanceNumbers and orientations)."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_series(folder: Path, rows: int = 4, cols: int = 5, slices: int = 3,
                    pixels: Callable[[int], np.ndarray] | None = None) -> Path:
    """``slices`` axial slices 2 mm apart, 0.7 x 0.8 mm pixels; slice ``k`` holds ``pixels(k)`` (default: k)."""
    folder.mkdir(exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.Rows, ds.Columns, ds.PixelSpacing, ds.SliceThickness = rows, cols, [0.7, 0.8], 2.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10, -20, 2.0 * k], [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber, ds.SamplesPerPixel, ds.PhotometricInterpretation = k + 1, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        values = np.full((rows, cols), k) if pixels is None else pixels(k)
        ds.PixelData = np.asarray(values, np.int16).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(folder / f"slice{k}.dcm", write_like_original=False)
    assert pydicom.dcmread(folder / "slice0.dcm").Rows == rows
    return folder


# -- the marker phantom ----------------------------------------------------------------------------
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def shipped_file(name: str) -> Path:
    """A file shipped with pydicom (``test_files``) or pydicom-data (``data_store/data``)."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]) / "data")
    for root in roots:
        if (root / name).is_file():
            return root / name
    pytest.fail(f"{name} is not shipped with the installed pydicom / pydicom-data (pinned in constraints.txt)")


ROW_SPACING, COL_SPACING = 0.6, 0.8  # anisotropic, so swapped axes cannot pass
MARKER_ROW, MARKER_COL, MARKER_STORED = 40, 70, 4000
TAG_STORED = 3000  # pixel (0, 0) of each slice holds TAG_STORED + its rank along the normal


def orientation(alpha_deg: float = 0.0, beta_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.radians(alpha_deg), np.radians(beta_deg)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    return row, col


def write_marker_series(
    folder: Path,
    positions: np.ndarray,
    instance_numbers: list[int],
    marker_slice: int,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
) -> None:
    """A real CT slice (pydicom's CT_small) restacked at ``positions`` (LPS mm), files named at random,
    with a bright marker on slice ``marker_slice`` and a rank tag on every slice."""
    template = shipped_file("CT_small.dcm")
    normal = np.cross(row_cos, col_cos)
    ranks = np.argsort(np.argsort(positions @ normal))
    series_uid = generate_uid()
    for index, (position, number) in enumerate(zip(positions, instance_numbers, strict=True)):
        ds = pydicom.dcmread(template)
        pixels = ds.pixel_array.copy()
        pixels[0, 0] = TAG_STORED + ranks[index]
        if index == marker_slice:
            pixels[MARKER_ROW, MARKER_COL] = MARKER_STORED
        ds.PixelData = pixels.astype(np.int16).tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        if "SliceLocation" in ds:
            del ds.SliceLocation
        ds.save_as(folder / f"{uuid.uuid4().hex}.dcm")


def marker_world_ras(position: np.ndarray, row_cos: np.ndarray, col_cos: np.ndarray) -> np.ndarray:
    lps = position + MARKER_COL * COL_SPACING * row_cos + MARKER_ROW * ROW_SPACING * col_cos
    return (LPS_TO_RAS @ [*lps, 1.0])[:3]


SERIES_CASES = {
    # head first, InstanceNumber shuffled against position
    "shuffled": dict(angles=(0, 0), steps=[0, 2.5, 5, 7.5, 10], numbers=[3, 1, 5, 2, 4], marker=1, tilt=0.0),
    # feet first: InstanceNumber grows while z decreases
    "feet_first": dict(
        angles=(0, 0), steps=[0, -2.5, -5, -7.5, -10], numbers=[1, 2, 3, 4, 5], marker=3, tilt=0.0
    ),
    # oblique plane, InstanceNumber shuffled
    "oblique": dict(angles=(30, 20), steps=[6, 0, 12, 3, 9], numbers=[2, 5, 1, 4, 3], marker=0, tilt=0.0),
    # tilted gantry: slice origins shift along the column direction
    "tilted": dict(angles=(0, 0), steps=[0, 2.5, 5, 7.5, 10], numbers=[5, 4, 3, 2, 1], marker=2, tilt=0.4),
}
