"""Run a served predictor over a datalist, so evaluation measures exactly what the server answers.

Each image the predictor declares (``predictor.inputs``) is read from the record's key of the same name
with the declared reader, the one the server uses; the lesion is the record's ``center_mm`` (world mm),
put on the primary image as a click.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from oncofusion.contract import Predictor, Roi
from oncofusion.io.readers import read_image
from oncofusion.transforms.geometry import world_to_voxel

logger = logging.getLogger(__name__)


def record_images(predictor: Predictor, record: dict[str, Any]) -> dict[str, Any]:
    """The record's images, read as the predictor declares them (absent optional inputs are None)."""
    images = {}
    for spec in predictor.inputs.images:
        path = record.get(spec.name)
        images[spec.name] = read_image(path, spec.reader) if path else None
    return images


def record_box(record: Mapping[str, Any], key: str = "roi") -> Roi:
    """A manifest record's inclusive pixel box ``[[i0, j0], [i1, j1]]`` as the prompt a user would draw."""
    box = record.get(key)
    if box is None:
        raise ValueError(f"case {record.get('case_id', '?')} has no '{key}' box: add it to the manifest")
    lo, hi = (tuple(float(v) for v in corner) for corner in box)
    return Roi(box=(lo, hi))


def record_roi(predictor: Predictor, record: dict[str, Any], images: dict[str, Any]) -> Roi | None:
    """The record's lesion centre as a click on the primary image; None for a model without a prompt."""
    if not predictor.inputs.prompt or record.get("center_mm") is None:
        return None
    primary = images[predictor.inputs.primary.name]
    center = world_to_voxel(primary.affine.numpy(), np.asarray([record["center_mm"]], float))[0]
    return Roi(points=[tuple(center)])


def predict_datalist(predictor: Predictor, datalist: Sequence[dict], output_file: str | Path | None = None,
                     out_of_fold: bool = False) -> list[dict[str, Any]]:
    """One prediction per record; every record key but the image paths is carried along (ids, truth).

    With ``out_of_fold`` each record is predicted by the model of its own ``fold`` only, i.e. by the
    model that did not train on it.
    """
    image_keys = {spec.name for spec in predictor.inputs.images}
    rows = []
    for record in tqdm(datalist, desc="predict", leave=False):
        images = record_images(predictor, record)
        kwargs = {"fold": int(record["fold"])} if out_of_fold else {}
        prediction = predictor.predict(images, record_roi(predictor, record, images), record, **kwargs)
        truth = {key: value for key, value in record.items() if key not in image_keys}
        rows.append({**truth, **prediction.result})
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(rows, indent=1))
        logger.info("wrote %d predictions to %s", len(rows), output_file)
    return rows
