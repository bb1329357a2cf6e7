"""A prediction written as DICOM SEG + TID 1500 SR on the marker phantom, read back with highdicom."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from oncofusion.contract import InvalidRequest
from oncofusion.serving.dicom_results import (
    PROBABILITY_OF_CANCER,
    measurement_report,
    region_segmentation,
    source_instances,
)
from tests.dicom_series import MARKER_COL, MARKER_ROW, SERIES_CASES, orientation, write_marker_series

RESULT = {"malignancy_probability": 0.81, "class": "malignant",
          "semantic_features": {"margin": {"smooth": 0.3, "spiculated": 0.7}}}


@pytest.fixture()
def series(tmp_path):
    spec = SERIES_CASES["feet_first"]
    row_cos, col_cos = orientation(*spec["angles"])
    normal = np.cross(row_cos, col_cos)
    positions = np.array([-158.1, -179.0, -75.7]) + np.asarray(spec["steps"], float)[:, None] * normal
    write_marker_series(tmp_path, positions, spec["numbers"], spec["marker"], row_cos, col_cos)
    rank = int(np.argsort(np.argsort(positions @ normal))[spec["marker"]])
    return tmp_path, rank


def _label(shape: tuple[int, int, int], k: int) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[MARKER_COL - 3:MARKER_COL + 4, MARKER_ROW - 2:MARKER_ROW + 3, k] = 1
    label[MARKER_COL - 5, MARKER_ROW, k] = 2  # a weaker level: not part of the stored region
    return label


def test_seg_holds_the_region_on_the_clicked_instance(series):
    folder, k = series
    sources = source_instances(folder)
    positions = [float(np.dot(ds.ImagePositionPatient, np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3)))))
                 for ds in sources]
    assert positions == sorted(positions)  # the readers' order: along the slice normal
    label = _label((sources[0].Columns, sources[0].Rows, len(sources)), k)
    seg = region_segmentation(label, sources, "malignancy 0.81, spiculated", "lung_nodule_clip", "0.2.0")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(seg))))
    assert seg.get_segment_description(1).segment_label == "malignancy 0.81, spiculated"
    clicked = sources[k].SOPInstanceUID
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=[clicked], segment_numbers=[1])
    region = frames[0, :, :, 0]  # (rows, columns)
    assert region[MARKER_ROW, MARKER_COL] == 1 and region.sum() == 7 * 5
    assert region[MARKER_ROW, MARKER_COL - 5] == 0


def test_sr_reports_score_class_and_features_on_the_region(series):
    folder, k = series
    sources = source_instances(folder)
    label = _label((sources[0].Columns, sources[0].Rows, len(sources)), k)
    seg = region_segmentation(label, sources, "summary", "lung_nodule_clip", "0.2.0")
    sr = measurement_report(RESULT, label, sources, seg, "lung_nodule_clip", "0.2.0",
                            score_key="malignancy_probability", class_key="class", click_slice=k)
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(_bytes(sr)))
    assert isinstance(sr, hd.sr.ComprehensiveSR)  # 2D: OHIF fails on a Comprehensive 3D SR
    (group,) = sr.content.get_planar_roi_measurement_groups()
    (measurement,) = group.get_measurements()
    assert measurement.name == PROBABILITY_OF_CANCER and measurement.value == pytest.approx(0.81)
    evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert evaluations == {"Predicted class": "malignant", "margin": "spiculated"}
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    (image,) = region.ContentSequence  # the SCOORD's source image: the clicked instance
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[k].SOPInstanceUID
    np.testing.assert_allclose(region.value[0], [MARKER_COL - 3, MARKER_ROW - 2])
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in _walk(group[0]) if getattr(item, "ValueType", "") == "TEXT"}
    assert texts["Algorithm Name"] == "lung_nodule_clip" and texts["Algorithm Version"] == "0.2.0"


def test_nothing_drawn_is_refused(series):
    folder, k = series
    sources = source_instances(folder)
    with pytest.raises(InvalidRequest, match="drew no region"):
        region_segmentation(np.zeros((sources[0].Columns, sources[0].Rows, len(sources))), sources, "x", "m", "1")


def _walk(item):
    for child in getattr(item, "ContentSequence", []):
        yield child
        yield from _walk(child)


def _bytes(dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(buffer, dataset, write_like_original=False)
    return buffer.getvalue()
