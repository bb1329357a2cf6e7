"""A real MONAI Label server on loopback, serving the fake bundle, driven by MONAI Label's own client."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from oncofusion.serving.launcher import LocalServer
from tests.serving_fakes import (
    AFFINE,
    SHAPE,
    make_datastore,
    make_fake_bundle,
    read_label_file,
    status_and_detail,
)

pytestmark = pytest.mark.server

MODEL = "fake_nodule"
START_TIMEOUT_S = 180
TRAIN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    bundles = root / "bundles"
    make_fake_bundle(bundles, MODEL)
    studies = make_datastore(root / "datastore")
    conf = {"bundles": str(bundles), "runs": str(root / "runs"), "max_epochs": "1"}
    with LocalServer(studies, root, conf, start_timeout_s=START_TIMEOUT_S) as live:
        yield {"url": live.url, "studies": studies, "root": root, "process": live.process}


@pytest.fixture()
def client(server, tmp_path):
    return MONAILabelClient(server["url"], tmpdir=str(tmp_path))


def _snapshot(directory: Path) -> dict[str, str]:
    """Every file under the datastore and its hash (the lock file is rewritten by reads)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_info_lists_deepgrow_model_with_options(client):
    info = client.info()
    model = info["models"][MODEL]
    assert model["type"] == "deepgrow"
    assert model["dimension"] == 3
    assert model["labels"] == ["lesion"]
    assert model["config"] == {"threshold": 100.0, "radius": 2.0, "draw": [True, False]}
    assert MODEL in info["trainers"]
    assert info["trainers"][MODEL]["config"]["max_epochs"] == 1


def test_infer_click_returns_label_and_json(client):
    # what 3D Slicer sends for a deepgrow click (options come back as params, lists as their first item)
    params = {
        "label": "lesion",
        "foreground": [[12, 10, 8]],
        "background": [],
        "threshold": 100.0,
        "radius": 2.0,
        "draw": True,
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
    }
    label_file, result = client.infer(MODEL, "case_bright", params)
    assert result["class"] == "malignant" and result["probability"] > 0.9
    assert result["label_names"] == {"malignant 1.00": 1}
    assert result["model"] == MODEL and result["model_version"] == "0.0.1"
    assert result["report"] == "case_bright: solid nodule"  # merged from the study's sidecar
    assert set(result["latencies"]) == {"load", "predict", "write", "total"}
    assert label_file.endswith(".nrrd")  # the format Slicer (and OHIF) asked for
    label, affine = read_label_file(label_file)
    assert label.shape == SHAPE
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)
    assert label[12, 10, 8] == 1

    # form-encoded JSON params, a single point; nothing drawn still answers with an (empty) label, the
    # only answer the 0.8.5 client (and Slicer's copy of it) can parse
    label_file, result = client.infer(MODEL, "case_dim", {"foreground": "[8, 6, 5]", "draw": False})
    assert result["class"] == "benign"
    assert nib.load(label_file).get_fdata().max() == 0


def test_prediction_json_is_persisted(client, server):
    client.infer(MODEL, "case_dim", {"foreground": [[8, 6, 5]], "draw": False})
    _, result = client.infer(MODEL, "case_bright", {"foreground": [[12, 10, 8]], "draw": False})
    objects = json.loads((server["studies"] / "datastore_v2.json").read_text())["objects"]
    bright = objects["case_bright"]["image"]["info"]
    assert bright["name"] == "case_bright.nii.gz"
    assert bright["oncofusion_predictions"][MODEL]["probability"] == result["probability"]
    assert objects["case_dim"]["image"]["info"]["oncofusion_predictions"][MODEL]["class"] == "benign"


