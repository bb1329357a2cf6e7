"""Hostile and malformed requests against a real server: each gets a 4xx that names the problem, and
nothing under the server's folders changes (no file written, moved or deleted, inside the datastore or
beside it), no upload is left in the temp folder.

The corpus covers every bundle served: the fake bundle (fast, drives every path) and the real lung and
bone bundles (their own fields and prompts).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests

from oncofusion.serving.launcher import REPO_ROOT, LocalServer
from tests.server_client import in_decoded_cache
from tests.serving_fakes import make_datastore, make_fake_bundle, volume_with_blob, write_nifti

pytestmark = pytest.mark.server

REAL_BUNDLES = ("lung_nodule_clip", "bone_tumor_matrix")
MODELS = ("fake_nodule", *REAL_BUNDLES)
CLICK = [[12, 10, 8]]
MAX_UPLOAD_MB = 1
MAX_PARAMS_KB = 64


@dataclass(frozen=True)
class Case:
    """One request and what the server must answer."""

    name: str
    method: str
    path: str
    status: int
    detail: str
    query: dict[str, str] = field(default_factory=dict)
    params: Any = None  # a JSON value, or bytes/str sent as the raw 'params' field
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, url: str) -> requests.Response:
        multipart: dict[str, Any] = {k: (name, content) for k, (name, content) in self.files.items()}
        if self.params is not None:
            raw = self.params if isinstance(self.params, bytes | str) else json.dumps(self.params)
            multipart["params"] = (None, raw)
        for key, value in self.data.items():
            multipart[key] = (None, value)
        return requests.request(self.method, url + self.path, params=self.query, files=multipart or None,
                                headers=self.headers, timeout=60)


def _header_bomb() -> bytes:
    """A 2 KB gzip NIfTI whose header declares 1024x1024x512 float32 voxels (2 GiB decoded)."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.float32)
    header.set_zooms((0.5, 0.5, 0.5))
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 1024
    return gzip.compress(raw)


BOMB = _header_bomb()


def _small_label() -> bytes:
    """A valid 4x4x4 label: not the 24x20x16 grid of the fake studies."""
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    return gzip.compress(image.to_bytes())


SMALL_LABEL = _small_label()


def _infer_cases(model: str) -> list[Case]:
    path = f"/infer/{model}"
    case = "case_bright"

    def infer(name: str, status: int, detail: str, params: Any = None, query: dict | None = None, **kw) -> Case:
        return Case(f"{model}: {name}", "POST", path, status, detail, query={"image": case} if query is None else query,
                    params={"foreground": CLICK} if params is None else params, **kw)

    return [
        infer("absolute path as image", 422, "not an identifier", query={"image": "/etc/passwd"}),
        infer("relative traversal as image", 422, "not an identifier", query={"image": "../datastore/case_bright"}),
        infer("dot-dot as image", 422, "not an identifier", query={"image": ".."}),
        infer("unknown image id", 404, "not in the datastore", query={"image": "case_missing"}),
        infer("no image at all", 422, "no image given", query={}),
        infer("params not JSON", 422, "not valid JSON", params="{bad json"),
        infer("params a list", 422, "must be a JSON object", params=[1, 2]),
        infer("params null", 422, "must be a JSON object", params="null"),
        infer("params a string", 422, "must be a JSON object", params='"x"'),
        infer("params name another model", 422, "params.model", params={"model": "other", "foreground": CLICK}),
        infer("params redirect the image", 422, "may not set ['image']",
              params={"image": "/etc/passwd", "foreground": CLICK}),
        infer("params name an upload", 422, "may not set ['image_upload']",
              params={"image_upload": "/etc/passwd", "foreground": CLICK}),
        infer("label tag traversal", 422, "'label_tag'",
              params={"foreground": CLICK, "save_label": True, "label_tag": "../../../../outside/x"}),
        infer("unknown parameter", 422, "does not read parameter(s) ['zzz_unknown']",
              params={"foreground": CLICK, "zzz_unknown": 1}),
        infer("report over its limit", 413, "'params.report'", params={"foreground": CLICK, "report": "x" * 30_000}),
        infer("params over the field limit", 413, "field 'params'",
              params={"foreground": CLICK, "pad": ["y" * 1000] * (MAX_PARAMS_KB + 8)}),
        infer("params not UTF-8", 400, "not UTF-8", params=b'{"foreground": [[12, 10, 8]], "report": "\xe9"}'),
        infer("click outside the image", 422, "lies outside", params={"foreground": [[500, 10, 8]]}),
        infer("click not numeric", 422, "non-numeric", params={"foreground": [["a", 10, 8]]}),
        infer("click not finite", 422, "non-finite", params='{"foreground": [[NaN, 10, 8]]}'),
        infer("click of two coordinates", 422, "must have 3 coordinates", params={"foreground": [[1, 2]]}),
        infer("box malformed", 422, "'roi' must be", params={"roi": [1, 2, 3]}),
        infer("unknown form field", 422, "unknown form field", data={"extra": "1"}),
        infer("other images for unknown input", 422, "names unknown input",
              params={"foreground": CLICK, "images": {"pet": "case_dim"}}),
        infer("unknown session", 404, "session", query={"image": "", "session_id": "nosuchsession"}),
        infer("session id traversal", 422, "not an identifier", query={"session_id": "../x"}),
        infer("unknown output format", 422, "output", query={"image": case, "output": "zip"}),
        infer("cross-origin page", 403, "cross-origin", headers={"Origin": "http://elsewhere.example"}),
        infer("upload declaring a huge grid", 413, "1024x1024x512", query={},
              files={"file": ("bomb.nii.gz", BOMB)}),
        infer("upload over the size limit", 413, "over this server's limit",
              files={"file": ("big.nii.gz", b"0" * (MAX_UPLOAD_MB * 2**20 + 1))}),
    ]


