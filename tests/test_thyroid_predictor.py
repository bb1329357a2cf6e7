"""The LLNM-Net predictor and its transforms without training: ROI -> crop geometry (box, click, mask,
anisotropic pixels), scalars, the report, refusals (click outside, uncalibrated frames, bad fields), the
result JSON, explanations that add up, the overlay on the frame grid, the ablation variants, the
memoised text encoder, float16 checkpoints and the threshold chosen on training folds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.ensemble import Ensemble
from oncofusion.io.frames import read_frame
from oncofusion.models.thyroid_llnm.explain import attention_rollout, grad_cam_pp_map, word_attributions
from oncofusion.models.thyroid_llnm.morphology import lobe_position
from oncofusion.models.thyroid_llnm.predictor import (
    VARIANT_NAMES,
    _negated,
    batch_keys,
    build_network,
    morphology_result,
)
from oncofusion.models.thyroid_llnm.transforms import (
    HalfPrecisionWeights,
    NoduleCropd,
    NoduleRoid,
    NoduleScalarsd,
    RandMissingScalarsd,
    RandNoduleCropd,
    crop_geometry,
    memoize_frozen_text_encoder,
)
from oncofusion.networks.trainable import TrainableWeights

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "thyroid_llnm"
TINY_SHAPE = (96, 88)  # (W, H): not square, so that a swapped axis shows
TINY_SPACING = (0.5, 0.45)  # mm (x, y): not square either


def thyroid_config(*files: str, **overrides):
    """The bundle's configs parsed in-process (``files`` relative to ``configs/``), with overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser["bundle_root"] = str(BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Four small synthetic studies in two folds; returns the manifest path."""
    from sample_data.generate_thyroid import generate

    out = tmp_path_factory.mktemp("thyroid_predictor")
    generate(out, num_cases=4, seed=3, num_folds=2, shape=TINY_SHAPE, spacing=TINY_SPACING, workers=1)
    return out / "manifest.json"


def _case(manifest: Path, index: int = 0) -> tuple[MetaTensor, dict, dict]:
    case = json.loads(manifest.read_text())["cases"][index]
    sidecar = json.loads((manifest.parent / "datastore" / "sidecars" / f"{case['case_id']}.json").read_text())
    return read_frame(manifest.parent / case["image"]), sidecar, case


def _random_checkpoints(root: Path, variant: str = "fusion", folds=(0, 1)) -> Path:
    args = thyroid_config("inference.json").get_parsed_content("network_args")
    for fold in folds:
        torch.manual_seed(fold)
        path = root / ("" if variant == "fusion" else variant) / f"fold{fold}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": HalfPrecisionWeights(build_network(args, variant)).state_dict()}, path)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("thyroid_random_ckpt")
    for variant in ("fusion", "image_only", "text_only"):
        _random_checkpoints(root, variant)
    return root


@pytest.fixture(scope="module")
def predictor(ckpt):
    return thyroid_config("inference.json", ckpt_dir=str(ckpt), device="cpu").get_parsed_content("predictor")


