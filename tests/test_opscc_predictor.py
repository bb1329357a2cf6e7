"""SMuRF predictor on tiny random fold models, a tiny CT with its masks and a tiny pyramidal slide: the fusion
answer with a risk group, the radiology-only answer without a slide, the two-valued region label, bad
inputs refused with a message naming the problem, and a value-1 overlay inside the regions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.ensemble import Ensemble, fold_checkpoints
from oncofusion.models.opscc_smurf.network import SmurfNet
from oncofusion.models.opscc_smurf.predictor import (
    NO_CUTOFFS,
    RADIOLOGY,
    SmurfPredictor,
    load_risk_cutoffs,
    risk_group,
)
from oncofusion.models.opscc_smurf.subvolumes import subvolume_transforms
from oncofusion.networks.region_encoders import region_encoder

try:
    from sample_data.slides import write_pyramid
except ImportError:
    from tests.slides import write_pyramid

SHAPE = (24, 24, 24)
TUMOR, NODES = ((8, 8, 8), (12, 12, 13)), ((15, 14, 10), (18, 18, 14))
RING_MM = 2.0
SLIDE_GRID = {"region_size": 64, "target_mpp": 0.5, "grid_size": 8, "thumbnail_size": 256}
FUSION_CUTOFFS = [-100.0, 100.0]  # every risk of these tiny networks is intermediate


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ensemble(folder: Path, modalities, folds: int) -> Ensemble:
    for fold in range(folds):
        torch.manual_seed(fold + 10 * len(modalities))
        (folder / f"fold{fold}").mkdir(parents=True)
        torch.save(SmurfNet(modalities=modalities).state_dict(), folder / f"fold{fold}" / "model.pt")
    return Ensemble(fold_checkpoints(folder), network=SmurfNet(modalities=modalities), aggregation="mean")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import skimage.data as ski_data

    root = tmp_path_factory.mktemp("opscc")
    base = np.full((256, 512, 3), 255, np.uint8)
    base[64:192, 64:256] = ski_data.immunohistochemistry()[:128, :192]
    base[96:224, 320:448] = ski_data.immunohistochemistry()[200:328, 100:228]
    slide = write_pyramid(root / "patient1_he.tiff", base, levels=2, mpp=0.5)
    not_a_slide = root / "notes.svs"
    not_a_slide.write_text("not a slide")
    cutoffs = root / "risk_groups.json"
    cutoffs.write_text(json.dumps({"fusion": {"thresholds": FUSION_CUTOFFS}}))
    return {"root": root, "slide": slide, "not_a_slide": not_a_slide, "cutoffs": cutoffs}


def build(files, **changes) -> SmurfPredictor:
    root = files["root"]
    options = {
        "preprocessing": subvolume_transforms(False, roi_size=(16, 16), ring_mm=RING_MM, keep_inputs=True),
        "region_encoder": region_encoder("cnn", input_size=32, channels=(8, 8, 16, 16)),
        "slide_grid": SLIDE_GRID, "grid_cache_dir": root / "grids", "risk_cutoffs": files["cutoffs"],
        "integration_steps": 4, "top_fraction": 0.1, "explanations_dir": root / "explanations",
        **changes,
    }
    return SmurfPredictor(files["fusion"], files["radiology"], **options)


@pytest.fixture(scope="module")
def predictor(files) -> SmurfPredictor:
    root = files["root"]
    files["fusion"] = ensemble(root / "models" / "fusion", ("ct_tumor", "ct_nodes", "wsi"), 2)
    files["radiology"] = ensemble(root / "models" / "radiology", ("ct_tumor", "ct_nodes"), 2)
    return build(files)


def volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(np.diag([*spacing, 1.0])))


def box_mask(corners, value: int = 1) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    (lo, hi) = corners
    mask[tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))] = value
    return mask


def ct() -> MetaTensor:
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 80.0, SHAPE).astype(np.float32)
    array += 120.0 * (box_mask(TUMOR) + box_mask(NODES))
    return volume(array)


def images(**changes) -> dict:
    return {"image": ct(), "tumor_mask": volume(box_mask(TUMOR)), "node_mask": volume(box_mask(NODES)), **changes}


def near_regions() -> np.ndarray:
    """The regions' boxes grown by the ring (and one voxel for the 1 mm grid's sub-voxel shift)."""
    inside = np.zeros(SHAPE, bool)
    reach = int(RING_MM) + 1
    for lo, hi in (TUMOR, NODES):
        inside[tuple(slice(max(a - reach, 0), b + reach + 1) for a, b in zip(lo, hi, strict=True))] = True
    return inside


# -- answers ---------------------------------------------------------------------------------------------
def test_with_a_slide_the_fusion_model_answers_with_a_risk_group_and_explanations(predictor, files):
    prediction = predictor.predict(images(), None, {"slide": str(files["slide"]), "case_id": "p/1"})
    result = prediction.result
    assert result["variant"] == "fusion"
    assert result["risk_group"] == "intermediate" and result["risk_cutoffs"] == FUSION_CUTOFFS
    assert result["risk_score"] == pytest.approx(np.mean(result["fold_risk_scores"]), abs=1e-3)
    assert len(result["fold_risk_scores"]) == 2 and 0 < result["grade_probability"] < 1
    assert result["slide"]["name"] == "patient1_he.tiff" and result["slide"]["fragments"] >= 1
    assert result["regions"]["nodes_present"] and result["regions"]["from"] == "tumor_mask + node_mask images"
    assert result["summary"] == (f"DFS risk intermediate ({result['risk_score']:.2f}), "
                                 f"high grade p={result['grade_probability']:.2f}")
    explanation = result["explanation"]
    assert set(explanation["contributions"]) == {"ct_tumor", "ct_nodes", "wsi"}
    assert explanation["log_hazard"] == pytest.approx(result["risk_score"], abs=1e-3)
    png = Path(explanation["slide_heatmap_png"])
    assert png.parent == files["root"] / "explanations" and "/" not in png.name.replace("p_1", "")
    assert Image.open(png).size[0] > 0
    # the overlay: value 1 only, on the CT grid, inside the regions' boxes
    assert prediction.label.shape == SHAPE and set(np.unique(prediction.label)) == {0, 1}
    assert not prediction.label[~near_regions()].any()
    assert prediction.label.sum() == explanation["ct_overlay"]["voxels_ct"] > 0
    assert prediction.label_names == {result["summary"]: 1}


def test_without_a_slide_the_radiology_only_model_answers_and_says_so(predictor, files):
    prediction = predictor.predict(images(), None, {"slide": ""})
    result = prediction.result
    assert result["variant"] == RADIOLOGY and result["slide"] is None
    assert result["risk_group"] == NO_CUTOFFS  # the cut-offs file has the fusion model's only
    assert result["summary"].endswith("radiology only: no slide") and NO_CUTOFFS in result["summary"]
    assert any("no slide" in w for w in result["warnings"])
    assert set(result["explanation"]["contributions"]) == {"ct_tumor", "ct_nodes"}
    assert "slide_heatmap_png" not in result["explanation"]
    assert set(np.unique(prediction.label)) == {0, 1} and not prediction.label[~near_regions()].any()
    # the radiology-only ensemble's own members answered
    with torch.no_grad():
        inputs = predictor.model_inputs(predictor.locate(images(), None, {}, None))
        expected = np.mean([float(m(*inputs)[0, 1]) for m in files["radiology"].models])
    assert result["risk_score"] == pytest.approx(expected, abs=1e-3)


def test_a_two_valued_label_gives_the_same_answer_as_two_masks(files, predictor):
    predictor = build(files, explain=False)  # the regions matter here, not the explanations
    two_masks = predictor.predict(images(), None, {}).result
    label = box_mask(TUMOR, 1) + box_mask(NODES, 2)
    from_image = predictor.predict({"image": ct(), "region_label": volume(label)}, None, {}).result
    from_request = predictor.predict({"image": ct()}, Roi(mask=label), {}).result
    assert from_image["regions"]["from"] == "region_label image" and from_request["regions"]["from"] == "request label"
    for result in (from_image, from_request):
        assert result["risk_score"] == pytest.approx(two_masks["risk_score"], abs=1e-5)
        assert result["regions"]["tumor_box_1mm"] == two_masks["regions"]["tumor_box_1mm"]
        assert result["regions"]["nodes_present"]
    tumor_only = predictor.predict({"image": ct()}, Roi(mask=box_mask(TUMOR)), {}).result
    assert not tumor_only["regions"]["nodes_present"] and any("N0" in w for w in tumor_only["warnings"])


def test_the_studys_saved_label_is_read_when_nothing_else_names_the_regions(files):
    predictor = build(files, explain=False)
    label = volume(box_mask(TUMOR, 1) + box_mask(NODES, 2))
    two_masks = predictor.predict(images(), None, {}).result
    saved = predictor.predict({"image": ct(), "saved_label": label}, None, {}).result
    assert saved["regions"]["from"] == "saved 'final' label" and saved["regions"]["nodes_present"]
    assert saved["risk_score"] == pytest.approx(two_masks["risk_score"], abs=1e-5)
    # a region input of the request or the sidecar comes first; the saved label is the last resort
    only_tumor = volume(box_mask(TUMOR))
    masks_first = predictor.predict({"image": ct(), "tumor_mask": only_tumor, "saved_label": label}, None, {}).result
    assert masks_first["regions"]["from"] == "tumor_mask + node_mask images"
    assert not masks_first["regions"]["nodes_present"]
    wrong = volume(box_mask(TUMOR, 1) + box_mask(NODES, 4))
    assert "saved 'final' label" in refused(predictor, {"image": ct(), "saved_label": wrong})


def test_without_explanations_the_regions_are_drawn(files, predictor):
    quiet = build(files, explain=False)
    prediction = quiet.predict(images(), None, {})
    assert "explanation" not in prediction.result
    np.testing.assert_array_equal(prediction.label, ((box_mask(TUMOR) + box_mask(NODES)) > 0).astype(np.uint8))


def test_warm_up_runs(predictor):
    assert predictor.warm_up()


# -- bad input -------------------------------------------------------------------------------------------
def refused(predictor, images_, fields=None, roi=None) -> str:
    with pytest.raises(InvalidRequest) as raised:
        predictor.predict(images_, roi, fields or {})
    return str(raised.value)


def test_missing_or_unreadable_slide_is_refused_naming_it(predictor, files):
    assert "slide 'absent_he.svs' not found" in refused(predictor, images(), {"slide": "absent_he.svs"})
    message = refused(predictor, images(), {"slide": str(files["not_a_slide"])})
    assert str(files["not_a_slide"]) in message and "OpenSlide" in message
    assert "slide must be a path" in refused(predictor, images(), {"slide": 3})


def test_slide_outside_the_slide_folder_is_refused(files, predictor):
    confined = build(files, slide_dir=files["root"] / "explanations")
    assert "outside the slide folder" in refused(confined, images(), {"slide": str(files["slide"])})


def test_empty_tumor_mask_is_refused(predictor):
    message = refused(predictor, images(tumor_mask=volume(np.zeros(SHAPE, np.uint8))))
    assert "tumor mask 'tumor_mask' is empty" in message


def test_masks_on_another_grid_are_refused(predictor):
    shifted = volume(box_mask(NODES), spacing=(1.0, 1.0, 2.0))
    assert "mask 'node_mask' is not on the CT's grid" in refused(predictor, images(node_mask=shifted))
    small = volume(np.ones((10, 10, 10), np.uint8))
    assert "mask 'tumor_mask' is not on the CT's grid" in refused(predictor, images(tumor_mask=small))


def test_label_with_other_values_and_no_mask_at_all_are_refused(predictor):
    label = box_mask(TUMOR, 1) + box_mask(NODES, 3)
    assert "values [3]" in refused(predictor, {"image": ct(), "region_label": volume(label)})
    assert "no tumor mask" in refused(predictor, {"image": ct()})
    assert "missing image input image" in refused(predictor, {"tumor_mask": volume(box_mask(TUMOR))})


# -- configuration ---------------------------------------------------------------------------------------
def test_risk_groups_and_cut_off_files(tmp_path):
    assert [risk_group(r, (0.0, 1.0)) for r in (-1.0, 0.0, 0.5, 1.0, 1.5)] == [
        "low", "low", "intermediate", "intermediate", "high"]
    assert risk_group(5.0, None) == NO_CUTOFFS
    assert load_risk_cutoffs([0.1, 0.2]) == {"fusion": (0.1, 0.2)}
    assert load_risk_cutoffs({"fusion": [0, 1], "radiology": {"thresholds": [2, 3]}}) == {
        "fusion": (0.0, 1.0), RADIOLOGY: (2.0, 3.0)}
    assert load_risk_cutoffs(tmp_path / "absent.json") == {}
    with pytest.raises(ValueError, match="ascending"):
        load_risk_cutoffs([1.0, 0.0])
    with pytest.raises(ValueError, match="unknown variant"):
        load_risk_cutoffs({"pathology": [0, 1]})


def test_ensembles_of_the_wrong_variant_are_refused(files, predictor):
    with pytest.raises(ValueError, match="fusion ensemble must hold"):
        SmurfPredictor(files["radiology"], files["radiology"])
    with pytest.raises(ValueError, match="slide_grid has unknown"):
        build(files, slide_grid={"grid": 8})
