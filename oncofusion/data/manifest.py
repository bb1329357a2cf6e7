"""Case manifests: the JSON index that ties images, lesion positions, targets, text and fields together.

A manifest (written by the sample-data generators, or by ``/train`` from the datastore) looks like::

    {"description": ..., "num_folds": 5,
     "cases": [{"case_id", "patient_id", "image": "datastore/<case_id>.nii.gz", "fold",
                "center_mm" (optional), the target's fields, any other fields...}, ...]}

Image paths are relative to the manifest so that the folder can be moved. Bundle configs call
:func:`datalist` with the bundle's target, e.g.
``"$oncofusion.data.manifest.datalist(@datalist_file, @target, exclude_folds=[@fold], part='train')"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from oncofusion.data.folds import inner_split
from oncofusion.targets import Target

REQUIRED_CASE_KEYS: tuple[str, ...] = ("case_id", "patient_id", "image", "fold")
#: the parts of the selected folds a training run reads: all of them, or the two sides of the inner split
PARTS = (None, "train", "validation")


def _read_json(path: Path) -> dict:
    """Read the manifest file, turning the usual failures into errors that name it."""
    if not path.is_file():
        raise ValueError(
            f"manifest {path} does not exist; pass --datalist_file, or write one with a sample-data "
            "generator (python -m sample_data.<generator>)"
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


def _check_case(case: object, index: int, path: Path, required_keys: Iterable[str]) -> None:
    """Every case carries the keys the bundles read; a lesion centre, when given, is a list of numbers."""
    if not isinstance(case, dict):
        raise ValueError(f"manifest {path}: case {index} is not an object")
    name = case.get("case_id", f"#{index}")
    for key in required_keys:
        if key not in case:
            raise ValueError(f"manifest {path}: case {name} lacks the key '{key}'")
    center = case.get("center_mm")
    if center is not None and not (
        isinstance(center, list | tuple) and len(center) in (2, 3)
        and all(isinstance(v, int | float) and math.isfinite(v) for v in center)
    ):
        raise ValueError(
            f"manifest {path}: case {name} key 'center_mm' must be [x, y(, z)] in mm, got {center!r}"
        )


def load_manifest(path: str | Path, required_keys: Iterable[str] = REQUIRED_CASE_KEYS) -> list[dict]:
    """Read and validate a manifest; return its cases with ``image`` resolved to an absolute path."""
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
    target: Target | None = None,
    folds: Sequence[int] | None = None,
    exclude_folds: Sequence[int] | None = None,
    keys: Sequence[str] = (),
    optional_keys: Sequence[str] = (),
    path_keys: Sequence[str] = (),
    part: str | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Records for a MONAI dataset: ``image`` (absolute), ``case_id``, ``patient_id``, ``fold``,
    ``center_mm`` when the case has one, the ``target``'s validated fields, every key of ``keys`` (an
    error when a case lacks it) and of ``optional_keys`` (None when lacking). Values of ``path_keys`` (e.g. a
    mask beside the image, or a list of a patient's frames) are paths relative to the manifest, resolved like
    ``image``.

    ``folds`` keeps only those folds, ``exclude_folds`` drops them. ``part`` splits what is kept into a
    patient-grouped, target-stratified inner ``"train"`` / ``"validation"`` pair (nested validation: a
    checkpoint is chosen on the inner validation part of the training folds, never on the fold that is
    then reported as out-of-fold).
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    wanted = _fold_filter(folds, exclude_folds)
    records = []
    for case in load_manifest(path, (*REQUIRED_CASE_KEYS, *keys)):
        if not wanted(case["fold"]):
            continue
        record: dict[str, Any] = {
            "image": case["image"],
            "case_id": case["case_id"],
            "patient_id": case["patient_id"],
            "fold": int(case["fold"]),
        }
        if case.get("center_mm") is not None:
            record["center_mm"] = [float(v) for v in case["center_mm"]]
        if target is not None:
            record.update(target.parse(case))
        record.update({key: case[key] for key in keys})
        record.update({key: case.get(key) for key in optional_keys})
        root = Path(path).expanduser().resolve().parent
        for key in path_keys:
            value = record.get(key)
            if isinstance(value, list):
                record[key] = [str((root / item).resolve()) for item in value]
            elif value:
                record[key] = str((root / value).resolve())
        records.append(record)
    if part is None:
        return records
    if target is None:
        raise ValueError("an inner train/validation split is stratified by the target: pass the target")
    train, validation = inner_split(records, validation_fraction, target=target, seed=seed)
    return train if part == "train" else validation
