"""MONAI Label's auth mode with a locally held public key: no identity server is reachable or needed.

Tokens are signed here with a key pair made for the test, as a site's identity provider would sign
them; the server holds only the public key (``--conf auth_public_key``).
"""

from __future__ import annotations

import json
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from oncofusion.serving.launcher import LocalServer
from tests.serving_fakes import make_datastore, make_fake_bundle

pytestmark = pytest.mark.server

ROLE = {"user": "monailabel-user", "annotator": "monailabel-annotator", "admin": "monailabel-admin"}


def _key_pair() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


def _token(key, roles: list[str], expires_in: float = 600) -> str:
    claims = {"preferred_username": "reader", "exp": int(time.time() + expires_in),
              "realm_access": {"roles": roles}}
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    key, public = _key_pair()
    (root / "public.pem").write_bytes(public)
    bundles = root / "bundles"
    make_fake_bundle(bundles, "fake_nodule")
    studies = make_datastore(root / "datastore")
    conf = {"bundles": str(bundles), "auth_public_key": str(root / "public.pem")}
    # an unreachable realm: any attempt to fetch a key from it would fail the requests below
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": "http://127.0.0.1:9/realms/none"}
    with LocalServer(studies, root, conf, env=env) as live:
        yield {"url": live.url, "key": key}


def _get(server, path: str, token: str | None = None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(server["url"] + path, headers=headers, timeout=30, **kw)


def _infer(server, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{server['url']}/infer/fake_nodule", params={"image": "case_bright", "output": "json"},
                         files={"params": (None, json.dumps({"foreground": [[12, 10, 8]]}))}, headers=headers,
                         timeout=60)


def test_anonymous_calls_are_refused(server):
    assert _get(server, "/info/").status_code == 401
    assert _infer(server, None).status_code == 401


def test_bad_tokens_are_refused(server):
    other_key, _ = _key_pair()
    assert _get(server, "/info/", _token(other_key, [ROLE["user"]])).status_code == 401  # signed elsewhere
    expired = _get(server, "/info/", _token(server["key"], [ROLE["user"]], expires_in=-60))
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    assert _get(server, "/info/", "not-a-token").status_code == 401


def test_user_reads_and_predicts_but_cannot_write(server):
    token = _token(server["key"], [ROLE["user"]])
    assert _get(server, "/info/", token).status_code == 200
    answer = _infer(server, token)
    assert answer.status_code == 200 and answer.json()["class"] == "malignant"
    put = requests.put(f"{server['url']}/datastore/label", params={"image": "case_bright"},
                       files={"label": ("l.nii.gz", b"x")}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert put.status_code == 403 and "annotator" in put.json()["detail"]
    assert _get(server, "/logs/", token).status_code == 403


def test_token_without_a_known_role_is_refused(server):
    answer = _get(server, "/info/", _token(server["key"], ["some-other-role"]))
    assert answer.status_code == 403 and "'user' role" in answer.json()["detail"]


def test_admin_reaches_administrative_endpoints_and_everything_below(server):
    token = _token(server["key"], [ROLE["admin"]])
    assert _get(server, "/logs/", token, params={"text": "true"}).status_code == 200
    assert _infer(server, token).status_code == 200  # the stock route's own role check agrees
