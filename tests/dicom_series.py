"""A small CT series written slice by slice, for the DICOM reader tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
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
