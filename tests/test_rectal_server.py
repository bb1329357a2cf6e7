"""The rectal ERUS bundle served by a real MONAI Label server on loopback with its committed demo weights: the
2D deepgrow task in /info, a Slicer box on a SYNTHETIC ERUS frame (report from the study's sidecar) answered
with the response probability, SHAP by modality and a waterfall PNG, the tumor ROI drawn as label 1, a real
pydicom-data ultrasound file served with the report typed in the form, and bad requests answered 4xx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from oncofusion.serving.launcher import LocalServer
from sample_data.real_ultrasound import link_into
from tests.server_client import answer_of
from tests.server_client import infer as slicer_infer

pytest_plugins = ["tests.conftest_rectal"]
pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
MODEL = "rectal_erus_clip"
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_rectal_data):
    root = tmp_path_factory.mktemp("rectal_server")
    studies = root / "studies"
    (studies / "sidecars").mkdir(parents=True)
    link_into(studies)
    source = tiny_rectal_data.parent / "datastore"
    shutil.copy(source / "rectal_0000_f0.dcm", studies / "erus_case.dcm")
    sidecar = json.loads((source / "sidecars" / "rectal_0000_f0.json").read_text())
    (studies / "sidecars" / "erus_case.json").write_text(json.dumps(sidecar))  # as the generator writes it
    conf = {"bundles": str(REPO / "bundles"), "models": MODEL, "runs": str(root / "runs"), "device": "cpu"}
    with LocalServer(studies, root, conf, start_timeout_s=START_TIMEOUT_S) as live:
        yield SimpleNamespace(url=live.url, studies=studies, roi=sidecar["roi"])


def infer(url: str, image: str, params: dict, model: str = MODEL):
    return slicer_infer(url, model, image, params)


def test_info_declares_a_2d_model_with_the_report_option(server):
    model = requests.get(f"{server.url}/info/", timeout=60).json()["models"][MODEL]
    assert model["type"] == "deepgrow" and model["dimension"] == 2
    assert {"report", "click_radius_mm"} <= set(model["config"])


def test_a_slicer_box_answers_the_response_probability_with_shap_by_modality(server, tmp_path):
    (i0, j0), (i1, j1) = server.roi
    result, label = answer_of(infer(server.url, "erus_case", {"roi": [i0, i1, j0, j1, 0, 0], "report": ""}), tmp_path)
    assert 0.0 < result["good_response_probability"] < 1.0 and len(result["fold_probabilities"]) == 5
    # the frame and the report are read from the sidecar; its bookkeeping (case id, frames, synthetic) is not a field
    assert result["field_sources"] == {"report": "sidecar", "click_radius_mm": "default", "frame": "sidecar"}
    shap = result["shap"]
    assert set(shap["modality_share"]) == {"image", "text"}
    assert sum(shap["modality_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert shap["log_odds"] == pytest.approx(shap["base_log_odds"] + sum(shap["by_modality"].values()), abs=2e-3)
    assert Path(shap["waterfall_png"]).read_bytes()[:4] == b"\x89PNG"
    region = label.reshape(label.shape[:2])
    assert region.shape == (160, 160) and region[i0:i1 + 1, j0:j1 + 1].all() and region.sum() == (i1 - i0 + 1) * (j1 - j0 + 1)


def test_a_real_ultrasound_with_the_report_typed_in_the_form_is_served(server, tmp_path):
    report = "A mid rectal tumour 7 cm from the anal verge. Depth of invasion uT2. Perirectal nodes: none suspicious, uN0."
    result, _ = answer_of(infer(server.url, "us_real_palette", {"roi": [260, 340, 170, 250, 0, 0], "report": report}),
                          tmp_path)
    assert result["field_sources"]["report"] == "request"
    assert result["prediction"] in ("good response", "poor response")


@pytest.mark.parametrize(("image", "params", "message"), [
    ("us_real_palette", {"roi": [260, 340, 170, 250, 0, 0], "report": ""}, "report is empty"),
    ("erus_case", {"foreground": [[10, 10, 7]]}, "frame"),
    ("erus_case", {"roi": [10, 20, 10, 20, 0, 0], "click_radius_mm": "wide"}, "click_radius_mm"),
])
def test_bad_requests_are_refused_naming_the_problem(server, image, params, message):
    response = infer(server.url, image, params)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.text
