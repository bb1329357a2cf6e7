"""The real lung bundle behind a live MONAI Label server: a Slicer-style click gives a prediction."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import pytest
from monailabel.client import MONAILabelClient

from oncofusion.serving.launcher import LocalServer
from tests.conftest import LUNG_BUNDLE

pytestmark = [pytest.mark.server, pytest.mark.slow]
MODEL = LUNG_BUNDLE.name


@pytest.fixture(scope="module")
def lung_server(tiny_lung_data, tiny_lung_checkpoints, tmp_path_factory):
    """The bundle's own configs with the tiny checkpoints, serving the tiny synthetic datastore."""
    root = tmp_path_factory.mktemp("lung_server")
    bundle = root / "bundles" / MODEL
    shutil.copytree(LUNG_BUNDLE / "configs", bundle / "configs")
    for fold in tiny_lung_checkpoints.glob("fold*"):
        shutil.copytree(fold, bundle / "models" / fold.name)
    studies = tiny_lung_data.parent / "datastore"
    with LocalServer(studies, root, {"bundles": str(bundle.parent)}) as server:
        yield server, studies


def test_click_returns_malignancy_semantics_and_a_label_on_the_image_grid(lung_server, tmp_path):
    server, studies = lung_server
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    info = client.info()
    assert info["models"][MODEL]["type"] == "deepgrow"
    case = json.loads((studies.parent / "manifest.json").read_text())["cases"][0]
    label_file, result = client.infer(MODEL, case["case_id"], {"foreground": [case["center_ijk"]]})
    result = json.loads(result) if isinstance(result, str) else result

    assert 0.0 <= result["malignancy_probability"] <= 1.0
    assert set(result["semantic_features"]) >= {"margin", "spiculation", "texture"}
    assert len(result["view_attention"]) == 9
    (summary,) = result["label_names"]
    assert summary.startswith(f"malignancy {result['malignancy_probability']:.2f}")
    label = nib.load(label_file)
    image = nib.load(studies / f"{case['case_id']}.nii.gz")
    assert label.shape == image.shape and label.get_fdata().sum() > 0

    stored = json.loads((studies / "datastore_v2.json").read_text())
    predictions = stored["objects"][case["case_id"]]["image"]["info"]["oncofusion_predictions"]
    assert predictions[MODEL]["malignancy_probability"] == pytest.approx(result["malignancy_probability"])


def test_a_downloaded_study_is_decoded_before_its_first_click(lung_server, tmp_path):
    """Slicer downloads a study before the user can click on it: the server decodes it then, so the first
    click finds it decoded (the cache records each decoded volume under the studies folder)."""
    import time
    import urllib.request

    from oncofusion.serving.infer_task import DECODED_DIR

    server, studies = lung_server
    case = json.loads((studies.parent / "manifest.json").read_text())["cases"][-1]  # never clicked in this module
    source = str((studies / f"{case['case_id']}.nii.gz").resolve())

    def decoded() -> bool:
        return any(source in path.read_text() for path in (studies / DECODED_DIR).glob("*.json"))

    assert not decoded()
    with urllib.request.urlopen(f"{server.url}/datastore/image?image={case['case_id']}", timeout=60) as response:
        assert response.read(2) == b"\x1f\x8b"  # the study itself, gzip NIfTI
    deadline = time.time() + 60
    while not decoded() and time.time() < deadline:
        time.sleep(0.2)
    assert decoded()
