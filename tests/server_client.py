"""Requests as 3D Slicer's MONAILabel module sends them, and its multipart answers read back."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from oncofusion.serving.infer_task import DECODED_DIR


def infer(url: str, model: str, image: str, params: dict) -> requests.Response:
    """``POST /infer`` as Slicer sends it: the params as a JSON form field, the label back as multipart."""
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "all"}, timeout=300,
                         files={"params": (None, json.dumps(params))})


def answer_of(response: requests.Response, tmp_path: Path) -> tuple[dict, np.ndarray]:
    """The JSON result and the label of a multipart ``output=all`` answer."""
    assert response.status_code == 200, response.text
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    parts = MultipartDecoder.from_response(response).parts
    result = json.loads(next(p.text for p in parts if b"json" in p.headers.get(b"Content-Type", b"")))
    label_part = next(p for p in parts if b"json" not in p.headers.get(b"Content-Type", b""))
    label_file = tmp_path / "label.nii.gz"
    label_file.write_bytes(label_part.content)
    return result, np.asarray(nib.load(label_file).dataobj)


def in_decoded_cache(path: Path) -> bool:
    """Whether ``path`` lies in the server's decoded-volume cache, a copy being written included (hidden
    staging folders inside it): derived data that any request for a study may warm, never stored data."""
    parts, cache = Path(path).parts, DECODED_DIR.parts
    return any(parts[i:i + len(cache)] == cache for i in range(len(parts) - len(cache) + 1))