@pytest.mark.parametrize(
    "image, params, status, detail",
    [
        (
            "case_bright",
            {"foreground": [[30, 10, 8]]},
            422,
            "ROI point (30, 10, 8) lies outside image 24x20x16",
        ),
        ("case_bright", {"foreground": [], "background": [[1, 1, 1]]}, 422, "no lesion given"),
        ("no_such_case", {"foreground": [[1, 1, 1]]}, 404, "image 'no_such_case' is not in the datastore"),
        ("case_bright", {"foreground": [[1, 2]]}, 422, "'foreground' point 0 must have 3 coordinates"),
        ("case_bright", {"foreground": "[[1, 2, x]]"}, 422, "'foreground' is not valid JSON"),
        ("case_bright", {"roi": [1, 2, 3]}, 422, "'roi' must be [[i0, j0, k0], [i1, j1, k1]]"),
        (
            "case_bright",
            {"foreground": [[1, 1, 1]], "threshold": "high"},
            422,
            "'threshold' must be a number",
        ),
    ],
)
def test_bad_requests_are_4xx_and_change_nothing(client, server, image, params, status, detail):
    before = _snapshot(server["studies"])
    with pytest.raises(MONAILabelClientException) as e:
        client.infer(MODEL, image, params)
    got_status, got_detail = status_and_detail(e.value)
    assert got_status == status
    assert detail in got_detail
    assert _snapshot(server["studies"]) == before
    # and the server keeps serving
    _, result = client.infer(MODEL, "case_dim", {"foreground": [[8, 6, 5]], "draw": False})
    assert result["class"] == "benign"


def test_unknown_model_is_404(client):
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("no_such_model", "case_bright", {"foreground": [[1, 1, 1]]})
    status, detail = status_and_detail(e.value)
    assert status == 404 and "unknown model 'no_such_model'" in detail


def test_train_rejects_then_runs_in_background(client, server):
    sidecars = server["studies"] / "sidecars"
    hidden = server["root"] / "sidecars.hidden"
    shutil.move(sidecars, hidden)
    try:
        with pytest.raises(MONAILabelClientException) as e:
            client.train_start(MODEL, {"max_epochs": 1})
        status, detail = status_and_detail(e.value)
        assert status == 422 and "0 labelled studies found, at least 2 are needed" in detail
    finally:
        shutil.move(hidden, sidecars)

    task = client.train_start(MODEL, {"max_epochs": 2})
    assert task["status"] in ("SUBMITTED", "RUNNING")
    started = time.time()
    client.info()  # the server answers while training runs
    assert time.time() - started < 10

    deadline = time.time() + TRAIN_TIMEOUT_S
    while True:
        task = client.train_status()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.time() < deadline, f"training still running after {TRAIN_TIMEOUT_S}s: {task}"
        time.sleep(1)
    assert task["status"] == "DONE", task

    runs = sorted((server["root"] / "runs" / MODEL).glob("*/model.json"))
    assert runs, list((server["root"] / "runs").rglob("*"))
    model = json.loads(runs[-1].read_text())
    assert model["epochs"] == 2 and model["records"] == 2 and model["labels"] == [0, 1]
    np.testing.assert_allclose(model["center_mm"][0], (AFFINE @ [12, 10, 8, 1])[:3], atol=1e-4)
    status = json.loads((runs[-1].parent / "status.json").read_text())
    assert status["status"] == "DONE" and status["records"] == 2 and status["published"] == "yes"
    assert client.info()["train_stats"][MODEL]["status"] == "DONE"
    # the run's checkpoints are served through the swapped link; the bundle's own models are untouched
    current = server["root"] / "runs" / MODEL / "current"
    assert current.is_symlink() and current.resolve() == (runs[-1].parent / "models").resolve()
    assert (current / "fold0" / "model.json").is_file()
    assert not (server["root"] / "bundles" / MODEL / "models").exists()


def test_summary_companion_answers_on_the_known_lesion_for_stock_slicer(client):
    info = client.info()["models"]
    assert info[MODEL]["labels"] == ["lesion"]  # Slicer's Next Sample prepares this segment
    assert info[f"{MODEL}_summary"]["type"] == "segmentation"  # Slicer names segments after label_names
    client.infer(MODEL, "case_bright", {"foreground": [[11, 10, 8]]})  # a click with the deepgrow model
    label_file, result = client.infer(f"{MODEL}_summary", "case_bright", {"result_extension": ".nrrd"})
    assert result["lesion_from"] == "last prediction" and result["roi_center_ijk"] == [11, 10, 8]
    assert result["label_names"] == {"malignant 1.00": 1}  # the summary at value 1, the value Slicer imports
    assert read_label_file(label_file)[0][11, 10, 8] == 1
