"""Request parsing at its edges: exact messages, the image border, mask files, sidecars and blank fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from oncofusion.contract import InvalidRequest
from oncofusion.serving.request import (
    check_inside,
    contradictions,
    decode_param,
    field_sources,
    merge_fields,
    parse_box,
    parse_points,
    parse_roi,
    read_sidecar,
    sidecar_path,
)

SHAPE = (10, 8, 6)
BOX_USAGE_3D = "'roi' must be [[i0, j0, k0], [i1, j1, k1]] or [i0, i1, j0, j1, k0, k1] on this 3D image, got "


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(InvalidRequest) as e:
        call(*args, **kwargs)
    return str(e.value)


# -- parameters as JSON -----------------------------------------------------------------------------
def test_json_parameters_may_arrive_as_bytes():
    assert parse_points(b"[[1, 2, 3]]") == [(1.0, 2.0, 3.0)]
    assert decode_param(b'{"a": 1}', "x") == {"a": 1}
    assert _message(parse_points, b"[[1, 2") == "'foreground' is not valid JSON: '[[1, 2'"


def test_invalid_json_is_quoted_up_to_80_characters():
    text = "[" + "1, " * 40
    assert _message(decode_param, text, "roi") == f"'roi' is not valid JSON: {text[:80]!r}"


def test_points_default_to_the_foreground_of_a_volume():
    assert _message(parse_points, 5) == "'foreground' must be a point (i, j, k) or a list of points, got 5"
    assert _message(parse_points, "[[1, 2]]") == (
        "'foreground' point 0 must have 3 coordinates (i, j, k) on this 3D image, got [1, 2]")
    assert _message(parse_points, 5, "fg", 2) == "'fg' must be a point (i, j) or a list of points, got 5"


# -- boxes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [5, [1, 2, 3], [[1], [2], [3], [4], [5], [6]], [[1, 2, 3], [4, 5]]])
def test_box_usage_message_lists_both_forms(value):
    assert _message(parse_box, value) == BOX_USAGE_3D + repr(value)


def test_box_usage_message_on_a_2d_image():
    assert _message(parse_box, [1, 2, 3], "box", dims=2) == (
        "'box' must be [[i0, j0], [i1, j1]] or [i0, i1, j0, j1] on this 2D image, got [1, 2, 3]")


@pytest.mark.parametrize("value, message", [
    ([["a", 2, 3], [4, 5, 6]], "'roi' corner has a non-numeric coordinate 'a'"),
    ([[1, 2, 3], [4, None, 6]], "'roi' corner has a non-numeric coordinate None"),
    ([1, 2, 3, 4, "5", 6], "'roi' box has a non-numeric coordinate '5'"),
    ([1, 2, 3, 4, float("inf"), 6], "'roi' box has a non-finite coordinate inf"),
])
def test_box_coordinates_are_checked_naming_the_form(value, message):
    assert _message(parse_box, value) == message


# -- the image border -------------------------------------------------------------------------------
def test_points_round_to_a_voxel_inside_the_image():
    check_inside([(9.49, 0, 5), (-0.5, 7, 0)], SHAPE)
    assert _message(check_inside, [(10, 0, 0)], SHAPE) == "ROI point (10, 0, 0) lies outside image 10x8x6"
    assert _message(check_inside, [(9.5, 0, 0)], SHAPE) == "ROI point (9.5, 0, 0) lies outside image 10x8x6"
    assert _message(check_inside, [(0, -0.51, 0)], SHAPE) == "ROI point (0, -0.51, 0) lies outside image 10x8x6"
    assert _message(check_inside, [(1234567, 0, 0)], SHAPE) == (
        "ROI point (1234567, 0, 0) lies outside image 10x8x6")


def test_a_point_must_have_the_dimension_of_the_image():
    with pytest.raises(ValueError):
        check_inside([(1, 1)], SHAPE)


@pytest.mark.parametrize("box, clipped", [
    (((-3, -3, -3), (-0.5, -0.5, -0.5)), ((0, 0, 0), (0, 0, 0))),
    (((9.5, 7.5, 5.5), (20, 20, 20)), ((9, 7, 5), (9, 7, 5))),
    (((9, 7, 5), (9, 7, 5)), ((9, 7, 5), (9, 7, 5))),
    (((0.2, 0.3, 0.4), (0.6, 0.7, 0.8)), ((0.2, 0.3, 0.4), (0.6, 0.7, 0.8))),
])
def test_a_box_touching_the_image_is_clipped_to_it(box, clipped):
    roi = parse_roi({"roi": [box[0][0], box[1][0], box[0][1], box[1][1], box[0][2], box[1][2]]}, SHAPE)
    assert roi.box == clipped
    assert all(isinstance(v, float) for corner in roi.box for v in corner)


@pytest.mark.parametrize("flat, shown", [
    ([-3, -0.51, 0, 1, 0, 1], "(-3, 0, 0)-(-0.51, 1, 1)"),
    ([10, 12, 0, 1, 0, 1], "(10, 0, 0)-(12, 1, 1)"),
    ([0, 1, 0, 1, 5.51, 9], "(0, 0, 5.51)-(1, 1, 9)"),
    ([0, 1, -2, -1, 0, 1], "(0, -2, 0)-(1, -1, 1)"),
])
def test_a_box_that_misses_the_image_is_refused(flat, shown):
    assert _message(parse_roi, {"roi": flat}, SHAPE) == f"ROI box {shown} lies outside image 10x8x6"


# -- prompts a model does or does not take ----------------------------------------------------------
def test_refused_prompts_are_all_named():
    request = {"foreground": [[1, 1, 1]], "roi": [0, 1, 0, 1, 0, 1]}
    assert _message(parse_roi, request, SHAPE, kinds=("mask",)) == (
        "this model does not use clicks or a box; it accepts a mask")
    assert _message(parse_roi, {"foreground": "[[1, 1, 1]]"}, SHAPE, kinds=("box", "mask")) == (
        "this model does not use clicks; it accepts a box, a mask")


def test_negative_clicks_are_refused_unless_the_model_uses_them():
    request = {"foreground": [[1, 1, 1]], "background": [[2, 2, 2]]}
    assert _message(parse_roi, request, SHAPE, kinds=("points", "box")) == (
        "this model does not use negative (background) clicks; it accepts clicks, a box")
    roi = parse_roi(request, SHAPE, kinds=("points", "background"))
    assert roi.background == [(2.0, 2.0, 2.0)]
    assert parse_roi({**request, "background": []}, SHAPE, kinds=("points",)).background == []


def test_an_empty_prompt_of_a_kind_not_taken_is_no_prompt():
    roi = parse_roi({"foreground": "[]", "background": None, "roi": [0, 1, 0, 1, 0, 1]}, SHAPE, kinds=("box",))
    assert roi.points == [] and roi.box == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    roi = parse_roi({"foreground": [], "roi": [0, 1, 0, 1, 0, 1]}, SHAPE, kinds=("box",))
    assert roi.points == []


def test_parse_roi_names_each_parameter_in_its_messages():
    assert _message(parse_roi, {"foreground": [[1, 2]]}, SHAPE).startswith("'foreground' point 0 must have 3")
    assert _message(parse_roi, {"foreground": [[1, 1, 1]], "background": [[1, 2]]}, SHAPE).startswith(
        "'background' point 0 must have 3")
    assert _message(parse_roi, {"roi": [1, 2]}, SHAPE) == BOX_USAGE_3D + "[1, 2]"


def test_parse_roi_reads_a_box_of_the_image_dimension():
    roi = parse_roi({"roi": [4, 1, 2, 6]}, (10, 8))
    assert roi.box == ((1.0, 2.0), (4.0, 6.0))


@pytest.mark.parametrize("kinds, message", [
    (("points",), "no lesion given: send a 'foreground' point [[i, j]]"),
    (("box",), "no lesion given: send an 'roi' box [i0, i1, j0, j1]"),
    (("mask",), "no lesion given: send a 'label' mask file"),
    (("points", "box", "mask"), "no lesion given: send a 'foreground' point [[i, j]], an 'roi' box "
                                "[i0, i1, j0, j1], a 'label' mask file"),
])
def test_no_lesion_message_offers_what_the_model_takes(kinds, message):
    assert _message(parse_roi, {}, (10, 8), kinds=kinds) == message


# -- label masks ------------------------------------------------------------------------------------
def _mask_file(tmp_path, name="mask.nii.gz"):
    path = tmp_path / name
    path.write_bytes(b"")
    return path


def test_a_mask_is_read_with_the_image_reader_and_any_channel_counts(tmp_path):
    path = _mask_file(tmp_path)
    seen = []

    def reader(value):
        seen.append(value)
        mask = torch.zeros((2, *SHAPE))
        mask[0, 1, 2, 3] = 1.0
        mask[1, 4, 5, 2] = 0.5
        return mask

    roi = parse_roi({"label": str(path)}, SHAPE, reader=reader)
    assert seen == [str(path)]
    assert roi.mask.dtype == np.uint8 and roi.mask.shape == SHAPE
    assert roi.mask.sum() == 2 and roi.mask[1, 2, 3] == 1 and roi.mask[4, 5, 2] == 1


def test_a_mask_is_not_read_for_a_model_that_takes_none(tmp_path):
    request = {"foreground": [[1, 1, 1]], "label": str(tmp_path / "gone.nii.gz")}
    assert parse_roi(request, SHAPE, kinds=("points",)).mask is None
    with pytest.raises(InvalidRequest) as e:
        parse_roi(request, SHAPE)
    assert str(e.value) == "label mask file 'gone.nii.gz' not found" and e.value.status_code == 400


@pytest.mark.parametrize("name", ["lesion.nii.gz", "LESION.NII.GZ", "seg.nrrd", "seg.NRRD", "mask.png", "mask.PNG",
                                  "a.nii"])
def test_a_missing_file_named_like_an_image_is_not_a_segment_name(name):
    request = {"foreground": [[1, 1, 1]], "label": name}
    assert _message(parse_roi, request, SHAPE) == f"label mask file '{name}' not found"


@pytest.mark.parametrize("label", ["lesion", "", 5, ["mask.nii.gz"], None])
def test_a_label_that_is_no_file_is_no_mask(label):
    assert parse_roi({"foreground": [[1, 1, 1]], "label": label}, SHAPE).mask is None


# -- sidecars and fields ----------------------------------------------------------------------------
@pytest.mark.parametrize("image_id", ["", ".", "..", "a/b", "../b", "a\\b", "\\b"])
def test_sidecar_path_refuses_ids_that_are_not_plain_names(tmp_path, image_id):
    assert sidecar_path(tmp_path, image_id) is None


def test_sidecar_path_of_a_plain_id(tmp_path):
    assert sidecar_path(str(tmp_path), "case.1") == tmp_path / "case.1.json"
    assert sidecar_path(tmp_path, "...") == tmp_path / "....json"


def test_read_sidecar_without_a_folder_or_an_id(tmp_path):
    (tmp_path / "case.json").write_text(json.dumps({"age": 3}))
    assert read_sidecar(tmp_path, "case") == {"age": 3}
    assert read_sidecar(None, "case") == {}
    assert read_sidecar("", "case") == {}
    assert read_sidecar(tmp_path, None) == {}
    assert read_sidecar(tmp_path, "") == {}


def test_read_sidecar_must_hold_an_object(tmp_path):
    (tmp_path / "case.json").write_text("[1, 2]")
    assert _message(read_sidecar, tmp_path, "case") == "sidecar 'case.json' must hold a JSON object, got list"


def test_blank_request_values_let_the_sidecar_through():
    sidecar = {"age": 70, "report": "spiculated", "smoker": True}
    request = {"age": None, "report": "  ", "smoker": False, "note": "", "extra": None}
    assert merge_fields(request, sidecar, {"age": 0}) == {
        "age": 70, "report": "spiculated", "smoker": False, "note": "", "extra": None}
    assert merge_fields({"age": ""}, {}, {"age": [40, 50]}) == {"age": 40}
    assert merge_fields({"age": 0}, {"age": 70}, {}) == {"age": 0}


def test_target_keys_stay_private_but_a_request_may_still_send_them():
    fields = merge_fields({"os": 3}, {"os": 12.0, "event": 1, "age": 5}, {}, target_keys=["os", "event"])
    assert fields == {"os": 3, "age": 5}


def test_blank_form_fields_are_no_prompt_not_invalid_json():
    """Form clients send untouched fields as empty strings: they mean "not given"."""
    assert decode_param("", "foreground") is None and decode_param(b"  ", "roi") is None
    roi = parse_roi({"foreground": "[[1, 2, 3]]", "roi": "", "background": ""}, (8, 8, 8))
    assert roi.points == [(1.0, 2.0, 3.0)] and roi.box is None and roi.background == []
    with pytest.raises(InvalidRequest, match="no lesion given"):
        parse_roi({"foreground": "", "roi": ""}, (8, 8, 8))


# -- where fields come from, and values that contradict the study's record ------------------------------
def test_each_field_names_its_source():
    sources = field_sources({"age": "15", "sex": "", "foreground": [[1, 1, 1]]},
                            {"sex": "female", "report": "r", "label": 1, "bundle": "bone"},
                            {"age": 50, "sex": "unknown", "fracture": "no"})
    assert sources == {"age": "request", "sex": "sidecar", "report": "sidecar", "fracture": "default"}


def test_only_the_fields_a_model_reads_are_reported():
    sidecar = {"case_id": "rectal_0000", "frames": ["a", "b"], "report": "r", "synthetic": True}
    sources = field_sources({"click_radius_mm": ""}, sidecar, {"report": "", "click_radius_mm": 5.0},
                            known={"report", "click_radius_mm"})
    assert sources == {"report": "sidecar", "click_radius_mm": "default"}


def test_a_request_value_that_contradicts_the_sidecar_is_warned_about():
    sidecar = {"age": 63, "sex": "F", "location": "metaphysis", "label": 1}
    assert contradictions({"age": "63", "sex": "f", "location": ""}, sidecar) == []  # same, as Slicer sends it
    (warning,) = contradictions({"age": "14", "sex": "F", "label": 0}, sidecar)
    assert warning.startswith("'age' sent as '14' but the study records 63")
    assert contradictions({"age": 14}, {}) == []  # nothing recorded, nothing to contradict