OUTSIDE = "../../outside/x"
GENERAL_CASES = [
    Case("server log", "GET", "/logs/", 403, "administrative"),
    Case("GPU info", "GET", "/logs/gpu", 403, "administrative"),
    Case("dataset zip", "GET", "/datastore/dataset", 403, "administrative"),
    Case("delete a study", "DELETE", "/datastore/image", 403, "administrative", query={"id": "case_bright"}),
    Case("delete a label", "DELETE", "/datastore/label", 403, "administrative",
         query={"id": "case_bright", "tag": "final"}),
    Case("download weights", "GET", "/model/fake_nodule", 403, "administrative"),
    Case("upload weights", "PUT", "/model/fake_nodule", 403, "administrative", files={"file": ("m.pt", b"x")}),
    Case("delete weights", "DELETE", "/model/fake_nodule", 403, "administrative"),
    Case("reload", "POST", "/reload", 403, "administrative"),
    Case("forge image info", "PUT", "/datastore/image/info", 403, "administrative",
         query={"image": "case_bright"}, data={"info": json.dumps({"oncofusion_predictions": {}})}),
    Case("label tag traversal", "PUT", "/datastore/label", 422, "'tag'",
         query={"image": "case_bright", "tag": OUTSIDE}, files={"label": ("l.nii.gz", b"x")}),
    Case("label tag absolute", "PUT", "/datastore/label", 422, "'tag'",
         query={"image": "case_bright", "tag": "/tmp/x"}, files={"label": ("l.nii.gz", b"x")}),
    Case("label for traversal image", "PUT", "/datastore/label", 422, "'image'",
         query={"image": OUTSIDE}, files={"label": ("l.nii.gz", b"x")}),
    Case("label for unknown image", "PUT", "/datastore/label", 404, "not in the datastore",
         query={"image": "case_missing"}, files={"label": ("l.nii.gz", b"x")}),
    Case("label without file", "PUT", "/datastore/label", 422, "no 'label' file", query={"image": "case_bright"}),
    Case("label that is no image", "PUT", "/datastore/label", 415, "label", query={"image": "case_bright"},
         files={"label": ("l.nii.gz", b"not an image")}),
    Case("label on another grid", "PUT", "/datastore/label", 422, "send a label on the study's grid",
         query={"image": "case_bright"}, files={"label": ("l.nii.gz", SMALL_LABEL)}),
    Case("label params a list", "PUT", "/datastore/label", 422, "must be a JSON object",
         query={"image": "case_bright"}, params=[1], files={"label": ("l.nii.gz", b"x")}),
    Case("image id traversal", "PUT", "/datastore/image", 422, "'image'", query={"image": OUTSIDE},
         files={"file": ("a.nii.gz", b"x")}),
    Case("image file named dot-dot", "PUT", "/datastore/image", 422, "'image'", files={"file": ("..", b"x")}),
    Case("image params not JSON", "PUT", "/datastore/image", 422, "not valid JSON", query={"image": "new_case"},
         params="{", files={"file": ("a.nii.gz", b"x")}),
    Case("download by path", "GET", "/datastore/image", 422, "not an identifier", query={"image": "/etc/passwd"}),
    Case("download label by traversal", "GET", "/datastore/label", 422, "not an identifier",
         query={"label": "../x", "tag": "final"}),
    Case("info by traversal", "GET", "/datastore/image/info", 422, "not an identifier", query={"image": "../x"}),
    Case("info of unknown image", "GET", "/datastore/image/info", 404, "not in the datastore",
         query={"image": "case_missing"}),
    Case("listing in unknown format", "GET", "/datastore/", 400, "output must be", query={"output": "zip"}),
    Case("unknown model", "POST", "/infer/no_such_model", 404, "unknown model",
         query={"image": "case_bright"}, params={"foreground": CLICK}),
    Case("unknown route", "GET", "/no/such/route", 404, "no endpoint"),
    Case("wrong method", "DELETE", "/info/", 405, "not allowed"),
    Case("preflight from elsewhere", "OPTIONS", "/infer/fake_nodule", 403, "cross-origin",
         headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}),
]