def _frame(values: np.ndarray, spacing=(0.5, 0.25)) -> MetaTensor:
    """A grey (1, W, H) frame calibrated by an ultrasound region."""
    affine = torch.diag(torch.tensor([spacing[0], spacing[1], 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32)[None], affine=affine,
                      meta={"spacing_source": "ultrasound_region"})


# -- transforms ------------------------------------------------------------------------------------------
def test_crop_is_square_in_mm_centred_on_the_roi_with_the_margin():
    values = np.zeros((120, 200), np.float32)
    values[60, 100] = 255.0  # one bright pixel at the box centre
    frame = _frame(values, spacing=(0.5, 0.25))
    region = np.zeros((120, 200), bool)
    region[56:65, 84:117] = True  # 9 px x 33 px = 4.5 mm x 8.25 mm, centre (60, 100)
    out = NoduleCropd("image", margin_mm=2.0, size=33)({"image": frame, "roi_mask": region})
    crop = out["image"]
    assert crop.shape == (3, 33, 33) and out["crop_side_mm"] == pytest.approx(8.25 + 4.0)
    torch.testing.assert_close(crop[0], crop[2])  # grey replicated
    np.testing.assert_array_equal(np.argwhere(crop[0].numpy() == crop[0].max())[0], (16, 16))
    # the crop's affine maps its pixels into the frame's world: the centre pixel lands on the box centre
    centre_mm = (np.asarray(crop.affine) @ np.array([16.0, 16.0, 1.0]))[:2]
    np.testing.assert_allclose(centre_mm, (60 * 0.5, 100 * 0.25), atol=1e-9)
    corner_mm = (np.asarray(crop.affine) @ np.array([-0.5, -0.5, 1.0]))[:2]
    np.testing.assert_allclose(centre_mm - corner_mm, (12.25 / 2, 12.25 / 2), atol=1e-9)  # square in mm


def test_crop_outside_the_frame_is_black_and_rgb_is_kept():
    values = np.full((3, 40, 40), 100.0, np.float32)
    values[0] = 200.0
    frame = MetaTensor(torch.from_numpy(values), affine=torch.eye(3, dtype=torch.float64),
                       meta={"spacing_source": "pixel_spacing"})
    region = np.zeros((40, 40), bool)
    region[0:4, 0:4] = True  # in the corner: half the crop lies outside the frame
    crop = NoduleCropd("image", margin_mm=4.0, size=12)({"image": frame, "roi_mask": region})["image"]
    assert float(crop[0, 0, 0]) == 0.0 and float(crop[0, -1, -1]) == pytest.approx(200.0)
    assert float(crop[1, -1, -1]) == pytest.approx(100.0)


def test_random_crop_jitters_within_its_bounds():
    values = np.zeros((80, 80), np.float32)
    frame = _frame(values, spacing=(0.5, 0.5))
    region = np.zeros((80, 80), bool)
    region[30:50, 30:50] = True
    crop = RandNoduleCropd("image", margin_mm=2.0, size=16, max_shift_mm=1.0, zoom_range=(0.9, 1.1))
    crop.set_random_state(0)
    sides = [crop({"image": frame, "roi_mask": region})["crop_side_mm"] for _ in range(20)]
    assert min(sides) >= 14.0 * 0.9 - 1e-9 and max(sides) <= 14.0 * 1.1 + 1e-9 and len(set(sides)) > 1


def test_scalars_measure_the_roi_and_encode_fields_with_nan_for_missing():
    values = np.full((60, 60), 120.0, np.float32)
    values[20:30, 25:45] = 40.0  # a darker 10 x 20 px nodule: 5 mm wide, 5 mm deep at (0.5, 0.25) mm
    frame = _frame(values, spacing=(0.5, 0.25))
    schema = thyroid_config("inference.json").get_parsed_content("clinical_schema")
    roi = NoduleRoid("roi")({"image": frame, "roi": [[20, 25], [29, 44]]})["roi_mask"]
    assert roi.sum() == 200
    transform = NoduleScalarsd("image", ("aspect_ratio", "echogenicity_contrast", "age", "sex"), schema)
    out = transform({"image": frame, "roi_mask": roi, "age": 34, "sex": "male"})
    np.testing.assert_allclose(out["scalars"], [1.0, 80.0, 34.0, 1.0], rtol=1e-6)
    assert out["nodule_morphology"]["width_mm"] == pytest.approx(5.0)
    missing = transform({"image": frame, "roi_mask": roi, "sex": "unknown"})["scalars"]
    assert math.isnan(missing[2]) and math.isnan(missing[3]) and missing[0] == pytest.approx(1.0)
    with pytest.raises(InvalidRequest, match="age 130 is outside"):
        transform({"image": frame, "roi_mask": roi, "age": 130})
    with pytest.raises(ValueError, match="neither a morphology scalar"):
        NoduleScalarsd("image", ("nodule_volume_ml",), schema)


def test_a_lobe_mask_adds_the_capsule_distance_and_lobe_position_else_they_are_missing():
    values = np.full((60, 60), 120.0, np.float32)
    frame = _frame(values, spacing=(0.5, 0.25))
    roi = NoduleRoid("roi")({"image": frame, "roi": [[20, 25], [29, 44]]})["roi_mask"]
    lobe = np.zeros((3, 60, 60), np.float32)  # read as an RGB image: any channel above 0 is the lobe
    lobe[1, 10:50, 15:55] = 255.0
    transform = NoduleScalarsd("image", ("capsule_distance_mm", "lobe_position", "aspect_ratio"))
    out = transform({"image": frame, "roi_mask": roi, "lobe_mask": lobe})
    # 10 lobe pixels of 0.25 mm between the ROI and the lobe's edge along j (along i: 10 of 0.5 mm)
    assert out["scalars"][0] == pytest.approx(2.5)
    assert out["scalars"][1] == pytest.approx(lobe_position(roi, lobe[1] > 0, (0.5, 0.25)), abs=1e-6)
    assert 0.3 < out["scalars"][1] < 0.45  # the ROI lies in the lobe's middle third, towards the left pole
    shown = morphology_result(out["nodule_morphology"])
    assert shown["capsule_within_2_5_mm"] is True and shown["lobe_third"] == "middle"
    without = transform({"image": frame, "roi_mask": roi, "lobe_mask": None})
    assert np.isnan(without["scalars"][:2]).all() and without["scalars"][2] == pytest.approx(1.0)
    assert morphology_result(without["nodule_morphology"])["capsule_distance_mm"] is None
    elsewhere = np.zeros((60, 60), np.float32)
    elsewhere[40:55, 40:55] = 1.0
    with pytest.raises(InvalidRequest, match="does not overlap the thyroid lobe mask"):
        transform({"image": frame, "roi_mask": roi, "lobe_mask": elsewhere[None]})


def test_uncalibrated_frames_are_refused_where_mm_are_needed():
    frame = MetaTensor(torch.zeros(1, 30, 30), affine=torch.eye(3, dtype=torch.float64), meta={"spacing_source": "none"})
    region = np.zeros((30, 30), bool)
    region[10:20, 10:20] = True
    with pytest.raises(InvalidRequest, match="crop margin.*pixel_size_mm") as caught:
        NoduleCropd("image")({"image": frame, "roi_mask": region})
    assert caught.value.status_code == 422
    out = NoduleCropd("image", size=8)({"image": frame, "roi_mask": region, "spacing_mm": (0.1, 0.1)})
    assert out["crop_side_mm"] == pytest.approx(1.0 + 8.0)


def test_crop_geometry_of_an_empty_roi_is_refused():
    with pytest.raises(InvalidRequest, match="empty"):
        crop_geometry(np.zeros((5, 5), bool), (1.0, 1.0), 1.0, 8)


# -- the predictor on a generated study -------------------------------------------------------------------
def test_box_click_and_mask_give_one_probability_each(predictor, study):
    frame, sidecar, case = _case(study)
    mask = np.asarray(read_frame(study.parent / case["nodule_mask"]))[0] > 0
    box = Roi(box=tuple(tuple(c) for c in sidecar["roi"]))
    clicks = Roi(points=[(1.0, 1.0), tuple(float(v) for v in sidecar["center_ijk"])])  # of two clicks, the last
    results = {}
    for name, roi in (("box", box), ("click", clicks), ("mask", Roi(mask=mask))):
        prediction = predictor.predict({"image": frame}, roi, {**sidecar, "click_radius_mm": 2.0})
        result = prediction.result
        results[name] = result
        assert 0.0 <= result["llnm_probability"] <= 1.0 and len(result["fold_probabilities"]) == 2
        assert result["prediction"] in ("no LLNM", "LLNM") and result["model_version"] == "0.2.0"
        assert result["roi"]["prompt"] == name
        assert result["frame"]["spacing_source"] == "ultrasound_region" and result["frame"]["frame_choice"] == "only"
        assert result["frame"]["spacing_mm"] == list(TINY_SPACING)
        assert set(result["scalars"]) == {"aspect_ratio", "echogenicity_contrast", "capsule_distance_mm",
                                          "lobe_position", "age", "sex"}
        assert result["clinical_fields"] == {"age": float(sidecar["age"]), "sex": sidecar["sex"]}
        label = prediction.label
        assert label.shape == TINY_SHAPE and set(np.unique(label)) <= {0, 1, 2}
        summary = next(n for n, v in prediction.label_names.items() if v == 1)
        assert summary.startswith(f"LLNM {result['llnm_probability']:.2f}")
    assert results["click"]["roi"]["click_radius_mm"] == 2.0
    np.testing.assert_allclose(results["click"]["roi"]["center_ijk"], sidecar["center_ijk"])
    assert results["mask"]["roi"]["area_mm2"] == pytest.approx(mask.sum() * TINY_SPACING[0] * TINY_SPACING[1])
    # the box's morphology is that of the inclusive box
    (i0, j0), (i1, j1) = sidecar["roi"]
    assert results["box"]["morphology"]["width_mm"] == pytest.approx((i1 - i0 + 1) * TINY_SPACING[0])


def test_the_overlay_is_the_most_attended_part_of_the_roi(predictor, study):
    frame, sidecar, _ = _case(study, 1)
    prediction = predictor.predict({"image": frame}, Roi(box=tuple(tuple(c) for c in sidecar["roi"])), sidecar)
    result, label = prediction.result, prediction.label
    (i0, j0), (i1, j1) = sidecar["roi"]
    inside = np.zeros(TINY_SHAPE, bool)
    inside[i0 : i1 + 1, j0 : j1 + 1] = True
    assert (label[~inside] == 0).all() and (label[inside] > 0).all() and (label == 1).any()
    attention = result["attention"]
    assert attention["grid"] == [8, 8] and attention["method"].startswith("attention rollout")
    assert attention["patch_size_mm"] == pytest.approx(result["crop"]["side_mm"] / 8, abs=1e-3)
    assert result["grad_cam_pp"]["method"].startswith("Grad-CAM++") and result["grad_cam_pp"]["grid"] == [8, 8]
    assert result["overlay"]["method"] == "attention_rollout"


def test_a_grad_cam_pp_overlay_shows_where_its_map_reaches_the_threshold(predictor, study):
    frame, sidecar, _ = _case(study, 1)
    roi = Roi(box=tuple(tuple(c) for c in sidecar["roi"]))
    cam_predictor = predictor.variant(predictor.ensemble, overlay_method="grad_cam_pp")
    prediction = cam_predictor.predict({"image": frame}, roi, sidecar)
    assert prediction.result["overlay"]["method"] == "grad_cam_pp"
    context = cam_predictor.locate({"image": frame}, roi, sidecar, None)
    heat = cam_predictor.grad_cam_pp(cam_predictor.ensemble.members(None), cam_predictor.model_inputs(context))
    on_frame, _ = cam_predictor.heat_on_frame(heat, context.extras["crop"], frame)
    expected = context.extras["region"] & (on_frame >= cam_predictor.attention_threshold)
    assert expected.any() and expected.sum() < context.extras["region"].sum()
    np.testing.assert_array_equal(prediction.label == 1, expected)
    with pytest.raises(ValueError, match="overlay_method must be one of"):
        predictor.variant(predictor.ensemble, overlay_method="saliency")


def test_grad_cam_pp_weights_channels_by_their_positive_gradients():
    activations = torch.zeros(4, 3)
    activations[2, 0] = 5.0  # patch 2 carries channel 0
    activations[1, 1] = 9.0  # patch 1 carries channel 1, which lowers the score
    gradients = torch.zeros(4, 3)
    gradients[:, 0], gradients[:, 1] = 0.5, -2.0
    cam = grad_cam_pp_map(activations, gradients)
    assert int(cam.argmax()) == 2 and cam[1] == 0 and cam[0] == 0
    assert grad_cam_pp_map(activations, -gradients.abs()).abs().sum() == 0  # nothing raises the score


def test_grad_cam_pp_is_the_papers_closed_form():
    generator = torch.Generator().manual_seed(0)
    a, g = torch.rand(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    expected = torch.zeros(6)
    for c in range(5):
        total = float(a[:, c].sum())
        alphas = [float(g[p, c] ** 2 / (2 * g[p, c] ** 2 + total * g[p, c] ** 3)) for p in range(6)]
        weight = sum(alpha * max(float(g[p, c]), 0.0) for p, alpha in enumerate(alphas))
        expected += weight * a[:, c]
    torch.testing.assert_close(grad_cam_pp_map(a, g), torch.relu(expected))


def test_a_request_predicts_alone_while_its_explanations_swap_embeddings(predictor, study, monkeypatch):
    """Two requests at once would see each other's swapped-in embeddings (``infer_workers`` > 1)."""
    frame, sidecar, _ = _case(study, 0)
    member = predictor.ensemble.members(None)[0]
    original, held = member.embed_image, []

    def embed_image(image):
        held.append(predictor._one_at_a_time.locked())
        return original(image)

    monkeypatch.setattr(member, "embed_image", embed_image)
    predictor.predict({"image": frame}, Roi(box=tuple(tuple(c) for c in sidecar["roi"])), sidecar)
    assert held and all(held)


def test_explanations_add_up_to_the_log_odds_they_explain(predictor, study):
    frame, sidecar, _ = _case(study, 2)
    roi = Roi(box=tuple(tuple(c) for c in sidecar["roi"]))
    result = predictor.predict({"image": frame}, roi, sidecar, fold=0).result
    member = predictor.ensemble.members(0)[0]
    context = predictor.locate({"image": frame}, roi, sidecar, 0)
    image, ids, mask, scalars = predictor.model_inputs(context)
    with torch.no_grad():
        full = float(member(image, ids, mask, scalars)[0, 0])
        no_scalars = float(member(image, ids, mask, torch.full_like(scalars, float("nan")))[0, 0])
    assert math.log(result["llnm_probability"] / (1 - result["llnm_probability"])) == pytest.approx(full, abs=1e-4)
    contributions = sum(c["log_odds"] for c in result["scalar_contributions"].values())
    assert contributions == pytest.approx(full - no_scalars, abs=0.02 + 0.05 * abs(full - no_scalars))
    words = result["report_attributions"]
    assert len(words["top_tokens"]) == 8 and all(any(ch.isalnum() for ch in w["token"]) for w in words["top_tokens"])
    assert sum(s["log_odds"] for s in words["sentences"]) == pytest.approx(
        words["total_log_odds"] - words["special_tokens_log_odds"], abs=1e-3)
    assert result["scalar_contributions"]["sex"]["value"] == sidecar["sex"]


def test_refusals_name_the_problem(predictor, study, tmp_path):
    frame, sidecar, _ = _case(study)
    box = Roi(box=tuple(tuple(c) for c in sidecar["roi"]))
    with pytest.raises(InvalidRequest, match="outside image 96x88") as caught:
        predictor.predict({"image": frame}, Roi(points=[(120.0, 10.0)]), sidecar)
    assert caught.value.status_code == 422
    for report, message in ((None, "report is missing"), ("  ", "report is empty"), (42, "report must be text")):
        with pytest.raises(InvalidRequest, match=message):
            predictor.predict({"image": frame}, box, {**sidecar, "report": report})
    with pytest.raises(InvalidRequest, match="age 130 is outside 0-120 years"):
        predictor.predict({"image": frame}, box, {**sidecar, "age": 130})
    with pytest.raises(InvalidRequest, match="click_radius_mm 90 is outside"):
        predictor.predict({"image": frame}, Roi(points=[tuple(sidecar["center_ijk"])]), {**sidecar, "click_radius_mm": 90})
    with pytest.raises(InvalidRequest, match="ROI mask is 10x10 but the frame is 96x88"):
        predictor.predict({"image": frame}, Roi(mask=np.ones((10, 10), np.uint8)), sidecar)

    # the same frame exported as PNG: no calibration
    png = tmp_path / "export.png"
    Image.fromarray(np.asarray(frame[0]).T.astype(np.uint8)).save(png)
    exported = read_frame(png)
    with pytest.raises(InvalidRequest, match="click's radius.*no pixel calibration") as caught:
        predictor.predict({"image": exported}, Roi(points=[tuple(sidecar["center_ijk"])]), sidecar)
    assert caught.value.status_code == 422
    with pytest.raises(InvalidRequest, match="crop margin.*pixel_size_mm"):
        predictor.predict({"image": exported}, box, sidecar)
    with pytest.raises(InvalidRequest, match="pixel_size_mm 'abc'"):
        predictor.predict({"image": exported}, box, {**sidecar, "pixel_size_mm": "abc"})
    given = predictor.predict({"image": exported}, box, {**sidecar, "pixel_size_mm": "0.5,0.45"}).result
    calibrated = predictor.predict({"image": frame}, box, sidecar).result
    assert given["frame"]["spacing_used"] == "pixel_size_mm" and given["frame"]["spacing_source"] == "none"
    assert given["llnm_probability"] == pytest.approx(calibrated["llnm_probability"], abs=1e-5)


def test_long_reports_are_truncated_with_a_warning_and_missing_fields_are_missing(predictor, study):
    frame, sidecar, _ = _case(study)
    box = Roi(box=tuple(tuple(c) for c in sidecar["roi"]))
    long_report = " ".join([sidecar["report"]] * 3)
    result = predictor.predict({"image": frame}, box, {**sidecar, "report": long_report, "age": None,
                                                       "sex": "unknown"}).result
    assert result["report_tokens"]["truncated"] and result["report_tokens"]["count"] > 128
    assert any("model reads the first 128" in w for w in result["warnings"])
    assert result["scalars"]["age"] is None and result["scalars"]["sex"] is None
    assert result["scalar_contributions"]["age"]["log_odds"] == 0.0


def test_options_and_inputs_follow_the_variant(predictor, ckpt):
    assert predictor.inputs.primary.reader == "frame" and predictor.inputs.dimension == 2
    assert list(predictor.inputs.texts) == ["report"] and predictor.inputs.fields.names == ["age", "sex"]
    assert set(predictor.config_options) == {"report", "age", "sex", "click_radius_mm", "pixel_size_mm"}
    members = predictor.ensemble.models
    assert members[1].text_tower is members[0].text_tower  # one frozen encoder in memory, not one per fold
    image_only = thyroid_config("inference.json", "image_only.json", ckpt_dir=str(ckpt),
                                device="cpu").get_parsed_content("predictor")
    assert not image_only.uses_text and not image_only.scalar_names and image_only.uses_image
    assert list(image_only.inputs.texts) == [] and image_only.inputs.fields is None
    assert set(image_only.config_options) == {"click_radius_mm", "pixel_size_mm"}
    assert image_only.variant_name == VARIANT_NAMES["image_only"]
    assert batch_keys("fusion") == {"input_ids": "report", "scalars": "scalars"} and batch_keys("image_only") == {}


def test_text_only_variant_draws_the_roi(predictor, ckpt, study):
    args = thyroid_config("inference.json").get_parsed_content("network_args")
    ensemble = Ensemble([str(ckpt / "text_only" / f"fold{k}" / "model.pt") for k in (0, 1)],
                        network=build_network(args, "text_only"), aggregation="mean")
    text_only = predictor.variant(ensemble, VARIANT_NAMES["text_only"], integration_steps=4)
    frame, sidecar, _ = _case(study)
    prediction = text_only.predict({"image": frame}, Roi(box=tuple(tuple(c) for c in sidecar["roi"])), sidecar)
    assert "attention" not in prediction.result and "report_attributions" in prediction.result
    assert prediction.label.sum() == np.prod(np.subtract(sidecar["roi"][1], sidecar["roi"][0]) + 1)


# -- network helpers ------------------------------------------------------------------------------------
def test_memoised_text_encoder_gives_the_same_logits_and_runs_once_per_report():
    args = {**thyroid_config("inference.json").get_parsed_content("network_args"), "hidden_size": 32, "mlp_dim": 64}
    torch.manual_seed(0)
    plain = build_network(args).eval()
    memoised = memoize_frozen_text_encoder(build_network(args).eval())
    memoised.load_state_dict(plain.state_dict())
    reports = ["A solid hypoechoic nodule. No capsular contact.", "Microcalcifications are present.",
               "No suspicious central compartment lymph nodes."]
    image = torch.rand(3, 3, 128, 128)
    scalars = torch.tensor([[0.8, 30, 1.0, 0.3, 40, 0], [1.1, 12, float("nan"), float("nan"), 60, 1], [0.9, 25, 4.0, 0.7, 33, 0]])
    calls = []
    original = memoised.text_tower.encoder.forward
    memoised.text_tower.encoder.forward = lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw)
    with torch.no_grad():
        expected = plain(image, reports, None, scalars)
        first = memoised(image, reports, None, scalars)
        again = memoised(image[[2, 0]], [reports[2], reports[0]], None, scalars[[2, 0]])
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, expected[[2, 0]], atol=1e-5, rtol=1e-4)
    assert len(memoised.text_tower.encoder.memoized_features) == 3
    unfrozen = build_network({**args, "tuning": "full"})
    with pytest.raises(ValueError, match="frozen"):
        memoize_frozen_text_encoder(unfrozen)
    assert plain.state_dict().keys() == memoised.state_dict().keys()


