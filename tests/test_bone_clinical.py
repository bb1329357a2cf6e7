"""Typed clinical fields: validation messages, encoding with missing indicators, the /info form, the
dictionary transform, and blank form values deferring to the study's sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oncofusion.contract import InvalidRequest
from oncofusion.data.clinical import ClinicalSchema, field_from_config, is_missing
from oncofusion.serving.request import merge_fields
from oncofusion.transforms.clinical import ClinicalVectord
from tests.bone_helpers import BONE_BUNDLE

FIELDS = json.loads((BONE_BUNDLE / "configs" / "inference.json").read_text())["clinical_fields"]


@pytest.fixture()
def schema() -> ClinicalSchema:
    return ClinicalSchema(FIELDS)


def test_encoding_columns_match_the_metadata(schema):
    metadata = json.loads((BONE_BUNDLE / "configs" / "metadata.json").read_text())
    clinical = metadata["network_data_format"]["inputs"]["clinical"]
    assert schema.size == clinical["num_channels"] == 11
    assert schema.columns == ["sex=female", "sex=male", "age", "location=epiphysis", "location=metaphysis",
                              "location=diaphysis", "location=flat bone", "location=spine", "location=missing",
                              "fracture", "fracture=missing"]
    assert len(clinical["channel_def"]) == schema.size
    assert {name: (s.start, s.stop) for name, s in schema.slices().items()} == {
        "sex": (0, 2), "age": (2, 3), "location": (3, 9), "fracture": (9, 11)}


def test_encode_values_and_missing_indicators(schema):
    vector = schema.encode_raw({"sex": "Male", "age": "14", "location": " metaphysis ", "fracture": "yes"})
    np.testing.assert_allclose(vector, [0, 1, 0.14, 0, 1, 0, 0, 0, 0, 1, 0], atol=1e-6)
    assert vector.dtype == np.float32
    missing = schema.encode_raw({"sex": "female", "age": 60, "location": "unknown", "fracture": None})
    np.testing.assert_allclose(missing, [1, 0, 0.6, 0, 0, 0, 0, 0, 1, 0, 1], atol=1e-6)
    # "no fracture" and "fracture unknown" are different inputs
    no = schema.encode_raw({"sex": "female", "age": 60, "fracture": False})
    assert no[9] == 0 and no[10] == 0 and missing[10] == 1
    # the attribution baseline: nothing known, a missing number at its reference (40 years), not 0
    np.testing.assert_allclose(schema.missing_vector(), [0, 0, 0.4, 0, 0, 0, 0, 0, 1, 0, 1], atol=1e-6)
    assert schema.validate({"sex": "male", "age": 30.5, "fracture": 1}) == {
        "sex": "male", "age": 30.5, "location": None, "fracture": True}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sex": "male", "age": 130}, "age 130 is outside 0-120"),
        ({"sex": "male", "age": -1}, "age -1 is outside 0-120"),
        ({"sex": "male", "age": "abc"}, "age 'abc' is not a number"),
        ({"sex": "male", "age": True}, "age True is not a number"),
        ({"sex": "male", "age": "inf"}, "age 'inf' is not a finite number"),
        ({"sex": "x", "age": 30}, "sex 'x' is not one of female, male"),
        ({"sex": "male", "age": 30, "location": "femur"},
         "location 'femur' is not one of epiphysis, metaphysis, diaphysis, flat bone, spine"),
        ({"sex": "male", "age": 30, "fracture": "maybe"}, "fracture 'maybe' must be yes or no"),
        ({"sex": "male", "age": 30, "fracture": 2}, "fracture 2 must be yes or no"),
        ({"sex": "male"}, "age is required"),
        ({"sex": "", "age": 30}, "sex is required"),
        ({"sex": "unknown", "age": 30}, "sex is required"),
    ],
)
def test_validation_names_the_field_and_what_is_allowed(schema, raw, message):
    with pytest.raises(InvalidRequest) as e:
        schema.validate(raw)
    assert message in str(e.value)
    assert e.value.status_code == 422


def test_config_options_are_a_form_with_not_given_first(schema):
    options = schema.config_options()
    assert options == {
        "sex": ["", "female", "male"],
        "age": "",
        "location": ["", "epiphysis", "metaphysis", "diaphysis", "flat bone", "spine", "unknown"],
        "fracture": ["", "no", "yes", "unknown"],
    }
    # every choice a form can send back validates
    for name, option in options.items():
        for choice in option if isinstance(option, list) else []:
            if choice and not schema.field(name).required:
                schema.field(name).validate(choice)


def test_schema_config_errors():
    with pytest.raises(ValueError, match="type must be one of"):
        field_from_config({"name": "x", "type": "text"})
    with pytest.raises(ValueError, match="needs 'choices'"):
        field_from_config({"name": "x", "type": "categorical"})
    with pytest.raises(ValueError, match="defined twice"):
        ClinicalSchema([{"name": "a", "type": "boolean"}, {"name": "a", "type": "boolean"}])
    with pytest.raises(ValueError, match="reference 50 is outside"):
        field_from_config({"name": "x", "type": "numeric", "low": 0, "high": 10, "reference": 50})
    assert ClinicalSchema(ClinicalSchema(FIELDS).to_config()).columns == ClinicalSchema(FIELDS).columns
    assert is_missing(float("nan")) and is_missing(" N/A ") and not is_missing(0) and not is_missing(False)


def test_blank_form_values_defer_to_the_sidecar(schema):
    """Slicer sends every option of the form; an untouched blank cell must not hide the study's value."""
    sidecar = {"sex": "female", "age": 71, "location": "diaphysis", "fracture": False, "label": 0, "roi": [1]}
    form = {"sex": "", "age": "", "location": "", "fracture": "", "foreground": [[1, 2, 3]]}
    fields = merge_fields(form, sidecar, schema.config_options())
    assert schema.validate(fields) == {"sex": "female", "age": 71.0, "location": "diaphysis", "fracture": False}
    # a value the user typed wins; "unknown" overrides the sidecar on purpose
    fields = merge_fields({**form, "age": "70", "location": "unknown"}, sidecar, schema.config_options())
    assert schema.validate(fields) == {"sex": "female", "age": 70.0, "location": None, "fracture": False}
    # no sidecar: blank stays blank, and a required field is then an error naming it
    with pytest.raises(InvalidRequest, match="sex is required"):
        schema.validate(merge_fields(form, {}, schema.config_options()))


def test_clinical_vector_transform(schema):
    transform = ClinicalVectord(keys=schema.names, schema=schema)
    out = transform({"image": 1, "case_id": "c1", "sex": "male", "age": 14, "location": None})
    assert isinstance(out["clinical"], torch.Tensor) and out["clinical"].dtype == torch.float32
    assert out["clinical"].shape == (schema.size,) and out["image"] == 1
    assert "sex" not in out and "location" not in out  # raw values dropped: a None cannot be collated
    with pytest.raises(InvalidRequest, match="case c2: age 300 is outside 0-120"):
        transform({"case_id": "c2", "sex": "male", "age": 300})
    with pytest.raises(ValueError, match="not clinical fields"):
        ClinicalVectord(keys=["weight"], schema=schema)
