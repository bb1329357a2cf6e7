"""A real MONAI Label server on loopback serving a copy of the bone bundle with tiny trained weights:
the clinical form in /info, inference with a form, with a blank form (the study's sidecar fills it),
with a box ROI, and bad or missing clinical values answered 422 naming the field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from oncofusion.serving.launcher import LocalServer
from tests.bone_helpers import BONE_BUNDLE
from tests.serving_fakes import status_and_detail

pytest_plugins = ["tests.conftest_bone"]
pytestmark = pytest.mark.server

MODEL = "bone_tumor_matrix"
START_TIMEOUT_S = 180
CASES = ("bone_0000", "bone_0001", "bone_0002")
NO_AGE = "bone_0002"  # its sidecar lacks the required age


def _bundle_copy(root: Path, ckpt: Path) -> Path:
    """The bundle's configs and docs with the tiny fold models as its weights."""
    bundle = root / "bundles" / MODEL
    shutil.copytree(BONE_BUNDLE / "configs", bundle / "configs")
    shutil.copytree(BONE_BUNDLE / "docs", bundle / "docs")
    for fold in ("fold0", "fold1"):
        shutil.copytree(ckpt / fold, bundle / "models" / fold)
    return bundle.parent


def _datastore(root: Path, manifest: Path) -> Path:
    studies = root / "datastore"
    (studies / "sidecars").mkdir(parents=True)
    source = manifest.parent / "datastore"
    for case in CASES:
        shutil.copy(source / f"{case}.nii.gz", studies / f"{case}.nii.gz")
        sidecar = json.loads((source / "sidecars" / f"{case}.json").read_text())
        if case == NO_AGE:
            sidecar.pop("age")
        (studies / "sidecars" / f"{case}.json").write_text(json.dumps(sidecar))
    return studies


@pytest.fixture(scope="module")
def server(tiny_bone_data, tiny_bone_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("bone_server")
    bundles = _bundle_copy(root, tiny_bone_ckpt)
    studies = _datastore(root, tiny_bone_data)
    conf = {"bundles": str(bundles), "models": MODEL, "runs": str(root / "runs"), "device": "cpu"}
    with LocalServer(studies, root, conf, start_timeout_s=START_TIMEOUT_S) as live:
        yield {"url": live.url, "studies": studies, "manifest": tiny_bone_data}


@pytest.fixture()
def client(server, tmp_path):
    return MONAILabelClient(server["url"], tmpdir=str(tmp_path))


def _sidecar(server, case: str) -> dict:
    return json.loads((server["studies"] / "sidecars" / f"{case}.json").read_text())


def _form(info: dict, **values) -> dict:
    """What Slicer sends: every config option, a list as its current (first) item, edited cells replaced."""
    config = info["models"][MODEL]["config"]
    return {**{k: v[0] if isinstance(v, list) else v for k, v in config.items()}, **values}


def test_info_shows_the_clinical_form(client):
    model = client.info()["models"][MODEL]
    assert model["type"] == "deepgrow" and model["dimension"] == 3
    assert model["config"] == {
        "sex": ["", "female", "male"],
        "age": "",
        "location": ["", "epiphysis", "metaphysis", "diaphysis", "flat bone", "spine", "unknown"],
        "fracture": ["", "no", "yes", "unknown"],
        "radius_mm": 10.0,
    }


def test_infer_with_a_filled_clinical_form(client, server):
    case = CASES[0]
    sidecar = _sidecar(server, case)
    form = _form(client.info(), sex="male", age="15", location="metaphysis", fracture="yes")
    label_file, result = client.infer(MODEL, case, {**form, "foreground": [sidecar["center_ijk"]], "label": "tumor"})
    assert result["clinical_fields"] == {"sex": "male", "age": 15.0, "location": "metaphysis", "fracture": True}
    assert 0.0 <= result["osteoid_probability"] <= 1.0 and len(result["fold_probabilities"]) == 2
    assert set(result["clinical_contributions"]) == {"sex", "age", "location", "fracture"}
    assert result["model"] == MODEL and result["roi_center_ijk"] == [float(v) for v in sidecar["center_ijk"]]
    (summary,) = [name for name, value in result["label_names"].items() if value == 1]  # what Slicer imports
    assert re.fullmatch(r"(osteoid|chondroid) \d\.\d\d( \(.+\))?", summary)
    label = nib.load(label_file)
    image = nib.load(server["studies"] / f"{case}.nii.gz")
    assert label.shape == image.shape and label.get_fdata().max() >= 1
    stored = json.loads((server["studies"] / "datastore_v2.json").read_text())["objects"][case]["image"]["info"]
    assert stored["oncofusion_predictions"][MODEL]["osteoid_probability"] == result["osteoid_probability"]


def test_blank_form_takes_the_fields_from_the_studys_sidecar(client, server):
    case = CASES[1]
    sidecar = _sidecar(server, case)
    box = [v for lo, hi in zip(*sidecar["roi"], strict=True) for v in (lo, hi)]  # Slicer's [i0, i1, j0, j1, k0, k1]
    _, result = client.infer(MODEL, case, {**_form(client.info()), "roi": box})
    expected = {"sex": sidecar["sex"], "age": float(sidecar["age"]), "location": sidecar["location"],
                "fracture": sidecar["fracture"]}
    assert result["clinical_fields"] == expected
    centre = [(lo + hi) / 2 for lo, hi in zip(*sidecar["roi"], strict=True)]
    assert result["roi_center_ijk"] == pytest.approx(centre, abs=0.01)


@pytest.mark.parametrize(
    "case, values, detail",
    [
        (CASES[0], {"age": "130"}, "age 130 is outside 0-120"),
        (CASES[0], {"sex": "other"}, "sex 'other' is not one of female, male"),
        (CASES[0], {"fracture": "perhaps"}, "fracture 'perhaps' must be yes or no"),
        (NO_AGE, {}, "age is required"),
    ],
)
def test_bad_or_missing_clinical_values_are_422(client, server, case, values, detail):
    sidecar = _sidecar(server, case)
    with pytest.raises(MONAILabelClientException) as e:
        client.infer(MODEL, case, {**_form(client.info(), **values), "foreground": [sidecar["center_ijk"]]})
    status, message = status_and_detail(e.value)
    assert status == 422 and detail in message
    # a form that fills the gap makes the same study work
    if case == NO_AGE:
        _, result = client.infer(MODEL, case, {**_form(client.info(), age="44"), "foreground": [sidecar["center_ijk"]]})
        assert result["clinical_fields"]["age"] == 44.0