def test_half_precision_checkpoints_hold_only_trained_weights_and_load(tmp_path):
    args = thyroid_config("inference.json").get_parsed_content("network_args")
    network = build_network(args)
    full, half = TrainableWeights(network).state_dict(), HalfPrecisionWeights(network).state_dict()
    assert full.keys() == half.keys() and not any(k.startswith("text_tower.encoder.encoder") for k in half)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    path = tmp_path / "fold0" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": half}, path)
    assert path.stat().st_size < 1_000_000
    member = Ensemble([str(path)], network=build_network(args), aggregation="mean").models[0]
    torch.testing.assert_close(member.head.weight, network.head.weight, atol=1e-3, rtol=1e-3)


def test_attention_rollout_of_identity_attention_is_uniform_over_valid_tokens():
    identity = torch.eye(5).expand(1, 2, 5, 5)
    relevance = attention_rollout([identity, identity], torch.tensor([[1, 1, 1, 0, 1]]))
    torch.testing.assert_close(relevance, torch.tensor([[0.25, 0.25, 0.25, 0.0, 0.25]]))
    uniform = torch.full((1, 1, 4, 4), 0.25)
    assert float(attention_rollout([uniform])[0].sum()) == pytest.approx(1.0)


def test_summary_words_carry_their_negation():
    words = [{"token": t} for t in "no capsular contact . the margin is irregular".split()]
    assert [_negated(words, i) for i in (2, 4, 7)] == ["no contact", "the", "irregular"]