CASES = [case for model in MODELS for case in _infer_cases(model)] + GENERAL_CASES


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its hash (the server's own log and lock file aside, and the decoded
    copies of stored volumes: a derived, size-bounded cache that a refused request may warm, never data)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", "server.log") and "__pycache__" not in p.parts
        and not in_decoded_cache(p.relative_to(root))
    }


def _uploads_in_tmp() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("oncofusion_upload_")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    bundles = root / "bundles"
    make_fake_bundle(bundles, "fake_nodule")
    for name in REAL_BUNDLES:
        (bundles / name).symlink_to(REPO_ROOT / "bundles" / name, target_is_directory=True)
    studies = make_datastore(root / "datastore")
    (root / "outside").mkdir()
    conf = {"bundles": str(bundles), "runs": str(root / "runs"), "max_upload_mb": str(MAX_UPLOAD_MB),
            "max_params_kb": str(MAX_PARAMS_KB)}
    with LocalServer(studies, root, conf) as live:
        yield {"url": live.url, "root": root, "log": live.log_path}


def test_corpus_has_over_100_cases():
    assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_request_is_refused_and_changes_nothing(server, case):
    before, uploads_before = _snapshot(server["root"]), _uploads_in_tmp()
    response = case.send(server["url"])
    assert response.status_code == case.status, response.text
    detail = response.json().get("detail")
    assert case.detail in json.dumps(detail), detail
    assert str(server["root"]) not in response.text  # no server path echoed
    assert _snapshot(server["root"]) == before
    assert _uploads_in_tmp() <= uploads_before


def test_segment_name_with_slash_is_a_name_not_a_path(server):
    params = {"foreground": CLICK, "label": "L1/L2 lesion"}
    response = requests.post(f"{server['url']}/infer/fake_nodule", params={"image": "case_bright", "output": "json"},
                             files={"params": (None, json.dumps(params))}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["class"] == "malignant"


def test_answers_carry_no_server_paths(server):
    url = server["url"]
    for answer in (requests.get(f"{url}/datastore/image/info", params={"image": "case_bright"}, timeout=30),
                   requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30),
                   requests.post(f"{url}/activelearning/random", json={}, timeout=30)):
        assert answer.status_code == 200, answer.text
        assert str(server["root"]) not in answer.text and '"/' not in answer.text


