"""The OncoFusion Slicer module's logic, without Slicer (plugins/slicer/OncoFusion/OncoFusionLib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "OncoFusion"))

from OncoFusionLib.logic import (  # noqa: E402
    ServerResults,
    StudyForm,
    error_message,
    form_fields,
    level_colours,
    params_form,
    result_rows,
)

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


def test_the_form_offers_each_option_of_the_model():
    config = {"report": "", "age": "", "sex": ["", "female", "male"], "click_radius_mm": 5.0, "frame": ""}
    assert form_fields(config) == {"report": None, "age": None, "sex": ("female", "male"), "click_radius_mm": None,
                                   "frame": None}


def test_a_prediction_posts_the_study_form_as_monai_labels_params_field():
    import email.parser

    seen = {}

    def post(url, body, headers):
        seen.update(url=url, body=body, headers=headers)
        return json.dumps({"llnm_probability": 0.4}).encode()

    form = {"report": "Solid nodule -- see --oncofusion-x boundary-like text", "age": "37"}
    result = ServerResults("http://s:8000/", token="t", post=post).predict("thyroid_llnm_summary", "us 1", form)
    assert result == {"llnm_probability": 0.4}
    assert seen["url"] == "http://s:8000/infer/thyroid_llnm_summary?image=us+1&output=json"
    assert seen["headers"]["Authorization"] == "Bearer t"
    message = email.parser.BytesParser().parsebytes(
        f"Content-Type: {seen['headers']['Content-Type']}\r\n\r\n".encode() + seen["body"])
    (part,) = message.get_payload()
    assert part.get_param("name", header="content-disposition") == "params"
    assert json.loads(part.get_payload()) == form
    body, content_type = params_form({})
    assert params_form({})[1] != content_type  # a fresh boundary per request


def test_a_refusal_shows_the_servers_message():
    class Refused(Exception):
        def read(self):
            return json.dumps({"detail": "sex 'F' is not one of female, male"}).encode()

    assert error_message(Refused("HTTP Error 422")) == "sex 'F' is not one of female, male"
    assert error_message(ConnectionRefusedError("connection refused")) == "connection refused"
