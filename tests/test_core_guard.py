"""The server's guard pieces on their own: identifiers, the route policy, strict forms, the log filter,
token verification, path scrubbing. Property-based tests (hypothesis) for the request parsers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oncofusion.contract import InvalidRequest
from oncofusion.serving.auth import TokenVerifier
from oncofusion.serving.endpoints import _infer_request, scrub_paths
from oncofusion.serving.forms import check_text_sizes, json_object
from oncofusion.serving.identifiers import check_identifier, is_identifier
from oncofusion.serving.policy import access, role_satisfied
from oncofusion.serving.privacy import PrivacyFilter
from oncofusion.serving.request import check_known_fields, decode_param, parse_box, parse_points

# -- identifiers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["case_bright", "1.2.840.113619.2.55", "lung-0001", "a+b", "A" * 200])
def test_plain_ids_are_identifiers(value):
    assert check_identifier(value, "'image'") == value


@pytest.mark.parametrize("value", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", ".hidden", "a b", "a\x00b",
                                   "A" * 201, "x\n"])
def test_paths_and_oddities_are_not_identifiers(value):
    with pytest.raises(InvalidRequest, match="not an identifier"):
        check_identifier(value, "'image'")


def test_refused_path_is_not_echoed():
    with pytest.raises(InvalidRequest) as error:
        check_identifier("/data/Doe_Jane/ct", "'image'")
    assert "Doe_Jane" not in str(error.value)
    with pytest.raises(InvalidRequest, match="'x y'"):  # a non-path is shown, to help the user
        check_identifier("x y", "'image'")


@settings(derandomize=True)
@given(st.text(max_size=60))
def test_an_identifier_never_leaves_its_folder(value):
    if is_identifier(value):
        assert "/" not in value and "\\" not in value and not value.startswith(".") and value not in ("", "..")


# -- the route policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path,role", [
    ("GET", "/info", "user"), ("POST", "/infer/lung", "user"), ("GET", "/datastore/image", "user"),
    ("HEAD", "/datastore/image", "user"), ("PUT", "/datastore/label", "annotator"),
    ("PUT", "/datastore/image", "annotator"), ("POST", "/train/lung", "admin"), ("GET", "/docs", None),
    ("POST", "/activelearning/random", "user"), ("GET", "/proxy/dicom/qido/studies", "user"),
])
def test_routes_need_their_role(method, path, role):
    decision = access(method, path, auth_enabled=True)
    assert decision.allowed and decision.role == role


@pytest.mark.parametrize("method,path", [("GET", "/logs"), ("GET", "/datastore/dataset"), ("DELETE", "/datastore/image"),
                                         ("PUT", "/model/lung"), ("PUT", "/datastore/image/info"), ("POST", "/reload")])
def test_administrative_routes_are_off_without_authentication(method, path):
    off = access(method, path, auth_enabled=False)
    assert not off.allowed and off.status == 403 and "administrative" in off.reason
    on = access(method, path, auth_enabled=True)
    assert on.allowed and on.role == "admin"


def test_unknown_routes_and_methods():
    assert access("GET", "/nowhere", False).status == 404
    assert access("DELETE", "/info", False).status == 405
    assert access("OPTIONS", "/infer/lung", False).allowed  # CORS preflight reaches the CORS middleware


def test_roles_form_a_hierarchy():
    assert role_satisfied("user", ["admin"]) and role_satisfied("annotator", ["reviewer"])
    assert not role_satisfied("annotator", ["user"]) and not role_satisfied("user", ["unknown"])
    assert role_satisfied(None, [])


# -- forms and params ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [("{bad", "not valid JSON"), ("[1, 2]", "got list"), ("null", "got NoneType"),
                                          ('"x"', "got str"), ("3", "got int")])
def test_params_must_be_a_json_object(text, message):
    with pytest.raises(InvalidRequest, match=message):
        json_object(text, "params")


def test_blank_params_are_an_empty_object():
    assert json_object(None, "params") == {} and json_object("  ", "params") == {}
    assert json_object('{"a": 1}', "params") == {"a": 1}


def test_text_over_its_limit_is_named():
    check_text_sizes({"report": "x" * 10}, max_chars=10)
    with pytest.raises(InvalidRequest, match="'params.report' is 11 characters") as error:
        check_text_sizes({"report": "x" * 11}, max_chars=10)
    assert error.value.status_code == 413


def test_params_cannot_redirect_the_request():
    with pytest.raises(InvalidRequest, match=r"may not set \['image'\]"):
        _infer_request("lung", {"image": "/etc/passwd"})
    with pytest.raises(InvalidRequest, match="params.model"):
        _infer_request("lung", {"model": "bone"})
    with pytest.raises(InvalidRequest, match="'label_tag'"):
        _infer_request("lung", {"label_tag": "../x"})
    request = _infer_request("lung", {"label": "L1/L2 lesion", "model": "lung", "foreground": [[1, 2, 3]]})
    assert request == {"label_name": "L1/L2 lesion", "model": "lung", "foreground": [[1, 2, 3]]}


def test_unknown_fields_are_listed():
    check_known_fields({"foreground": [[1, 2, 3]], "age": 3, "slice": 2, "result_extension": ".nrrd"}, {"age"}, "bone")
    with pytest.raises(InvalidRequest, match=r"\['sex', 'zz'\]; it reads: age"):
        check_known_fields({"sex": "F", "zz": 1, "age": 3}, {"age"}, "bone")


def test_answers_lose_absolute_paths_only():
    answer = {"path": "/data/Doe_Jane/ct.nii.gz", "id": "ct", "list": ["/a/b/", "rel/x"], "n": 3}
    assert scrub_paths(answer) == {"path": "ct.nii.gz", "id": "ct", "list": ["b", "rel/x"], "n": 3}


# -- the log filter ------------------------------------------------------------------------------------


def _record(message: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("monailabel", logging.INFO, __file__, 1, message, args, exc_info)


def test_parameter_dumps_are_blanked():
    record = _record("Infer Request: %s", {"patient_name": "Doe^Jane"})
    assert PrivacyFilter(["/data/studies"]).filter(record)
    assert record.getMessage() == "Infer Request: <redacted>"


def test_datastore_paths_are_redacted_in_messages_and_tracebacks():
    privacy = PrivacyFilter(["/data/studies"])
    record = _record("Adding Image: ct => /data/studies/Doe_Jane/ct.nii.gz; ok")
    privacy.filter(record)
    assert record.getMessage() == "Adding Image: ct => <datastore>; ok"
    try:
        raise FileNotFoundError("/data/studies/Doe_Jane/ct.nii.gz")
    except FileNotFoundError:
        record = _record("failed", exc_info=sys.exc_info())
    privacy.filter(record)
    assert "Doe_Jane" not in record.exc_text and "<datastore>" in record.exc_text
    untouched = _record("served /infer/lung in 0.2s")
    privacy.filter(untouched)
    assert untouched.getMessage() == "served /infer/lung in 0.2s"


# -- tokens --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, public


def _verifier(public: str) -> TokenVerifier:
    return TokenVerifier(public, {"monailabel-user": "user", "monailabel-admin": "admin"})


def test_token_roles_are_mapped(keys):
    key, public = keys
    token = jwt.encode({"preferred_username": "dr", "exp": time.time() + 60,
                        "realm_access": {"roles": ["monailabel-admin", "offline_access"]}}, key, algorithm="RS256")
    assert _verifier(public).verify(f"Bearer {token}") == ("dr", ["admin"])


@pytest.mark.parametrize("header,message", [(None, "authentication required"), ("Basic abc", "must be 'Bearer"),
                                            ("Bearer ", "must be 'Bearer"), ("Bearer x.y.z", "not valid")])
def test_malformed_authorization_is_401(keys, header, message):
    with pytest.raises(InvalidRequest, match=message) as error:
        _verifier(keys[1]).verify(header)
    assert error.value.status_code == 401


def _hmac_token(claims: dict, secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_symmetric_and_unexpiring_tokens_are_refused(keys):
    _, public = keys
    forged = _hmac_token({"exp": time.time() + 60, "realm_access": {"roles": ["monailabel-admin"]}},
                         public.encode())  # the classic forgery: the public key used as an HMAC secret
    with pytest.raises(InvalidRequest, match="not valid"):
        _verifier(public).verify(f"Bearer {forged}")
    eternal = jwt.encode({"realm_access": {"roles": ["monailabel-admin"]}}, keys[0], algorithm="RS256")
    with pytest.raises(InvalidRequest, match="not valid"):
        _verifier(public).verify(f"Bearer {eternal}")


# -- request parsers, property-based -------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=12)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(JSON, st.sampled_from([2, 3]))
def test_parsers_answer_any_json_with_points_or_a_clear_refusal(value, dims):
    for parse in (parse_points, parse_box):
        try:
            parsed = parse(value, "foreground", dims)
        except InvalidRequest as e:
            assert str(e)
            continue
        if parse is parse_points:
            assert all(len(p) == dims and all(isinstance(c, float) for c in p) for p in parsed)
        elif parsed is not None:
            lo, hi = parsed
            assert all(a <= b for a, b in zip(lo, hi, strict=True))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=30))
@example("NaN")  # found by hypothesis: NaN != NaN
def test_decode_param_reads_json_text_or_refuses_it(text):
    try:
        value = decode_param(text, "roi")
    except InvalidRequest as e:
        assert "not valid JSON" in str(e)
    else:  # compared as JSON text: NaN is a valid JSON-ish literal and NaN != NaN
        assert value is None if not text.strip() else json.dumps(value) == json.dumps(json.loads(text))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(-5, 40), st.integers(-5, 40), st.integers(-5, 40)), min_size=1, max_size=4))
def test_integer_clicks_round_trip(points):
    assert parse_points([list(p) for p in points]) == [tuple(float(c) for c in p) for p in points]
