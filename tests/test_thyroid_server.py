"""The thyroid bundle served by a real MONAI Label server on loopback, on the real ultrasound DICOM files shipped
with pydicom-data (``sample_data/real_ultrasound.py``) dropped into a local datastore (and one stored in an Orthanc PACS): the 2D deepgrow task in
/info, Slicer's ``[i, j, k]`` clicks and flat boxes, a cine's frame, the report from the study's sidecar,
and the bad inputs a clinician or a script sends, each answered 4xx naming what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from oncofusion.serving.launcher import LocalOrthanc, LocalServer
from sample_data.real_ultrasound import REAL_ULTRASOUND, link_into, shipped_ultrasound
from tests.server_client import answer_of
from tests.server_client import infer as slicer_infer

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
MODEL = "thyroid_llnm"
START_TIMEOUT_S = 240
SIDECAR = {"bundle": MODEL, "report": "Solid hypoechoic nodule with irregular margin and microcalcifications.",
           "age": 38, "sex": "female"}
FORM = {"report": "Solid hypoechoic nodule, smooth margin.", "age": 52, "sex": "male"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("thyroid_server")
    studies = root / "studies"
    (studies / "sidecars").mkdir(parents=True)
    link_into(studies)
    (studies / "sidecars" / "us_real_palette.json").write_text(json.dumps(SIDECAR))
    lobe = np.zeros((600, 800), np.uint8)  # rows = the frame's 600 j, columns its 800 i
    lobe[160:260, 150:650] = 255  # a lobe around the box [260-340, 170-250]: 9 lobe rows below it
    Image.fromarray(lobe).save(studies / "us_real_palette_lobe.png")
    Image.fromarray(lobe[:300, :400]).save(studies / "wrong_grid_lobe.png")
    conf = {"bundles": str(REPO / "bundles"), "models": MODEL, "runs": str(root / "runs"), "device": "cpu"}
    with LocalServer(studies, root, conf, start_timeout_s=START_TIMEOUT_S) as live:
        yield SimpleNamespace(url=live.url, studies=studies)


def infer(url: str, image: str, params: dict, model: str = MODEL):
    return slicer_infer(url, model, image, params)


def test_info_declares_a_2d_click_model_with_report_demographics_and_frame(server):
    model = requests.get(f"{server.url}/info/", timeout=60).json()["models"][MODEL]
    assert model["type"] == "deepgrow" and model["dimension"] == 2
    assert model["labels"] == ["nodule"]
    assert {"report", "age", "sex", "frame", "pixel_size_mm", "click_radius_mm"} <= set(model["config"])


def test_dicom_ultrasound_files_dropped_into_the_datastore_are_listed(server):
    listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert set(REAL_ULTRASOUND) <= set(listed["objects"])


def test_a_slicer_box_on_a_real_ultrasound_answers_a_probability_and_an_overlay(server, tmp_path):
    """Slicer's flat box ``[i0, i1, j0, j1, k0, k1]`` on the single frame (k = 0); the report, age and sex
    come from the study's sidecar because the form is blank."""
    box = [260, 340, 170, 250, 0, 0]
    result, label = answer_of(infer(server.url, "us_real_palette",
                                    {"roi": box, "report": "", "age": "", "sex": "", "slice": 0}), tmp_path)
    assert 0.0 < result["llnm_probability"] < 1.0
    assert result["prediction"] in ("LLNM", "no LLNM")
    assert result["roi"]["prompt"] == "box"
    assert result["frame"]["spacing_source"] == "ultrasound_region"
    assert {k: result["field_sources"][k] for k in ("report", "age", "sex")} == dict.fromkeys(
        ("report", "age", "sex"), "sidecar")
    assert result["clinical_fields"] == {"age": 38.0, "sex": "female"}
    assert label.shape[:2] == (800, 600)
    shown = np.argwhere(label.reshape(label.shape[:2]) == 1)
    assert len(shown), "the overlay shows no region"
    assert shown.min(0).tolist() >= [260, 170] and shown.max(0).tolist() <= [340, 250]  # inside the box


