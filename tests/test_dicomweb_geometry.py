"""A click lands on the voxel the radiologist clicked, whatever path the study took to the model.

The marker phantom (``tests/dicom_series.py``) is a real CT slice restacked with InstanceNumbers shuffled
or reversed against position, head-first and feet-first, axial and oblique. A viewer (3D Slicer, OHIF)
orders slices by position along the slice normal; the click arrives as that IJK. The model must read the
marker there, and the voxel's world position must be the marker's (within half a voxel), through:

- an Orthanc PACS over DICOMweb (``--studies http://.../dicom-web``): MONAI Label downloads the series
  to a folder, which the app reads by position (stock MONAI Label stacked it by InstanceNumber and
  landed on the mirrored slice, 23.75 mm away);
- a local DICOM series uploaded as a session (``PUT /session/``, what 3D Slicer does with a volume that
  is not in the datastore).

NIfTI studies are clicked on in ``test_server.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from oncofusion.serving.launcher import LocalOrthanc, LocalServer
from tests.dicom_series import (
    COL_SPACING,
    MARKER_COL,
    MARKER_ROW,
    MARKER_STORED,
    ROW_SPACING,
    SERIES_CASES,
    marker_world_ras,
    orientation,
    write_marker_series,
)
from tests.serving_fakes import make_datastore, make_fake_bundle, make_marker_bundle

pytestmark = pytest.mark.server

ORIGIN = np.array([-158.1, -179.0, -75.7])
GEOMETRY_CASES = ("shuffled", "feet_first", "oblique")
if LocalOrthanc.executable() is None:
    reason = "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run installs it)"
    if os.environ.get("ONCOFUSION_REQUIRE_PACS") == "1":
        pytest.fail(reason, pytrace=False)
    pytestmark = [pytestmark, pytest.mark.skip(reason=reason)]


def _phantom(folder: Path, case: str) -> dict:
    """Write one marker series; return its SeriesInstanceUID, the viewer IJK of the marker, its world
    position (RAS mm) and the largest half-voxel."""
    spec = SERIES_CASES[case]
    row_cos, col_cos = orientation(*spec["angles"])
    normal = np.cross(row_cos, col_cos)
    steps = np.asarray(spec["steps"], float)
    positions = ORIGIN + steps[:, None] * normal
    folder.mkdir(parents=True)
    write_marker_series(folder, positions, spec["numbers"], spec["marker"], row_cos, col_cos)
    rank = int(np.argsort(np.argsort(positions @ normal))[spec["marker"]])
    series_uid = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    slice_gap = float(np.min(np.diff(np.sort(steps))))
    return {"series": series_uid, "ijk": [MARKER_COL, MARKER_ROW, rank],
            "world": marker_world_ras(positions[spec["marker"]], row_cos, col_cos),
            "half_voxel": 0.5 * max(COL_SPACING, ROW_SPACING, slice_gap), "files": sorted(folder.iterdir())}


def _click(url: str, query: dict, ijk: list[int]) -> dict:
    answer = requests.post(f"{url}/infer/marker", params={**query, "output": "json"}, timeout=120,
                           files={"params": (None, json.dumps({"foreground": [ijk]}))})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _assert_on_marker(result: dict, phantom: dict) -> float:
    assert result["value"] == pytest.approx(MARKER_STORED - 1024)  # the marker, rescaled to HU
    error = float(np.linalg.norm(np.asarray(result["voxel_mm"]) - phantom["world"]))
    assert error <= phantom["half_voxel"], f"click landed {error:.2f} mm from the marker"
    return error


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    return {case: _phantom(root / case, case) for case in GEOMETRY_CASES}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    make_marker_bundle(root)
    return root


def test_click_through_dicomweb_lands_on_the_marker(tmp_path, phantoms, bundles):
    with LocalOrthanc(tmp_path / "orthanc") as pacs:
        for phantom in phantoms.values():
            pacs.upload(phantom["files"])
        with LocalServer(pacs.dicomweb_url, tmp_path / "server", {"bundles": str(bundles)}) as live:
            errors = {case: _assert_on_marker(_click(live.url, {"image": p["series"]}, p["ijk"]), p)
                      for case, p in phantoms.items()}
    assert max(errors.values()) < 1e-3  # the voxel centre is the marker's own position


def test_click_on_an_uploaded_dicom_series_lands_on_the_marker(tmp_path, phantoms, bundles):
    studies = make_datastore(tmp_path / "datastore")
    with LocalServer(studies, tmp_path / "server", {"bundles": str(bundles)}) as live:
        for phantom in phantoms.values():
            files = [("files", (p.name, p.read_bytes())) for p in phantom["files"]]
            session = requests.put(f"{live.url}/session/", files=files, timeout=120)
            assert session.status_code == 200, session.text
            result = _click(live.url, {"session_id": session.json()["session_id"]}, phantom["ijk"])
            _assert_on_marker(result, phantom)


def test_prediction_goes_back_to_the_pacs_as_seg_and_sr(tmp_path, phantoms):
    """What OHIF shows from the PACS: the region (SEG) and the measurement (SR), read back with highdicom."""
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient

    bundles = tmp_path / "bundles"
    make_fake_bundle(bundles, "fake_nodule")
    phantom = phantoms["oblique"]
    with LocalOrthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(phantom["files"])
        with LocalServer(pacs.dicomweb_url, tmp_path / "server", {"bundles": str(bundles)}) as live:
            answer = requests.post(f"{live.url}/infer/fake_nodule",
                                   params={"image": phantom["series"], "output": "json"}, timeout=120,
                                   files={"params": (None, json.dumps({"foreground": [phantom["ijk"]],
                                                                       "threshold": 0.0}))})
            assert answer.status_code == 200, answer.text
            stored = answer.json()["dicom"]
            assert stored["stored"] is True, stored
        client = DICOMwebClient(pacs.dicomweb_url)
        study = stored["study_instance_uid"]
        seg = hd.seg.Segmentation.from_dataset(
            client.retrieve_instance(study, _series_of(client, study, "SEG"), stored["seg_sop_instance_uid"]))
        sr = hd.sr.ComprehensiveSR.from_dataset(
            client.retrieve_instance(study, _series_of(client, study, "SR"), stored["sr_sop_instance_uid"]))
    assert seg.get_segment_description(1).segment_label.startswith("malignant")
    (group,) = sr.content.get_planar_roi_measurement_groups()
    (measurement,) = group.get_measurements()
    assert measurement.value == pytest.approx(answer.json()["probability"])
    assert {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()} == {
        "Predicted class": answer.json()["class"]}


def _series_of(client, study: str, modality: str) -> str:
    (series,) = client.search_for_series(study, search_filters={"Modality": modality})
    return series["0020000E"]["Value"][0]
