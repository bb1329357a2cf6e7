"""What the OncoFusion Slicer module shows and sends, without Slicer.

The MONAILabel module shows a deepgrow result as a segment under the user's own name and prints the
JSON to the Python console. This module sits beside it and, for the study on screen:

- reads the latest result of each model from the server (``/datastore/image/info``, where every
  prediction is stored) and lays it out as table rows: probabilities, semantic features, per-field
  contributions, attention, where each field came from, warnings;
- holds the clinical form *bound to the study*: values typed for one patient are cleared when the
  study changes (the MONAILabel module keeps its option form across studies, so a prediction was once
  computed with the previous patient's sex and age); its fields are the model's ``/info`` options
  (:func:`form_fields`), and it is sent only with a prediction on that study (:meth:`ServerResults.predict`,
  on the model's ``<bundle>_summary`` task, which predicts on the lesion already known for the study);
- colours the explanation overlay's levels (value 1 = the region shown, higher values = weaker levels).
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PREDICTIONS_KEY = "oncofusion_predictions"
#: colours (RGB 0..1) of overlay values 1, 2, 3...: the region shown strongest, weaker levels paler
LEVEL_COLOURS = ((0.90, 0.10, 0.10), (0.95, 0.55, 0.10), (0.95, 0.85, 0.30), (0.60, 0.80, 0.95))

Fetch = Callable[[str, Mapping[str, str]], bytes]
Post = Callable[[str, bytes, Mapping[str, str]], bytes]


def http_get(url: str, headers: Mapping[str, str]) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def http_post(url: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.read()


def params_form(params: Mapping[str, Any]) -> tuple[bytes, str]:
    """``params`` as the one multipart field MONAI Label's ``/infer`` reads, and its content type (a random
    boundary: a report's text cannot end the part early)."""
    boundary = f"oncofusion-{uuid.uuid4().hex}"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n"
            f"{json.dumps(dict(params))}\r\n--{boundary}--\r\n")
    return body.encode("utf-8"), f"multipart/form-data; boundary={boundary}"


def error_message(error: Exception, limit: int = 500) -> str:
    """What the server said: the ``detail`` of an HTTP error's JSON body, else the body, else the error."""
    body = error.read() if hasattr(error, "read") else b""
    try:
        detail = json.loads(body).get("detail") if body else None
    except (ValueError, AttributeError):
        detail = None
    return str(detail or body.decode("utf-8", errors="replace") or error)[:limit]


def form_fields(config: Mapping[str, Any]) -> dict[str, tuple[str, ...] | None]:
    """The form of a model's ``/info`` options: a list offers its choices (a blank one first: the study's
    record applies), anything else is typed (``None``)."""
    return {name: tuple(str(v) for v in value if str(v)) if isinstance(value, list) else None
            for name, value in config.items()}


@dataclass
class ServerResults:
    """The latest stored result of every model for one study, from a MONAI Label server running OncoFusion."""

    server_url: str
    token: str | None = None
    fetch: Fetch = http_get
    post: Post = http_post

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def models(self) -> dict[str, dict[str, Any]]:
        """The server's models as ``/info`` lists them (type, dimension, labels, options)."""
        info = json.loads(self.fetch(f"{self.server_url.rstrip('/')}/info/", self._headers()) or b"{}")
        return dict(info.get("models") or {})

    def predict(self, model: str, image_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run ``model`` on ``image_id`` with ``params`` (the study's form); returns the JSON result."""
        query = urllib.parse.urlencode({"image": image_id, "output": "json"})
        body, content_type = params_form(params)
        answer = self.post(f"{self.server_url.rstrip('/')}/infer/{urllib.parse.quote(model)}?{query}", body,
                           {**self._headers(), "Content-Type": content_type})
        return json.loads(answer)

    def latest(self, image_id: str) -> dict[str, dict[str, Any]]:
        """``{model: result}`` for ``image_id`` (empty when nothing was predicted yet)."""
        query = urllib.parse.urlencode({"image": image_id})
        body = self.fetch(f"{self.server_url.rstrip('/')}/datastore/image/info?{query}", self._headers())
        info = json.loads(body or b"{}")
        return dict(info.get(PREDICTIONS_KEY) or {})


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def result_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """One result as (section, item, value) rows, in the order a reader looks for them."""
    rows: list[tuple[str, str, str]] = []
    for name, probability in (result.get("class_probabilities") or {}).items():
        rows.append(("probability", name, _number(probability)))
    for feature, options in (result.get("semantic_features") or {}).items():
        best = max(options, key=options.get)
        rows.append(("semantic feature", feature, f"{best} ({options[best]:.2f})"))
    for name, contribution in (result.get("clinical_contributions") or {}).items():
        rows.append(("field contribution", f"{name} = {contribution.get('value')}",
                     f"{contribution.get('log_odds', 0.0):+.3f} log-odds"))
    for view, weight in (result.get("view_attention") or {}).items():
        rows.append(("attention", str(view), _number(weight)))
    for name, source in (result.get("field_sources") or {}).items():
        rows.append(("field source", name, source))
    for warning in result.get("warnings") or []:
        rows.append(("warning", "", warning))
    rows.append(("model", str(result.get("model", "")), str(result.get("model_version", ""))))
    return rows


@dataclass
class StudyForm:
    """The clinical form of the study on screen: edits belong to that study only."""

    fields: tuple[str, ...]
    study: str | None = None
    values: dict[str, str] = field(default_factory=dict)

    def show_study(self, image_id: str) -> bool:
        """Switch to ``image_id``; the previous study's edits are dropped. True when the study changed."""
        if image_id == self.study:
            return False
        self.study, self.values = image_id, {}
        return True

    def edit(self, name: str, value: str) -> None:
        if self.study is None:
            raise ValueError("open a study before filling its form")
        if name not in self.fields:
            raise KeyError(f"unknown field '{name}'; the form has {list(self.fields)}")
        if str(value).strip():
            self.values[name] = str(value).strip()
        else:
            self.values.pop(name, None)  # cleared: the study's record applies

    def params(self, image_id: str) -> dict[str, str]:
        """The values to send with a request on ``image_id``: only this study's own edits."""
        return dict(self.values) if image_id == self.study else {}


def level_colours(label_names: Mapping[str, int]) -> dict[int, tuple[float, float, float]]:
    """Colour per overlay value: value 1 (the region shown) strongest, then paler for weaker levels."""
    return {value: LEVEL_COLOURS[min(value, len(LEVEL_COLOURS)) - 1] for value in sorted(label_names.values())
            if value >= 1}