def test_configured_origin_only_gets_cors_grants(tmp_path):
    bundles = tmp_path / "bundles"
    make_fake_bundle(bundles, "fake_nodule")
    studies = make_datastore(tmp_path / "datastore")
    allowed = "http://viewer.example:3000"
    with LocalServer(studies, tmp_path, {"bundles": str(bundles), "cors_origins": allowed}) as live:
        granted = requests.get(f"{live.url}/info/", headers={"Origin": allowed}, timeout=30)
        same = requests.get(f"{live.url}/info/", headers={"Origin": live.url}, timeout=30)
        other = requests.get(f"{live.url}/info/", headers={"Origin": "http://elsewhere.example"}, timeout=30)
    assert granted.status_code == 200 and granted.headers["access-control-allow-origin"] == allowed
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    assert other.status_code == 403


def test_log_carries_no_parameters_or_identifiers(server, tmp_path):
    secrets = {"patient_name": "Doe^Jane", "mrn": "MRN-93417", "report": "Jane Doe, 1957-03-02, spiculated"}
    url = server["url"]
    label = write_nifti(tmp_path / "label.nii.gz", (volume_with_blob((12, 10, 8), 1.0) > 0).astype(np.uint8))
    answers = [
        requests.post(f"{url}/infer/fake_nodule", params={"image": "case_bright"}, timeout=60,
                      files={"params": (None, json.dumps({"foreground": CLICK, "report": secrets["report"]}))}),
        requests.post(f"{url}/infer/fake_nodule", params={"image": "case_bright"}, timeout=60,
                      files={"params": (None, json.dumps({"foreground": CLICK, **secrets}))}),
        requests.put(f"{url}/datastore/label", params={"image": "case_unlabelled", "tag": "final"}, timeout=60,
                     files={"label": ("label.nii.gz", label.read_bytes()), "params": (None, json.dumps(secrets))}),
        requests.post(f"{url}/activelearning/random", json={"client_id": secrets["patient_name"], **secrets},
                      timeout=60),
    ]
    assert [a.status_code for a in answers] == [200, 422, 200, 200], [a.text[:200] for a in answers]
    log = server["log"].read_text()
    assert "POST /infer/fake_nodule image=case_bright -> 200" in log  # the request line is there
    for value in secrets.values():
        assert value not in log
    # the operator's command line is echoed at start-up; after it, no file of the datastore is named
    served = log[log.index("oncofusion.access"):]
    assert f"{server['root']}/datastore/" not in served


def test_nan_literal_is_valid_for_the_corpus():
    # the 'click not finite' case relies on Python's JSON reading NaN: keep the corpus honest
    assert math.isnan(json.loads('{"a": NaN}')["a"])


def test_inference_runs_off_the_event_loop(tmp_path):
    """While a slow model runs, the server still answers ``/info``: the inference is on a worker thread."""
    import threading

    from tests.serving_fakes import make_slow_bundle

    delay_s = 4.0
    bundles = tmp_path / "bundles"
    make_slow_bundle(bundles, delay_s)
    studies = make_datastore(tmp_path / "datastore")
    with LocalServer(studies, tmp_path, {"bundles": str(bundles)}) as live:
        requests.get(f"{live.url}/info/", timeout=30)  # the predictor is built
        done: dict[str, float] = {}

        def slow_click() -> None:
            answer = requests.post(f"{live.url}/infer/slow", params={"image": "case_bright", "output": "json"},
                                   files={"params": (None, json.dumps({"foreground": CLICK}))}, timeout=60)
            assert answer.status_code == 200
            done["inference"] = time.monotonic()

        worker = threading.Thread(target=slow_click)
        worker.start()
        time.sleep(delay_s / 4)  # the inference has started
        info = requests.get(f"{live.url}/info/", timeout=60)
        done["info"] = time.monotonic()
        worker.join()
    assert info.status_code == 200
    assert done["info"] < done["inference"]  # answered while the model was still running
