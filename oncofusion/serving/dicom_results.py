"""A prediction as DICOM, for the PACS: a SEG of the region and a TID 1500 measurement report (SR).

OHIF shows DICOM SEG and SR from the PACS (``../shared/specs/clients.md``): a SEG overlays the region
the model drew, a (2D) Comprehensive SR with a SCOORD on an image shows its outline and measurement (OHIF
fails on a Comprehensive 3D SR: "MetadataProvider::Empty imageId"). Both are written with ``highdicom``
(0.22, the last release for pydicom 2.4) and reference the source series:

- SEG: the label's value-1 region (the region the user should see) as one binary segment named after the
  model's one-line summary;
- SR: algorithm identification (bundle name and version), the region as the SEG segment and as a
  polyline on the clicked slice, the score as a numeric measurement (code ``DCM 111047`` "Probability of
  cancer" for a malignancy-type probability, else the model's own code), the predicted class and every
  semantic feature as qualitative evaluations (codes of the ``99ONCOFUSION`` private scheme).

Only DICOM studies have these (a NIfTI study has no instances to reference): a series, or a single file
such as an ultrasound frame or cine, where a 2D model's region lies on the frame it read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from oncofusion.contract import InvalidRequest
from oncofusion.io.dicom_series import order_slices

MANUFACTURER = "OncoFusion"
SCHEME = "99ONCOFUSION"
PROBABILITY_OF_CANCER = hd.sr.CodedConcept("111047", "DCM", "Probability of cancer")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")


def _concept(value: str, meaning: str | None = None) -> hd.sr.CodedConcept:
    """A code of the private scheme (values at most 16 characters, as DICOM requires)."""
    return hd.sr.CodedConcept(value[:16], SCHEME, meaning or value)


def source_instances(series: str | Path) -> list[Dataset]:
    """The study's instances (headers): a single-file image (an ultrasound frame or cine) or a one-instance
    series folder as is, a series folder in the slice order the readers use (by position along the normal)."""
    series = Path(series)
    files = [series] if series.is_file() else [p for p in sorted(series.iterdir()) if p.is_file()]
    if len(files) == 1:
        return [pydicom.dcmread(files[0], stop_before_pixels=True)]
    items = []
    for file in files:
        try:
            items.append((file, pydicom.dcmread(file, stop_before_pixels=True)))
        except pydicom.errors.InvalidDicomError:
            continue
    ordered, _ = order_slices(items, "image", series.name)
    return [ds for _, ds in ordered]


def on_frame(label: np.ndarray, frame_index: int, num_frames: int) -> np.ndarray:
    """A 2D model's label ``(column, row)`` as the ``(column, row, frame)`` volume of its source file: the
    region on the frame the model read, the other frames of a cine empty."""
    volume = np.zeros((*np.asarray(label).shape, num_frames), np.uint8)
    volume[..., frame_index] = np.asarray(label)
    return volume


def segmentation_unsupported(sources: Sequence[Dataset]) -> str | None:
    """Why a SEG of ``sources`` cannot be written, or None: a multi-frame image without a frame of
    reference (an ultrasound cine) has no SEG form here (highdicom 0.22 segments one such frame only)."""
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1 and "FrameOfReferenceUID" not in sources[0]:
        return "a multi-frame image without a frame of reference (a cine): only the SR references its frame"
    return None


def region_segmentation(label: np.ndarray, sources: Sequence[Dataset], segment_name: str, algorithm: str,
                        version: str) -> hd.seg.Segmentation:
    """SEG of the label's value-1 region. ``label`` is on the reader's grid (column, row, slice)."""
    mask = (np.asarray(label) == 1).transpose(2, 1, 0).astype(np.uint8)  # -> (slice, row, column) frames
    if not mask.any():
        raise InvalidRequest("the model drew no region to store as a DICOM SEG")
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_name[:64],
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, version=version, family=codes.DCM.ArtificialIntelligence),
    )
    return hd.seg.Segmentation(
        source_images=list(sources), pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm[:64], software_versions=version, device_serial_number="0",
        series_description=f"{algorithm} region (research use)"[:64],
    )


def _outline(label_slice: np.ndarray, ds: Dataset, frame_number: int | None = None) -> hd.sr.ImageRegion:
    """The bounding rectangle of the region on one slice (or one frame of a multi-frame image, numbered
    from 1), as a closed polyline in pixel coordinates."""
    columns, rows = np.nonzero(label_slice == 1)
    c0, c1, r0, r1 = columns.min(), columns.max() + 1, rows.min(), rows.max() + 1
    points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)
    frames = None if frame_number is None else [frame_number]
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
                             source_image=hd.sr.SourceImageForRegion.from_source_image(ds, frames))


def _procedure(source: Dataset) -> hd.sr.CodedConcept:
    if str(source.get("Modality", "")) == "CT":
        return codes.LN.CTUnspecifiedBodyRegion
    modality = str(source.get("Modality", "") or "imaging")
    return _concept(f"{modality}-PROC", f"{modality} imaging procedure")


def measurement_report(result: Mapping[str, Any], label: np.ndarray, sources: Sequence[Dataset],
                       segmentation: hd.seg.Segmentation | None, algorithm: str, version: str, score_key: str,
                       class_key: str, click_slice: int) -> hd.sr.ComprehensiveSR:
    """TID 1500 report of one prediction: score, class and semantic features on the clicked region."""
    slice_with_region = click_slice if (np.asarray(label)[:, :, click_slice] == 1).any() else \
        int(np.nonzero((np.asarray(label) == 1).any(axis=(0, 1)))[0][0])
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm, version=version)
    measurement = hd.sr.Measurement(
        name=PROBABILITY_OF_CANCER if "malignan" in score_key else _concept(score_key, score_key.replace("_", " ")),
        value=float(result[score_key]), unit=NO_UNITS, algorithm_id=algorithm_id)
    evaluations = [hd.sr.QualitativeEvaluation(_concept("class", "Predicted class"), _concept(str(result[class_key])))]
    for feature, options in (result.get("semantic_features") or {}).items():
        best = max(options, key=options.get)
        evaluations.append(hd.sr.QualitativeEvaluation(_concept(feature), _concept(best)))
    multi_frame = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1
    source = sources[0] if multi_frame else sources[slice_with_region]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{algorithm} lesion"),
        referenced_region=_outline(np.asarray(label)[:, :, slice_with_region], source,
                                   slice_with_region + 1 if multi_frame else None),
        algorithm_id=algorithm_id, measurements=[measurement], qualitative_evaluations=evaluations,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None,
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=hd.UID(), name=algorithm, model_name=version))),
        procedure_reported=_procedure(sources[0]),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[*sources, *([segmentation] if segmentation is not None else [])], content=report[0], series_instance_uid=hd.UID(), series_number=9002,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"{algorithm} report (research use)"[:64],
    )
