"""The contract every bundle and the server agree on: inputs, prompts and the ROI."""

from __future__ import annotations

import numpy as np
import pytest

from oncofusion.contract import (
    PROMPT_KINDS,
    READER_DIMS,
    ImageInput,
    InputSpec,
    InvalidRequest,
    Prediction,
    Roi,
)


def test_reader_kinds_and_their_dimensions():
    assert READER_DIMS == {"volume": 3, "frame": 2, "slide": 2}
    assert PROMPT_KINDS == ("points", "box", "mask", "background")


@pytest.mark.parametrize("reader, dims", [("volume", 3), ("frame", 2), ("slide", 2)])
def test_image_input_reader_gives_its_dimension(reader, dims):
    image = ImageInput(name="x", reader=reader)
    assert image.spatial_dims == dims
    assert image.required is True and image.description == ""


def test_image_input_refuses_an_unknown_reader_naming_the_input():
    with pytest.raises(ValueError) as e:
        ImageInput(name="pet", reader="dicom")
    assert str(e.value) == "image input 'pet': reader 'dicom' is not one of ['frame', 'slide', 'volume']"


def test_a_saved_label_input_is_an_optional_input_with_a_tag():
    assert ImageInput("regions", required=False, saved_label="final").saved_label == "final"
    with pytest.raises(ValueError, match="image input 'regions': a saved label"):
        ImageInput("regions", saved_label="final")  # required: a study may have no saved label
    with pytest.raises(ValueError, match="non-empty tag"):
        ImageInput("regions", required=False, saved_label=" ")


def test_input_spec_defaults_to_one_volume_with_every_prompt():
    spec = InputSpec()
    assert [i.name for i in spec.images] == ["image"]
    assert spec.primary.reader == "volume" and spec.dimension == 3
    assert tuple(spec.prompt) == PROMPT_KINDS
    assert tuple(spec.texts) == () and spec.fields is None


def test_input_spec_primary_is_the_first_image_and_sets_the_dimension():
    spec = InputSpec(images=(ImageInput("us", "frame"), ImageInput("ct", "volume")), prompt=("box",))
    assert spec.primary.name == "us" and spec.dimension == 2
    assert spec.image("ct").reader == "volume"
    with pytest.raises(KeyError) as e:
        spec.image("mri")
    assert e.value.args[0] == "no image input 'mri' (have ['us', 'ct'])"


@pytest.mark.parametrize("kwargs, message", [
    ({"images": ()}, "a model needs at least one image input"),
    ({"images": (ImageInput("ct"), ImageInput("ct", "frame"))}, "image input names must be unique, got ['ct', 'ct']"),
    ({"prompt": ("points", "scribble", "lasso")},
     "unknown prompt kind(s) ['scribble', 'lasso']: use ['points', 'box', 'mask', 'background']"),
])
def test_input_spec_refusals_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError) as e:
        InputSpec(**kwargs)
    assert str(e.value) == message


def test_input_spec_accepts_no_prompt():
    assert tuple(InputSpec(prompt=()).prompt) == ()


def test_invalid_request_carries_a_status_code():
    assert InvalidRequest("bad").status_code == 422
    error = InvalidRequest("missing", 400)
    assert error.status_code == 400 and str(error) == "missing"
    assert isinstance(error, ValueError)


def test_roi_dimension_follows_mask_then_box_then_points():
    assert Roi().spatial_dims is None
    assert Roi(points=[(1.0, 2.0)]).spatial_dims == 2
    assert Roi(points=[(1.0, 2.0)], box=((0, 0, 0), (1, 1, 1))).spatial_dims == 3
    assert Roi(box=((0, 0, 0), (1, 1, 1)), mask=np.zeros((2, 2), np.uint8)).spatial_dims == 2


def test_roi_center_of_a_mask_is_its_centroid():
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 2, 3] = mask[3, 2, 5] = 1
    roi = Roi(points=[(0.0, 0.0, 0.0)], box=((0, 0, 0), (1, 1, 1)), mask=mask)
    np.testing.assert_allclose(roi.center(), [2.0, 2.0, 4.0])


def test_roi_center_of_a_single_voxel_mask_is_that_voxel():
    mask = np.zeros((3, 3), np.uint8)
    mask[2, 1] = 1
    np.testing.assert_allclose(Roi(mask=mask).center(), [2.0, 1.0])


def test_roi_center_of_a_box_is_its_middle():
    center = Roi(points=[(0, 0, 0)], box=((1, 2, 3), (5, 10, 4))).center()
    assert center.dtype == np.float64
    np.testing.assert_allclose(center, [3.0, 6.0, 3.5])


def test_roi_center_of_clicks_is_the_last_click():
    center = Roi(points=[(1, 2, 3), (2, 4, 4)]).center()
    assert center.dtype == np.float64
    np.testing.assert_allclose(center, [2.0, 4.0, 4.0])  # not the midpoint between two lesions


def test_roi_center_refuses_an_empty_mask_and_an_empty_roi():
    with pytest.raises(InvalidRequest) as e:
        Roi(points=[(1, 1)], mask=np.zeros((3, 3), np.uint8)).center()
    assert str(e.value) == "ROI label mask is empty: draw the lesion or send a foreground point"
    with pytest.raises(InvalidRequest) as e:
        Roi().center()
    assert str(e.value) == "no lesion given: send a 'foreground' point, an 'roi' box or a label mask"
    assert e.value.status_code == 422


def test_prediction_defaults():
    prediction = Prediction({"p": 0.5})
    assert prediction.label is None and prediction.label_names == {}
    assert Prediction({}).label_names is not prediction.label_names
