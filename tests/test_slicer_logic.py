"""The OncoFusion Slicer module's logic, without Slicer (plugins/slicer/OncoFusion/OncoFusionLib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "OncoFusion"))

from OncoFusionLib.logic import ServerResults, StudyForm, level_colours, result_rows  # noqa: E402

BONE_RESULT = {
    "model": "bone_tumor_matrix", "model_version": "0.2.0",
    "class_probabilities": {"chondroid": 0.3, "osteoid": 0.7},
    "clinical_contributions": {"age": {"value": "14", "log_odds": 0.41}, "sex": {"value": "male", "log_odds": -0.05}},
    "field_sources": {"age": "request", "sex": "sidecar"},
    "warnings": ["'age' sent as '14' but the study records 63: the value sent was used; check it is this patient's"],
    "label_names": {"osteoid 0.70": 1, "Grad-CAM >= 0.6": 2, "Grad-CAM >= 0.4": 3},
}


def test_rows_lay_out_a_result_for_a_reader():
    rows = result_rows(BONE_RESULT)
    assert rows[:2] == [("probability", "chondroid", "0.300"), ("probability", "osteoid", "0.700")]
    assert ("field contribution", "age = 14", "+0.410 log-odds") in rows
    assert ("field source", "sex", "sidecar") in rows
    assert rows[-2][0] == "warning" and "study records 63" in rows[-2][2]
    assert rows[-1] == ("model", "bone_tumor_matrix", "0.2.0")


def test_semantic_features_show_the_likeliest_option():
    rows = result_rows({"semantic_features": {"margin": {"smooth": 0.2, "spiculated": 0.8}}})
    assert ("semantic feature", "margin", "spiculated (0.80)") in rows


def test_latest_results_come_from_the_image_info_with_the_token():
    seen = {}

    def fetch(url, headers):
        seen.update(url=url, headers=headers)
        return json.dumps({"name": "x.nii.gz", "oncofusion_predictions": {"bone_tumor_matrix": BONE_RESULT}}).encode()

    results = ServerResults("http://127.0.0.1:8000/", token="t0k", fetch=fetch).latest("bone 0001")
    assert results == {"bone_tumor_matrix": BONE_RESULT}
    assert seen["url"] == "http://127.0.0.1:8000/datastore/image/info?image=bone+0001"
    assert seen["headers"] == {"Authorization": "Bearer t0k"}
    assert ServerResults("http://s", fetch=lambda url, headers: b"{}").latest("y") == {}


def test_the_form_belongs_to_the_study_on_screen():
    form = StudyForm(fields=("sex", "age"))
    with pytest.raises(ValueError, match="open a study"):
        form.edit("age", "14")
    assert form.show_study("bone_0001")
    form.edit("age", "14")
    form.edit("sex", "male")
    assert form.params("bone_0001") == {"age": "14", "sex": "male"}
    assert form.params("bone_0002") == {}  # never sent with another study
    assert not form.show_study("bone_0001")  # same study: edits kept
    assert form.show_study("bone_0002") and form.params("bone_0002") == {}  # next patient: cleared
    form.edit("age", "63")
    form.edit("age", " ")
    assert form.params("bone_0002") == {}  # a cleared cell falls back to the study's record
    with pytest.raises(KeyError, match="unknown field 'weight'"):
        form.edit("weight", "70")


def test_overlay_value_1_is_the_strongest_colour():
    colours = level_colours(BONE_RESULT["label_names"])
    assert list(colours) == [1, 2, 3]
    assert colours[1] == (0.90, 0.10, 0.10) and colours[1] != colours[2] != colours[3]
    assert level_colours({"background": 0}) == {}