def referenced_frames(dataset) -> set[int]:
    """Every ReferencedFrameNumber in a dataset's nested sequences."""
    found = set()
    for element in dataset.iterall():
        if element.keyword == "ReferencedFrameNumber":
            found.update(int(v) for v in (element.value if element.VM > 1 else [element.value]))
    return found


def test_the_prediction_is_stored_beside_the_study_as_dicom_seg_and_sr(server, tmp_path):
    """A DICOM file in the local datastore gets its SEG + SR in a sub-folder (not listed as studies)."""
    import highdicom as hd

    result, label = answer_of(infer(server.url, "us_real_palette", {"roi": [260, 340, 170, 250, 0, 0], **FORM}),
                              tmp_path)
    stored = result["dicom"]
    assert stored["stored"] is True, stored
    assert stored["files"] == ["dicom_results/us_real_palette/thyroid_llnm_seg.dcm",
                               "dicom_results/us_real_palette/thyroid_llnm_sr.dcm"]
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(server.studies / stored["files"][0]))
    summary = next(name for name, value in result["label_names"].items() if value == 1)
    assert seg.get_segment_description(1).segment_label == summary[:64]
    assert int((seg.pixel_array > 0).sum()) == int((label == 1).sum())  # the region shown, pixel for pixel
    sr = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(server.studies / stored["files"][1]))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    (measurement,) = group.get_measurements()
    assert measurement.value == pytest.approx(result["llnm_probability"], abs=1e-6)
    listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert not any("seg" in name or "sr" in name for name in listed)


def test_a_lobe_mask_in_the_datastore_adds_the_capsule_distance(server, tmp_path):
    """The lobe mask is a further image input: a datastore id named in ``images`` (or the sidecar's)."""
    params = {"roi": [260, 340, 170, 250, 0, 0], **FORM}
    result, _ = answer_of(infer(server.url, "us_real_palette", {**params, "images": {"lobe_mask": "us_real_palette_lobe"}}),
                          tmp_path)
    morphology = result["morphology"]
    assert morphology["capsule_distance_mm"] == pytest.approx(9 * 0.262288, abs=1e-3)  # 9 pixels of the region
    assert morphology["capsule_within_2_5_mm"] is True and morphology["lobe_third"] == "upper"
    assert result["scalar_contributions"]["capsule_distance_mm"]["log_odds"] != 0.0
    without, _ = answer_of(infer(server.url, "us_real_palette", params), tmp_path)
    assert without["morphology"]["capsule_distance_mm"] is None
    assert without["scalar_contributions"]["capsule_distance_mm"]["log_odds"] == 0.0  # missing: no share
    refused = infer(server.url, "us_real_palette", {**params, "images": {"lobe_mask": "wrong_grid_lobe"}})
    assert refused.status_code == 422 and "thyroid lobe mask is 400x300 but the frame is 800x600" in refused.text


def test_a_click_on_a_cine_frame_is_read_on_that_frame(server, tmp_path):
    result, _ = answer_of(infer(server.url, "us_real_cine", {"foreground": [[320, 240, 7]], **FORM}), tmp_path)
    assert result["frame"]["frame_index"] == 7 and result["frame"]["frame_choice"] == "requested"
    assert result["frame"]["num_frames"] == 120
    stored = result["dicom"]
    assert stored["files"] == ["dicom_results/us_real_cine/thyroid_llnm_sr.dcm"] and stored["seg_not_written"]
    sr = pydicom.dcmread(server.studies / stored["files"][0])
    assert referenced_frames(sr) == {8}  # the SR's outline is on the frame read (numbered from 1)
    result, _ = answer_of(infer(server.url, "us_real_cine", {"foreground": [[320, 240]], **FORM}), tmp_path)
    assert result["frame"]["frame_choice"] == "sharpest"  # 2D clicks, no frame: the one a sonographer freezes


def test_a_16_bit_palette_frame_is_served(server, tmp_path):
    result, _ = answer_of(infer(server.url, "us_real_16bit", {"foreground": [[320, 240, 0]], **FORM}), tmp_path)
    assert 0.0 < result["llnm_probability"] < 1.0


