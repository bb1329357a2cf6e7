"""The OPSCC SMuRF bundle served by a real MONAI Label server on loopback: a copy of the bundle's configs with
tiny random fold models, SYNTHETIC studies laid out as ``make demo`` lays them (CT and sidecar as studies;
slides, tumor outlines and masks linked beside them, found through the sidecars' relative paths). With a
slide the fusion model answers, without one the radiology-only model, each with its own risk cut-offs; bad
slides, masks and paths are answered 4xx naming the problem, and a refused request changes nothing stored."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monai.bundle import ConfigParser

from oncofusion.serving.infer_task import PREDICTIONS_KEY
from oncofusion.serving.launcher import LocalServer
from tests.server_client import answer_of, in_decoded_cache, infer

pytest_plugins = ["tests.conftest_opscc"]
pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
MODEL = "opscc_smurf"
BUNDLE = REPO / "bundles" / MODEL
START_TIMEOUT_S = 240
FUSION_CUTOFFS = [-1000.0, 1000.0]  # any log-hazard of the tiny models is 'intermediate'
RADIOLOGY_CUTOFFS = [1000.0, 2000.0]  # ... and 'low' for the radiology-only model: each variant has its own
# the studies: one as generated (with nodes), then one per way its record can be wrong
WITH_SLIDE, NO_SLIDE, BAD_SLIDE, ABSENT_SLIDE, EMPTY_TUMOR, OTHER_GRID = (
    "opscc_0001", "opscc_0000", "opscc_0002", "opscc_0003", "opscc_0004", "opscc_0005")
#: a study whose sidecar names no masks: its regions are what a user saves on it (Slicer's Submit Label)
SAVED_ONLY = "opscc_0006"
GARBAGE_SLIDE = "garbage_he.tiff"


def _tiny_weights(models: Path) -> None:
    """One random fold model per variant, built from the bundle's own network definition, and each
    variant's risk cut-offs where the evaluation writes them."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    fusion = parser.get_parsed_content("network_def")
    for folder, modalities, cutoffs in ((models, fusion.modalities, FUSION_CUTOFFS),
                                        (models / "radiology_only", ("ct_tumor", "ct_nodes"), RADIOLOGY_CUTOFFS)):
        torch.manual_seed(len(modalities))
        (folder / "fold0").mkdir(parents=True)
        torch.save(fusion.variant(modalities=tuple(modalities)).state_dict(), folder / "fold0" / "model.pt")
        (folder / "risk_groups.json").write_text(json.dumps({"thresholds": cutoffs}))


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def _studies(root: Path, source: Path) -> Path:
    """The generated studies as ``make demo`` links them, each sidecar then changed as its case needs."""
    studies = root / "studies"
    (studies / "sidecars").mkdir(parents=True)
    for case in (WITH_SLIDE, NO_SLIDE, BAD_SLIDE, ABSENT_SLIDE, EMPTY_TUMOR, OTHER_GRID):
        sidecar = json.loads((source / "sidecars" / f"{case}.json").read_text())
        for path in (f"{case}.nii.gz", sidecar["slide"], sidecar["slide_annotation"], sidecar["tumor_mask"],
                     sidecar["node_mask"]):
            _link(source / path, studies / path)
        (studies / "sidecars" / f"{case}.json").write_text(json.dumps(_as_recorded(case, sidecar, studies)))
    sidecar = json.loads((source / "sidecars" / f"{SAVED_ONLY}.json").read_text())
    _link(source / f"{SAVED_ONLY}.nii.gz", studies / f"{SAVED_ONLY}.nii.gz")
    recorded = {k: v for k, v in sidecar.items() if k not in ("tumor_mask", "node_mask", "slide", "slide_annotation")}
    (studies / "sidecars" / f"{SAVED_ONLY}.json").write_text(json.dumps(recorded))
    (studies / GARBAGE_SLIDE).write_bytes(b"II*\x00" + b"not a slide" * 64)
    return studies


