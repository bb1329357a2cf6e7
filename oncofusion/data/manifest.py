"""Case manifests: the JSON index that ties images, nodule centres, labels and report text together.

A manifest (written by ``sample_data.generate_lung``) looks like::

    {"description": ..., "seed": 0, "num_folds": 5,
     "cases": [{"case_id", "patient_id", "image": "datastore/<case_id>.nii.gz", "center_mm", "label",
                "report", "impression", "fold", ...}, ...]}

Image paths are relative to the manifest so that the folder can be moved. Bundle configs call
:func:`datalist`, e.g. ``"$oncofusion.data.manifest.datalist(@manifest, exclude_folds=[@fold])"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

REQUIRED_CASE_KEYS: tuple[str, ...] = (
    "case_id",
    "patient_id",
    "image",
    "center_mm",
    "label",
    "impression",
    "fold",
)


def _read_json(path: Path) -> dict:
    """Read the manifest file, turning the usual failures into errors that name it."""
    if not path.is_file():
        raise ValueError(
            f"manifest {path} does not exist; generate one with `python -m sample_data.generate_lung`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "cases" not in data:
        raise ValueError(f"manifest {path} lacks the key 'cases'")
    if not isinstance(data["cases"], list):
        raise ValueError(f"manifest {path}: 'cases' must be a list")
    return data


def _check_case(case: object, index: int, path: Path,
                required_keys: Iterable[str] = REQUIRED_CASE_KEYS) -> None:
    """Every case must carry the keys the bundles read, with a three-number centre."""
    if not isinstance(case, dict):
        raise ValueError(f"manifest {path}: case {index} is not an object")
    name = case.get("case_id", f"#{index}")
    for key in dict.fromkeys([*required_keys, "center_mm"]):
        if key not in case:
            raise ValueError(f"manifest {path}: case {name} lacks the key '{key}'")
    center = case["center_mm"]
    if not isinstance(center, list | tuple) or len(center) != 3:
        raise ValueError(
            f"manifest {path}: case {name} key 'center_mm' must be [x, y, z] in mm, got {center!r}"
        )


def load_manifest(path: str | Path, required_keys: Iterable[str] = REQUIRED_CASE_KEYS) -> list[dict]:
    """Read and validate a manifest; return its cases with ``image`` resolved to an absolute path.

    ``required_keys``: the keys every case must have (a model without report text needs no
    ``impression``); ``center_mm`` is always required and checked.
    """
    path = Path(path).expanduser().resolve()
    data = _read_json(path)
    cases = []
    for index, case in enumerate(data["cases"]):
        _check_case(case, index, path, required_keys)
        row = dict(case)
        row["image"] = str((path.parent / case["image"]).resolve())
        cases.append(row)
    return cases


def _fold_filter(folds: Iterable[int] | None, exclude_folds: Iterable[int] | None):
    """Predicate on a fold number: inside ``folds`` (if given) and outside ``exclude_folds``."""
    keep = None if folds is None else {int(f) for f in folds}
    drop = set() if exclude_folds is None else {int(f) for f in exclude_folds}
    return lambda fold: (keep is None or int(fold) in keep) and int(fold) not in drop


def datalist(
    path: str | Path,
    folds: list[int] | None = None,
    exclude_folds: list[int] | None = None,
) -> list[dict]:
    """Records for a MONAI dataset: ``image`` (absolute), ``center_mm``, ``label``, ``report``, ids,
    ``fold`` and the true ``semantics`` (for zero-shot evaluation).

    ``report`` is the impression, the part of the report the model trains on. ``folds`` keeps only
    those folds (validation), ``exclude_folds`` drops them (training).
    """
    wanted = _fold_filter(folds, exclude_folds)
    return [
        {
            "image": case["image"],
            "center_mm": [float(v) for v in case["center_mm"]],
            "label": int(case["label"]),
            "report": case["impression"],
            "case_id": case["case_id"],
            "patient_id": case["patient_id"],
            "fold": int(case["fold"]),
            "semantics": dict(case.get("semantics", {})),
        }
        for case in load_manifest(path)
        if wanted(case["fold"])
    ]
