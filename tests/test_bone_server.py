"""A real MONAI Label server on loopback serving a copy of the bone bundle with tiny trained weights:
the clinical form in /info, inference with a form, with a blank form (the study's sidecar fills it),
with a box ROI, and bad or missing clinical values answered 422 naming the field."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import psutil
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from tests.bone_helpers import BONE_BUNDLE, REPO

pytest_plugins = ["tests.conftest_bone"]
pytestmark = pytest.mark.server

APP_DIR = REPO / "apps" / "oncofusion"
MODEL = "bone_tumor_matrix"
START_TIMEOUT_S = 180
CASES = ("bone_0000", "bone_0001", "bone_0002")
NO_AGE = "bone_0002"  # its sidecar lacks the required age


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its children, with bounded waits."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family, process]:
        try:
            p.terminate()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()


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
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(APP_DIR), "--studies", str(studies),
        "--conf", "bundles", str(bundles), "--conf", "models", MODEL, "--conf", "runs", str(root / "runs"),
        "--conf", "device", "cpu", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = open(root / "server.log", "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n"
                                   f"{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not up after {START_TIMEOUT_S}s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "studies": studies, "manifest": tiny_bone_data}
    finally:
        _stop(process)
        log.close()


@pytest.fixture()
def client(server, tmp_path):
    return MONAILabelClient(server["url"], tmpdir=str(tmp_path))


def _sidecar(server, case: str) -> dict:
    return json.loads((server["studies"] / "sidecars" / f"{case}.json").read_text())


def _form(info: dict, **values) -> dict:
    """What Slicer sends: every config option, a list as its current (first) item, edited cells replaced."""
    config = info["models"][MODEL]["config"]
    return {**{k: v[0] if isinstance(v, list) else v for k, v in config.items()}, **values}


def _status_and_detail(error: MONAILabelClientException) -> tuple[int, str]:
    match = re.match(r"Status: (\d+); Response: (.*)", error.msg, re.S)
    assert match, error.msg
    body = match.group(2)
    try:
        body = json.loads(body).get("detail", body)
    except ValueError:
        pass
    return int(match.group(1)), str(body)


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
    (summary,) = [name for name, value in result["label_names"].items() if value == max(result["label_names"].values())]
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
    status, message = _status_and_detail(e.value)
    assert status == 422 and detail in message
    # a form that fills the gap makes the same study work
    if case == NO_AGE:
        _, result = client.infer(MODEL, case, {**_form(client.info(), age="44"), "foreground": [sidecar["center_ijk"]]})
        assert result["clinical_fields"]["age"] == 44.0
