"""The bone predictor without training: ROI -> crop geometry (click, box, mask, any orientation), the
heatmap back on the image grid, field validation, result JSON, label volume and summary."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.data.roi import roi_extent_mm, roi_region
from oncofusion.models.bone_scnet.network import SCNet
from oncofusion.networks.trainable import TrainableWeights
from oncofusion.transforms.cube_to_image import cube_to_image
from oncofusion.transforms.geometry import voxel_to_world
from tests.bone_helpers import blob_image, bone_bundle_config

torch.set_num_threads(1)
FIELDS = {"sex": "male", "age": 14, "location": "metaphysis", "fracture": "no"}
# an oblique-free but flipped, anisotropic scanner affine (LPS-like storage, 0.8 x 0.9 x 1.5 mm)
AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, -0.9, 0, 12.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])
BLOB = (22, 15, 12)


def _checkpoints(root, fusion: bool, folds=(0, 1)):
    for fold in folds:
        torch.manual_seed(fold)
        path = root / f"fold{fold}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": TrainableWeights(SCNet(fusion=fusion)).state_dict()}, path)
    return root


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    ckpt = _checkpoints(tmp_path_factory.mktemp("random_ckpt"), fusion=True)
    return bone_bundle_config("inference.json", ckpt_dir=str(ckpt), device="cpu").get_parsed_content("predictor")


@pytest.fixture(scope="module")
def image_only_predictor(tmp_path_factory):
    ckpt = _checkpoints(tmp_path_factory.mktemp("random_ckpt_image_only") / "image_only", fusion=False)
    parser = bone_bundle_config("inference.json", "image_only.json", ckpt_dir=str(ckpt.parent), device="cpu")
    return parser.get_parsed_content("predictor")


def test_crop_is_centred_on_the_roi_for_click_box_and_mask(predictor):
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    mask = np.zeros(image.shape[1:], np.uint8)
    mask[BLOB[0] - 1 : BLOB[0] + 2, BLOB[1] - 1 : BLOB[1] + 2, BLOB[2] - 1 : BLOB[2] + 2] = 1
    rois = [Roi(points=[BLOB]), Roi(box=((BLOB[0] - 6, BLOB[1] - 4, BLOB[2] - 2), (BLOB[0] + 6, BLOB[1] + 4, BLOB[2] + 2))),
            Roi(mask=mask), Roi(points=[(BLOB[0] - 9, BLOB[1], BLOB[2]), BLOB])]  # of two clicks, the last
    patches = []
    for roi in rois:
        np.testing.assert_allclose(roi.center(), BLOB)
        center_mm = voxel_to_world(AFFINE, roi.center()[None])[0]
        context = predictor.locate({"image": image}, roi, FIELDS, fold=None)
        np.testing.assert_allclose(context.center_mm, center_mm)
        patch, clinical = predictor.model_inputs(context)
        patch_affine = context.extras["patch_affine"]
        assert patch.shape == (1, 1, 24, 24, 24) and clinical.shape == (1, 11)
        # the blob (bone window: 1000 HU -> 0.83) sits on the patch's centre voxel, whatever the image orientation
        np.testing.assert_array_equal(np.argwhere(patch[0, 0].numpy() == patch.max()).mean(0), (12, 12, 12))
        np.testing.assert_allclose(voxel_to_world(patch_affine, np.array([[12, 12, 12]]))[0], center_mm, atol=1e-6)
        # 1.25 mm voxels along L, P, S
        np.testing.assert_allclose(np.abs(np.diag(patch_affine)[:3]), 1.25)
        patches.append(patch)
    for patch in patches[1:]:
        torch.testing.assert_close(patch, patches[0])


def test_a_cube_map_goes_back_to_the_image_grid():
    cube_affine = np.diag([-1.25, -1.25, 1.25, 1.0])
    cube_affine[:3, 3] = voxel_to_world(AFFINE, np.array([BLOB]))[0] - cube_affine[:3, :3] @ np.full(3, 12)
    values = np.zeros((24, 24, 24), np.float32)
    values[12, 12, 12] = 1.0
    on_image = cube_to_image(values, cube_affine, AFFINE, (44, 36, 28), order=0)
    assert on_image.shape == (44, 36, 28)
    assert tuple(np.argwhere(on_image == 1).mean(0).round().astype(int)) == BLOB
    # the cube covers 30 mm: about 30/0.8 x 30/0.9 x 30/1.5 image voxels, clipped to the image
    covered = cube_to_image(np.ones((24, 24, 24)), cube_affine, AFFINE, (44, 36, 28)) > 0
    assert 30 <= np.ptp(np.argwhere(covered)[:, 0]) + 1 <= 44 and np.ptp(np.argwhere(covered)[:, 2]) + 1 == 20


def test_roi_region_and_extent():
    shape = (44, 36, 28)
    ball = roi_region(Roi(points=[BLOB]), shape, AFFINE, radius_mm=5.0)
    volume = ball.sum() * 0.8 * 0.9 * 1.5
    assert volume == pytest.approx(4 / 3 * np.pi * 5.0**3, rel=0.15) and ball[BLOB]
    assert roi_extent_mm(ball, BLOB, AFFINE) <= 5.0 + 1e-6
    box = roi_region(Roi(box=((2, 3, 4), (5.2, 6, 7))), shape, AFFINE)
    assert box.sum() == 5 * 4 * 4  # inclusive, rounded outwards
    mask = np.zeros(shape, np.uint8)
    mask[1, 1, 1] = 1
    assert roi_region(Roi(mask=mask), shape, AFFINE).sum() == 1
    assert roi_extent_mm(np.zeros(shape, bool), BLOB, AFFINE) == 0.0


def test_predict_returns_probabilities_heatmap_and_contributions(predictor):
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    prediction = predictor.predict({"image": image}, Roi(points=[BLOB]), {**FIELDS, "radius_mm": "8"})
    result = prediction.result
    assert result["prediction"] in ("chondroid", "osteoid")
    assert sum(result["class_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["osteoid_probability"] == pytest.approx(np.mean(result["fold_probabilities"]), abs=1e-6)
    assert len(result["fold_probabilities"]) == 2 and result["model_variant"] == "SC-Net (CT + clinical)"
    assert result["clinical_fields"] == {"sex": "male", "age": 14.0, "location": "metaphysis", "fracture": False}
    assert set(result["clinical_contributions"]) == {"sex", "age", "location", "fracture"}
    assert result["clinical_contributions"]["location"]["value"] == "metaphysis"
    assert result["crop_size_mm"] == 30.0 and not result["roi_exceeds_crop"]
    label = prediction.label
    assert label.shape == image.shape[1:] and label.dtype == np.uint8 and label.max() <= 3
    assert label[BLOB] > 0 or label.any()
    assert (label > 0).sum() <= roi_region(Roi(points=[BLOB]), label.shape, AFFINE, 8.0).sum()
    names = list(prediction.label_names)
    assert re.fullmatch(r"(osteoid|chondroid) \d\.\d\d( \(.+\))?", names[0])
    assert prediction.label_names[names[0]] == 1  # the summary region is value 1, what Slicer imports
    assert names[0] == predictor.summarize(result)
    assert sorted(prediction.label_names.values()) == list(range(1, len(names) + 1))
    if label.max() > 1:  # the strongest level is nested inside the weaker ones' extent
        strongest, weaker = np.argwhere(label == 1), np.argwhere(label > 1)
        assert len(strongest) and result["heatmap"]["levels"]["1"] == ">= 0.8" and len(weaker)


def test_clinical_input_changes_the_prediction(predictor):
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    young = predictor.predict({"image": image}, Roi(points=[BLOB]), FIELDS).result["osteoid_probability"]
    old = predictor.predict({"image": image}, Roi(points=[BLOB]), {"sex": "female", "age": 70, "location": "flat bone",
                                                        "fracture": "yes"}).result["osteoid_probability"]
    assert young != pytest.approx(old, abs=1e-6)


def test_missing_optional_fields_are_allowed_and_not_summarised(predictor):
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    result = predictor.predict({"image": image}, Roi(points=[BLOB]), {"sex": "female", "age": 50}).result
    assert result["clinical_fields"]["location"] is None and result["clinical_fields"]["fracture"] is None
    assert result["clinical_contributions"]["location"]["value"] == "unknown location"
    assert "location" not in predictor.summarize(result) and "fracture" not in predictor.summarize(result)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({**FIELDS, "age": 130}, "age 130 is outside 0-120"),
        ({"age": 30}, "sex is required"),
        ({**FIELDS, "location": "skull"}, "location 'skull' is not one of"),
        ({**FIELDS, "radius_mm": "wide"}, "radius_mm 'wide' is not a number"),
        ({**FIELDS, "radius_mm": 100}, "radius_mm 100 is outside 0-30 mm"),
    ],
)
def test_bad_fields_are_invalid_requests(predictor, fields, message):
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        predictor.predict({"image": image}, Roi(points=[BLOB]), fields)


def test_roi_outside_and_fold_selection(predictor):
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    with pytest.raises(InvalidRequest, match="lies outside image 44x36x28"):
        predictor.predict({"image": image}, Roi(points=[(50, 1, 1)]), FIELDS)
    one = predictor.predict({"image": image}, Roi(points=[BLOB]), FIELDS, fold=1).result
    assert len(one["fold_probabilities"]) == 1
    with pytest.raises(ValueError, match="no checkpoint of fold 7"):
        predictor.predict({"image": image}, Roi(points=[BLOB]), FIELDS, fold=7)


def test_image_only_predictor_needs_no_clinical_form(image_only_predictor):
    assert image_only_predictor.config_options == {"radius_mm": 10.0}
    image = blob_image(shape=(44, 36, 28), affine=AFFINE, blob_ijk=BLOB)
    prediction = image_only_predictor.predict({"image": image}, Roi(points=[BLOB]), {})
    assert prediction.result["model_variant"] == "S-Net (CT only)"
    assert "clinical_contributions" not in prediction.result and prediction.result["clinical_fields"] == {}
    assert list(prediction.label_names)[0].endswith("(CT only)")
