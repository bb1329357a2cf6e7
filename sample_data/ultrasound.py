"""What the synthetic ultrasound generators share: speckle-field helpers and the DICOM writer.

Frames are written as scanners write them (US Image Storage, 8-bit MONOCHROME2 or RGB) with one 2D
tissue region in the SequenceOfUltrasoundRegions giving the pixel size in cm, so that the readers take
the same path as for real scanner files. Everything is labelled SYNTHETIC; UIDs derive from the case
and the seed, so the same seed writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid
from scipy import ndimage

MANUFACTURER = "oncofusion sample_data (SYNTHETIC)"


def smooth_noise(shape: Sequence[int], sigma: Sequence[float] | float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with the given correlation length (pixels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / max(float(field.std()), 1e-9)


def psf(field: np.ndarray, sigma_px: Sequence[float]) -> np.ndarray:
    """The scanner's point-spread blur of a reflectivity field."""
    return ndimage.gaussian_filter(field, sigma_px, mode="nearest")


@dataclass(frozen=True)
class UltrasoundFile:
    """Who and what one synthetic ultrasound file is. ``uid_source`` (generator, case, seed) seeds the
    study, series and instance UIDs; ``instance_key`` tells a patient's frames apart."""

    uid_source: tuple[str, ...]
    patient_id: str
    male: bool
    study_id: str
    study_description: str
    series_description: str
    body_part: str
    comments: str
    age: int | None = None
    laterality: str | None = None
    instance_number: int = 1
    instance_key: str = "instance"


def write_us_dicom(path: Path, pixels: np.ndarray, spacing_mm: Sequence[float], about: UltrasoundFile) -> None:
    """A single-frame ultrasound DICOM of ``pixels`` (rows, columns) in grey or (rows, columns, 3) in RGB,
    calibrated by one 2D tissue region in cm."""
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=[*about.uid_source, kind])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = uid(about.instance_key)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.PatientName, ds.PatientID = f"SYNTHETIC^{about.patient_id}", about.patient_id
    ds.PatientSex = "M" if about.male else "F"
    if about.age is not None:
        ds.PatientAge = f"{about.age:03d}Y"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20000101", "000000", about.study_id
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.Manufacturer = "US", MANUFACTURER
    ds.StudyDescription, ds.SeriesDescription = about.study_description, about.series_description
    ds.ImageComments, ds.BodyPartExamined = about.comments, about.body_part
    if about.laterality is not None:
        ds.ImageLaterality = about.laterality
    ds.ImageType, ds.BurnedInAnnotation = ["DERIVED", "SECONDARY"], "NO"
    ds.SeriesNumber, ds.InstanceNumber = 1, about.instance_number
    rows, cols = pixels.shape[:2]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    region = pydicom.Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0  # 2D tissue
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3  # cm
    region.PhysicalDeltaX, region.PhysicalDeltaY = float(spacing_mm[0]) / 10.0, float(spacing_mm[1]) / 10.0
    ds.SequenceOfUltrasoundRegions = DicomSequence([region])
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