def test_word_pieces_are_joined_into_words():
    words = word_attributions(["[CLS]", "micro", "##cal", "##cifications", "present", "[SEP]"],
                              [9.0, 0.1, 0.2, 0.3, -0.5, 9.0], skip=["[CLS]", "[SEP]"])
    assert [(w["token"], w["position"]) for w in words] == [("microcalcifications", 0), ("present", 1)]
    assert words[0]["log_odds"] == pytest.approx(0.6)


# -- thresholds chosen on the training folds ---------------------------------------------------------------


def test_training_drops_scalar_groups_together_so_the_missing_embeddings_learn():
    names = ("aspect_ratio", "capsule_distance_mm", "lobe_position", "age")
    values = np.array([0.9, 1.5, 0.4, 50.0], np.float32)
    groups = [["capsule_distance_mm", "lobe_position"], ["age"]]
    always = RandMissingScalarsd("scalars", names, groups, prob=1.0)
    assert np.isnan(always({"scalars": values})["scalars"][1:]).all()
    assert always({"scalars": values})["scalars"][0] == pytest.approx(0.9) and not np.isnan(values).any()
    sometimes = RandMissingScalarsd("scalars", names, groups, prob=0.3)
    sometimes.set_random_state(0)
    drawn = np.stack([sometimes({"scalars": values})["scalars"] for _ in range(400)])
    missing = np.isnan(drawn)
    assert (missing[:, 1] == missing[:, 2]).all() and not missing[:, 0].any()  # one lobe mask: both or neither
    assert 0.22 < missing[:, 1].mean() < 0.38 and 0.22 < missing[:, 3].mean() < 0.38
    with pytest.raises(ValueError, match=r"groups name \['sex'\]"):
        RandMissingScalarsd("scalars", names, [["sex"]])