def _as_recorded(case: str, sidecar: dict, studies: Path) -> dict:
    ct = nib.load(studies / f"{case}.nii.gz")
    if case == NO_SLIDE:
        del sidecar["slide"], sidecar["slide_annotation"]
    elif case == BAD_SLIDE:
        sidecar["slide"] = GARBAGE_SLIDE
    elif case == ABSENT_SLIDE:
        sidecar["slide"] = "absent_he.tiff"
    elif case == EMPTY_TUMOR:
        sidecar["tumor_mask"] = f"labels/empty/{case}.nii.gz"
        (studies / "labels" / "empty").mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros(ct.shape, np.uint8), ct.affine), studies / sidecar["tumor_mask"])
    elif case == OTHER_GRID:
        sidecar["node_mask"] = f"labels/coarse/{case}.nii.gz"
        (studies / "labels" / "coarse").mkdir(parents=True)
        coarse = np.ones(tuple(s // 2 for s in ct.shape), np.uint8)
        nib.save(nib.Nifti1Image(coarse, ct.affine @ np.diag([2.0, 2.0, 2.0, 1.0])), studies / sidecar["node_mask"])
    return sidecar


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_opscc_data):
    root = tmp_path_factory.mktemp("opscc_server")
    bundle = root / "bundles" / MODEL
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    _tiny_weights(bundle / "models")
    studies = _studies(root, tiny_opscc_data.parent / "datastore")
    conf = {"bundles": str(bundle.parent), "models": MODEL, "runs": str(root / "runs"), "device": "cpu"}
    groups = json.loads((bundle / "configs" / "inference.json").read_text())["risk_group_names"]
    with LocalServer(studies, root, conf, start_timeout_s=START_TIMEOUT_S) as live:
        yield SimpleNamespace(url=live.url, studies=studies, groups=groups, source=tiny_opscc_data.parent / "datastore")


def _stored(studies: Path, case: str) -> dict:
    objects = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    return objects[case]["image"]["info"].get(PREDICTIONS_KEY, {}).get(MODEL, {})


def test_a_study_with_masks_and_a_slide_is_answered_by_the_fusion_model(server, tmp_path):
    result, label = answer_of(infer(server.url, MODEL, WITH_SLIDE, {}), tmp_path)
    assert result["variant"] == "fusion" and "radiology only" not in result["summary"]
    assert result["risk_group"] in server.groups and result["risk_group"] == "intermediate"
    assert result["risk_cutoffs"] == FUSION_CUTOFFS
    assert result["risk_score"] == pytest.approx(float(np.mean(result["fold_risk_scores"])), abs=1e-3)
    assert len(result["fold_risk_scores"]) == 1 and 0.0 < result["grade_probability"] < 1.0
    # the masks and the slide were read through the sidecar's paths, relative to the studies folder
    assert result["regions"]["from"] == "tumor_mask + node_mask images" and result["regions"]["nodes_present"]
    assert result["slide"]["name"] == f"{WITH_SLIDE}_he.tiff" and result["slide"]["fragments"] >= 1
    assert result["slide"]["annotation"] == f"{WITH_SLIDE}_he.geojson"
    assert result["field_sources"] == {"slide": "sidecar", "slide_annotation": "sidecar"}
    # what Slicer imports: value 1 on the CT grid, named after the summary
    assert result["label_names"] == {result["summary"]: 1}
    assert label.shape == nib.load(server.studies / f"{WITH_SLIDE}.nii.gz").shape and set(np.unique(label)) == {0, 1}
    assert _stored(server.studies, WITH_SLIDE)["risk_score"] == result["risk_score"]


def test_a_study_without_a_slide_is_answered_by_the_radiology_only_model_which_says_so(server, tmp_path):
    result, _ = answer_of(infer(server.url, MODEL, NO_SLIDE, {}), tmp_path)
    assert result["variant"] == "radiology-only" and result["slide"] is None
    assert result["risk_group"] == "low" and result["risk_cutoffs"] == RADIOLOGY_CUTOFFS
    assert result["summary"].endswith("radiology only: no slide")
    assert any("radiology-only model answered" in w for w in result["warnings"])
    assert set(result["explanation"]["contributions"]) == {"ct_tumor", "ct_nodes"}


def test_regions_drawn_in_slicer_and_saved_on_the_study_are_what_the_model_reads(server, tmp_path):
    refused = infer(server.url, MODEL, SAVED_ONLY, {})
    assert refused.status_code == 400 and "save them on the study (Submit Label)" in refused.json()["detail"]
    drawn = server.source / "labels" / "final" / f"{SAVED_ONLY}.nii.gz"  # 1 tumor, 2 nodes, as Slicer saves
    with drawn.open("rb") as f:
        saved = requests.put(f"{server.url}/datastore/label", params={"image": SAVED_ONLY, "tag": "final"},
                             files={"label": (drawn.name, f)}, timeout=60)
    assert saved.status_code == 200, saved.text
    result, label = answer_of(infer(server.url, MODEL, SAVED_ONLY, {}), tmp_path)
    assert result["regions"]["from"] == "saved 'final' label"
    assert result["regions"]["nodes_present"] == bool((np.asarray(nib.load(drawn).dataobj) == 2).any())
    assert result["variant"] == "radiology-only" and label.any()


def test_stock_slicer_sees_the_risk_group_as_the_segment_name_of_the_summary_model(server, tmp_path):
    models = requests.get(f"{server.url}/info/", timeout=60).json()["models"]
    assert models[MODEL]["type"] == "deepgrow" and models[f"{MODEL}_summary"]["type"] == "segmentation"
    assert "attribution" in models[MODEL]["labels"]  # the segment Slicer prepares holds the attribution overlay
    result, label = answer_of(infer(server.url, f"{MODEL}_summary", WITH_SLIDE, {}), tmp_path)
    (segment,) = [name for name, value in result["label_names"].items() if value == 1]  # what Slicer imports
    assert segment == result["summary"] and segment.startswith("DFS risk intermediate (")
    assert label.any() and set(np.unique(label)) == {0, 1}


REFUSED = [
    (BAD_SLIDE, {}, f"slide '{GARBAGE_SLIDE}' cannot be read"),
    (WITH_SLIDE, {"slide": GARBAGE_SLIDE}, f"slide '{GARBAGE_SLIDE}' cannot be read"),
    (ABSENT_SLIDE, {}, "slide 'absent_he.tiff' not found"),
    (EMPTY_TUMOR, {}, "tumor mask 'tumor_mask' is empty"),
    (OTHER_GRID, {}, "mask 'node_mask' is not on the CT's grid"),
    (WITH_SLIDE, {"slide": "../../etc/passwd"}, "slide '../../etc/passwd' lies outside the slide folder"),
    (WITH_SLIDE, {"tumor_mask": "../../etc/passwd"}, "does not read parameter(s) ['tumor_mask']"),
]


@pytest.mark.parametrize(("case", "params", "message"), REFUSED)
def test_bad_slides_masks_and_paths_are_refused_naming_the_problem(server, case, params, message):
    response = infer(server.url, MODEL, case, params)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.json()["detail"]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under the studies folder and its hash (the server's lock and the decoded copies of the
    volumes, a derived cache, aside)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock" and not in_decoded_cache(p.relative_to(root))
    }


def test_a_refused_request_changes_nothing_stored(server, tmp_path):
    answer_of(infer(server.url, MODEL, NO_SLIDE, {}), tmp_path)  # something stored to lose
    before = _snapshot(server.studies)
    for case, params, _ in REFUSED:
        assert infer(server.url, MODEL, case, params).status_code >= 400
    assert _snapshot(server.studies) == before
    assert _stored(server.studies, NO_SLIDE)["variant"] == "radiology-only"