def test_a_frame_without_calibration_needs_the_pixel_size(server, tmp_path):
    refused = infer(server.url, "us_real_rgb_uncalibrated", {"foreground": [[320, 240, 0]], **FORM})
    assert refused.status_code == 422 and "no pixel calibration" in refused.json()["detail"]
    result, _ = answer_of(infer(server.url, "us_real_rgb_uncalibrated",
                                {"foreground": [[320, 240, 0]], "pixel_size_mm": 0.1, **FORM}), tmp_path)
    assert result["frame"]["spacing_used"] == "pixel_size_mm"


def test_a_report_over_the_token_limit_is_truncated_with_a_warning(server, tmp_path):
    long_report = "Solid hypoechoic nodule with irregular margin. " * 60
    result, _ = answer_of(infer(server.url, "us_real_16bit",
                                {"foreground": [[320, 240, 0]], **FORM, "report": long_report}), tmp_path)
    assert result["report_tokens"]["truncated"] is True
    assert any("the rest was not used" in w for w in result["warnings"])


@pytest.mark.parametrize("params, status, message", [
    ({"foreground": [[320, 240, 0]], **FORM, "report": "   "}, 422, "report is empty"),
    ({"foreground": [[320, 240, 0]], **FORM, "report": 42}, 422, "report must be text"),
    ({"foreground": [[320, 240, 0], [100, 100, 1]], **FORM}, 422, r"the prompt lies on frames [0, 1]"),
    ({"foreground": [[320, 240, 3]], **FORM}, 422, "frame 3 is out of range"),
    ({"foreground": [[320, 240, 0]], **FORM, "sex": "F"}, 422, "sex 'F' is not one of"),
    ({"foreground": [[3000, 240, 0]], **FORM}, 422, "lies outside image 640x480"),
])
def test_bad_input_is_refused_naming_the_problem(server, params, status, message):
    refused = infer(server.url, "us_real_16bit", params)
    assert refused.status_code == status, refused.text
    assert message in refused.json()["detail"]


def test_an_ultrasound_study_in_a_dicomweb_pacs_is_served(tmp_path):
    if LocalOrthanc.executable() is None:
        reason = "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run installs it)"
        if os.environ.get("ONCOFUSION_REQUIRE_PACS") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    import pydicom

    series = str(pydicom.dcmread(shipped_ultrasound("OBXXXX1A.dcm"), stop_before_pixels=True).SeriesInstanceUID)
    conf = {"bundles": str(REPO / "bundles"), "models": MODEL, "runs": str(tmp_path / "runs"), "device": "cpu"}
    with LocalOrthanc(tmp_path / "orthanc") as pacs:
        pacs.upload([shipped_ultrasound("OBXXXX1A.dcm")])
        with LocalServer(pacs.dicomweb_url, tmp_path / "server", conf, start_timeout_s=START_TIMEOUT_S) as live:
            result, label = answer_of(infer(live.url, series, {"roi": [260, 340, 170, 250, 0, 0], **FORM}), tmp_path)
    assert 0.0 < result["llnm_probability"] < 1.0
    assert label.shape[:2] == (800, 600) and (label == 1).any()


def test_the_slicer_modules_form_reaches_the_model_and_a_refusal_reads_as_the_servers_message(server):
    """The OncoFusion Slicer module's logic against this server: the form from /info, a prediction with it."""
    import sys
    import urllib.error

    sys.path.insert(0, str(REPO / "plugins" / "slicer" / "OncoFusion"))
    from OncoFusionLib.logic import ServerResults, error_message, form_fields

    results = ServerResults(server.url)
    fields = form_fields(results.models()[f"{MODEL}_summary"]["config"])
    assert fields["sex"] == ("female", "male", "unknown") and fields["report"] is None
    result = results.predict(MODEL, "us_real_16bit", {"foreground": [[320, 240, 0]], **FORM, "age": "61"})
    assert result["clinical_fields"] == {"age": 61.0, "sex": "male"} and result["field_sources"]["age"] == "request"
    with pytest.raises(urllib.error.HTTPError) as refused:
        results.predict(MODEL, "us_real_16bit", {"foreground": [[320, 240, 0]], **FORM, "sex": "F"})
    assert error_message(refused.value).startswith("sex 'F' is not one of")
