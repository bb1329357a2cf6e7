"""Turn a MONAI Label infer request into a :class:`Roi` and the fields a predictor reads.

What 3D Slicer's MONAI Label plugin sends for a deepgrow model (``MONAILabel.py``, ``onClickDeepgrow``):

- ``foreground``: ``[[i, j, k], ...]`` integer voxel indices of the clicks (RAS -> IJK, rounded);
- ``background``: the same for negative clicks (kept in ``Roi.background`` for models that use them);
- ``roi``: a box as ``[i0, i1, j0, j1, k0, k1]``, corners mapped RAS -> IJK one by one, so an axis
  flipped by the image orientation arrives with ``i0 > i1``;
- ``label``: the *name* of the Slicer segment. The ``/infer`` endpoint also stores the path of an
  uploaded label file under ``label``; only an existing file is read as a mask.

Parameters may also arrive as JSON strings (``"[[1, 2, 3]]"``) from clients that form-encode them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.contract import PROMPT_KINDS, InvalidRequest, Roi
from oncofusion.io.readers import NIFTI_SUFFIXES, read_volume

logger = logging.getLogger(__name__)

Point = tuple[float, ...]

#: request keys that belong to MONAI Label or to the ROI, not to the model
RESERVED_KEYS = frozenset(
    {
        "model",
        "image",
        "image_id",
        "description",
        "device",
        "client_id",
        "save_label",
        "label_tag",
        "result_extension",
        "result_dtype",
        "result_compress",
        "session",
        "session_id",
        "timeout",
        "output",
        "logging",
        "foreground",
        "background",
        "images",
        "roi",
        "label",
        "label_name",
        "image_upload",
    }
)

#: parameters 3D Slicer and OHIF send for their own bookkeeping: accepted and not passed to a model
CLIENT_KEYS = frozenset({"slice", "reset_state", "restore_label_idx", "label_info", "largest_cc", "client_id"})

#: sidecar keys that never reach a predictor: ``label``/``label_name`` are the training target (the
#: answer), ``bundle`` says which bundle trains on the study, the rest is the ROI used for training,
#: while at inference the ROI is the user's click.
SIDECAR_PRIVATE_KEYS = frozenset({"label", "label_name", "center_ijk", "center_mm", "roi", "foreground", "bundle"})


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _fmt_point(point: Sequence[float]) -> str:
    return "(" + ", ".join(_fmt(v) for v in point) + ")"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def decode_param(value: Any, name: str) -> Any:
    """Accept a parameter either as JSON-decoded data or as a JSON string; a blank string is "not given"
    (form clients send untouched fields as ``""``)."""
    if isinstance(value, str | bytes):
        text = value.decode() if isinstance(value, bytes) else value
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"'{name}' is not valid JSON: {text[:80]!r}") from e
    return value


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidRequest(f"'{name}' {where} has a non-numeric coordinate {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequest(f"'{name}' {where} has a non-finite coordinate {value!r}")
    return value


def _is_sequence(value: Any) -> bool:
    return isinstance(value, list | tuple)


def _axes(dims: int) -> str:
    return "(" + ", ".join("ijk"[:dims]) + ")"


def parse_points(value: Any, name: str = "foreground", dims: int = 3) -> list[Point]:
    """``[[i, j(, k)], ...]`` or a single point (also as a JSON string) -> list of ``dims``-D points."""
    value = decode_param(value, name)
    if value is None:
        return []
    if not _is_sequence(value):
        raise InvalidRequest(f"'{name}' must be a point {_axes(dims)} or a list of points, got {value!r}")
    if len(value) and not any(_is_sequence(v) for v in value):
        value = [value]  # a single point
    points: list[Point] = []
    for n, point in enumerate(value):
        where = f"point {n}"
        if not _is_sequence(point) or len(point) != dims:
            raise InvalidRequest(
                f"'{name}' {where} must have {dims} coordinates {_axes(dims)} on this {dims}D image, got {point!r}"
            )
        points.append(tuple(_number(v, name, where) for v in point))
    return points


def parse_box(value: Any, name: str = "roi", dims: int = 3) -> tuple[Point, Point] | None:
    """A box as two corners ``[[i0, j0(, k0)], [i1, j1(, k1)]]`` or Slicer's flat ``[i0, i1, j0, j1(, k0, k1)]``.

    Corners are sorted per axis, because Slicer maps the RAS corners to IJK independently.
    """
    value = decode_param(value, name)
    if value is None or (_is_sequence(value) and len(value) == 0):
        return None
    axes = "ijk"[:dims]
    usage = (f"'{name}' must be [[{', '.join(a + '0' for a in axes)}], [{', '.join(a + '1' for a in axes)}]] or "
             f"[{', '.join(a + c for a in axes for c in '01')}] on this {dims}D image, got {value!r}")
    if not _is_sequence(value):
        raise InvalidRequest(usage)
    if len(value) == 2 and all(_is_sequence(c) and len(c) == dims for c in value):
        a = [_number(v, name, "corner") for v in value[0]]
        b = [_number(v, name, "corner") for v in value[1]]
    elif len(value) == 2 * dims and not any(_is_sequence(v) for v in value):
        flat = [_number(v, name, "box") for v in value]
        a, b = flat[0::2], flat[1::2]
    else:
        raise InvalidRequest(usage)
    lo = tuple(min(x, y) for x, y in zip(a, b, strict=True))
    hi = tuple(max(x, y) for x, y in zip(a, b, strict=True))
    return lo, hi


def check_inside(points: Sequence[Point], shape: Sequence[int]) -> None:
    """Reject a click that does not land on a voxel (indices round to 0..size-1)."""
    for point in points:
        if any(not (0 <= math.floor(p + 0.5) <= s - 1) for p, s in zip(point, shape, strict=True)):
            raise InvalidRequest(f"ROI point {_fmt_point(point)} lies outside image {_fmt_shape(shape)}")


def clip_box(box: tuple[Point, Point], shape: Sequence[int]) -> tuple[Point, Point]:
    """Clip a box to the image (users draw loose boxes); a box that misses the image is an error."""
    lo, hi = box
    if any(h < -0.5 or lo_ > s - 0.5 for lo_, h, s in zip(lo, hi, shape, strict=True)):
        raise InvalidRequest(
            f"ROI box {_fmt_point(lo)}-{_fmt_point(hi)} lies outside image {_fmt_shape(shape)}"
        )
    lo_c = tuple(float(min(max(v, 0), s - 1)) for v, s in zip(lo, shape, strict=True))
    hi_c = tuple(float(min(max(v, 0), s - 1)) for v, s in zip(hi, shape, strict=True))
    return lo_c, hi_c


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.lower().endswith((*NIFTI_SUFFIXES, ".nrrd", ".png"))


def read_mask(
    value: Any, shape: Sequence[int], reader: Callable[..., Any] = read_volume
) -> np.ndarray | None:
    """Read ``label`` as a mask when it is a file; a Slicer segment name is not a mask and gives None.

    ``reader`` is the primary image's reader: a mask has the image's grid; any channel > 0 is inside.
    """
    if not isinstance(value, str) or not value:
        return None
    if not os.path.isfile(value):
        if _looks_like_path(value):
            raise InvalidRequest(f"label mask file '{Path(value).name}' not found", 400)
        return None  # the Slicer segment name
    mask = reader(value)
    mask_shape = tuple(mask.shape[1:])
    if mask_shape != tuple(shape):
        raise InvalidRequest(
            f"label mask '{Path(value).name}' has shape {_fmt_shape(mask_shape)} but the image is "
            f"{_fmt_shape(shape)}: send a mask on the image grid"
        )
    mask_np = (mask > 0).any(dim=0).cpu().numpy().astype(np.uint8)
    if not mask_np.any():
        raise InvalidRequest(
            f"label mask '{Path(value).name}' is empty: draw the lesion or send a foreground point"
        )
    return mask_np


#: the request option that picks the frame of a cine; a 2D model's clients may also give it as a click's k
FRAME_OPTION = "frame"


def _on_frame(value: Any, name: str, frames: set[int]) -> Any:
    """Points ``[i, j, k]`` -> ``[i, j]``, recording each ``k`` in ``frames``; 2D points pass unchanged."""
    points = decode_param(value, name)
    if not _is_sequence(points) or not points:
        return value
    single = not any(_is_sequence(p) for p in points)
    flat = []
    for point in [points] if single else points:
        if _is_sequence(point) and len(point) == 3:
            frames.add(math.floor(_number(point[2], name, "point's k (frame)") + 0.5))
            point = list(point[:2])
        flat.append(point)
    return flat[0] if single else flat


def _box_on_frame(value: Any, frames: set[int]) -> Any:
    """A 3D box (two ``[i, j, k]`` corners or Slicer's flat ``[i0, i1, j0, j1, k0, k1]``) -> its 2D box,
    recording the frame(s) it spans."""
    box = decode_param(value, "roi")
    if not _is_sequence(box):
        return value
    if len(box) == 2 and all(_is_sequence(c) and len(c) == 3 for c in box):
        frames.update(math.floor(_number(c[2], "roi", "corner's k (frame)") + 0.5) for c in box)
        return [list(c[:2]) for c in box]
    if len(box) == 6 and not any(_is_sequence(v) for v in box):
        frames.update(math.floor(_number(v, "roi", "k (frame)") + 0.5) for v in box[4:])
        return list(box[:4])
    return value


def prompt_on_frame(request: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A 2D model's request with its prompt on the frame grid, and the frame the prompt lies on.

    Slicer sends a ``dimension: 2`` model every click as ``[i, j, k]`` with ``k`` the slice it was placed
    on, which for a cine loaded as a volume is the frame. The frame is that ``k`` (``None`` when the client
    sent ``[i, j]``); clicks on different frames, or a ``frame`` option that contradicts them, are refused
    rather than answered on a frame the user did not look at.
    """
    frames: set[int] = set()
    flat = dict(request)
    for name in ("foreground", "background"):
        if request.get(name) not in (None, "", [], "[]"):
            flat[name] = _on_frame(request[name], name, frames)
    if request.get("roi") not in (None, "", [], "[]"):
        flat["roi"] = _box_on_frame(request["roi"], frames)
    if len(frames) > 1:
        raise InvalidRequest(f"the prompt lies on frames {sorted(frames)}: place every click and the box on one frame")
    prompt_frame = next(iter(frames), None)
    asked = request.get(FRAME_OPTION)
    if asked in (None, ""):
        return flat, prompt_frame
    if prompt_frame is not None and str(asked).strip() != str(prompt_frame):
        raise InvalidRequest(f"'{FRAME_OPTION}' is {asked} but the prompt was placed on frame {prompt_frame}")
    return flat, asked


#: prompt kinds as a user names them
KIND_NAMES = {"points": "clicks", "box": "a box", "mask": "a mask", "background": "negative (background) clicks"}


def parse_roi(
    request: Mapping[str, Any], shape: Sequence[int], reader: Callable[..., Any] = read_volume,
    kinds: Sequence[str] = PROMPT_KINDS,
) -> Roi:
    """Build the :class:`Roi` of a request on an image of spatial ``shape``, validating every part.

    ``kinds``: the prompt kinds the model accepts; a prompt of another kind is refused, not ignored.
    """
    dims = len(shape)
    given = {"points": request.get("foreground"), "box": request.get("roi"), "background": request.get("background")}
    refused = [kind for kind, value in given.items() if kind not in kinds and value not in (None, [], "", "[]")]
    if refused:
        accepted = ", ".join(KIND_NAMES[k] for k in kinds) or "no prompt"
        raise InvalidRequest(f"this model does not use {' or '.join(KIND_NAMES[k] for k in refused)}; "
                             f"it accepts {accepted}")
    points = parse_points(request.get("foreground"), "foreground", dims)
    check_inside(points, shape)
    background = parse_points(request.get("background"), "background", dims)
    check_inside(background, shape)
    box = parse_box(request.get("roi"), "roi", dims)
    if box is not None:
        box = clip_box(box, shape)
    mask = read_mask(request.get("label"), shape, reader) if "mask" in kinds else None
    if not points and box is None and mask is None:
        axes = "ijk"[:dims]
        examples = {"points": f"a 'foreground' point [[{', '.join(axes)}]]",
                    "box": f"an 'roi' box [{', '.join(a + c for a in axes for c in '01')}]",
                    "mask": "a 'label' mask file"}
        raise InvalidRequest("no lesion given: send " + ", ".join(examples[k] for k in kinds if k in examples))
    return Roi(points=points, box=box, mask=mask, background=background)


def request_fields(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request parameters meant for the model (MONAI Label's, the clients' own keys and the ROI removed)."""
    return {k: v for k, v in request.items() if k not in RESERVED_KEYS | CLIENT_KEYS}


def check_known_fields(request: Mapping[str, Any], known: Iterable[str], model: str) -> None:
    """Refuse parameters the model does not read (a typo, or another model's form), listing them: ignored
    silently, a misspelt clinical value would leave the prediction on the sidecar's or the default."""
    known = set(known)
    unknown = sorted(k for k in request_fields(request) if k not in known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise InvalidRequest(f"model '{model}' does not read parameter(s) {unknown}; it reads: {accepted}")


def sidecar_path(sidecar_dir: str | os.PathLike, image_id: str) -> Path | None:
    """``<sidecar_dir>/<image_id>.json``; None for ids that are not plain names (no path traversal)."""
    if not image_id or image_id in (".", "..") or "/" in image_id or "\\" in image_id:
        return None
    return Path(sidecar_dir) / f"{image_id}.json"


def read_sidecar(sidecar_dir: str | os.PathLike | None, image_id: str | None) -> dict[str, Any]:
    """The per-study JSON (report, clinical fields, training label) or ``{}`` when the study has none."""
    if not sidecar_dir or not image_id:
        return {}
    path = sidecar_path(sidecar_dir, image_id)
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"sidecar '{path.name}' is not valid JSON: {e}: fix or remove it") from e
    if not isinstance(data, dict):
        raise InvalidRequest(f"sidecar '{path.name}' must hold a JSON object, got {type(data).__name__}")
    return data


def option_default(value: Any) -> Any:
    """MONAI Label's convention for a config option: a list offers choices and the first is the default."""
    return value[0] if isinstance(value, list) and value else value


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def merge_fields(
    request: Mapping[str, Any], sidecar: Mapping[str, Any], defaults: Mapping[str, Any],
    target_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Request parameters win, the study's sidecar fills what the request lacks, then option defaults.

    A blank request value (``None`` or ``""``) counts as lacking: Slicer sends every option of the form,
    and an untouched empty cell must not hide the value recorded in the study's sidecar. The sidecar's
    training answer (:data:`SIDECAR_PRIVATE_KEYS` and the model's ``target_keys``, e.g. a survival
    time and event) never reaches the predictor.
    """
    private = SIDECAR_PRIVATE_KEYS | set(target_keys)
    fields = {k: option_default(v) for k, v in defaults.items()}
    fields.update({k: v for k, v in sidecar.items() if k not in private})
    fields.update({k: v for k, v in request_fields(request).items() if not _blank(v) or k not in fields})
    return fields


def field_sources(
    request: Mapping[str, Any], sidecar: Mapping[str, Any], defaults: Mapping[str, Any],
    target_keys: Sequence[str] = (), known: Collection[str] | None = None,
) -> dict[str, str]:
    """Where each merged field came from (``request``, ``sidecar`` or ``default``), by the rules of
    :func:`merge_fields`: recorded with every result, so a stored prediction says what it was computed on.
    ``known``: the fields the model reads; a sidecar's bookkeeping (case id, frames...) is not reported."""
    private = SIDECAR_PRIVATE_KEYS | set(target_keys)
    sources = {k: "default" for k in defaults}
    sources.update({k: "sidecar" for k in sidecar if k not in private})
    sources.update({k: "request" for k, v in request_fields(request).items() if not _blank(v) or k not in sources})
    return sources if known is None else {k: v for k, v in sources.items() if k in known}


def _same_value(a: Any, b: Any) -> bool:
    """Equal as a user means it: Slicer sends every option as text (``"15"`` is the sidecar's ``15``)."""
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def contradictions(request: Mapping[str, Any], sidecar: Mapping[str, Any], target_keys: Sequence[str] = ()) -> list[str]:
    """Warnings for request values that differ from the study's record: Slicer keeps an edited form across
    studies, so a value typed for the previous patient can arrive with this one."""
    private = SIDECAR_PRIVATE_KEYS | set(target_keys)
    return [
        f"'{k}' sent as {v!r} but the study records {sidecar[k]!r}: the value sent was used; check it is this "
        "patient's"
        for k, v in sorted(request_fields(request).items())
        if k in sidecar and k not in private and not _blank(v) and not _blank(sidecar[k])
        and not _same_value(v, sidecar[k])
    ]
