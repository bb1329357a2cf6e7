"""Run a served predictor over a datalist, so evaluation measures exactly what the server answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from oncofusion.serving.predictor import Predictor, Roi
from oncofusion.transforms.geometry import world_to_voxel

logger = logging.getLogger(__name__)


def predict_datalist(predictor: Predictor, loader: Callable[[dict], dict], datalist: Sequence[dict],
                     output_file: str | Path | None = None, out_of_fold: bool = False) -> list[dict[str, Any]]:
    """One prediction per record (``image``, ``center_mm``); ground truth fields are carried along.

    With ``out_of_fold`` each record is predicted by the model of its own ``fold`` only, i.e. by the
    model that did not train on it.
    """
    rows = []
    for record in tqdm(datalist, desc="predict", leave=False):
        image = loader({"image": record["image"]})["image"]
        center_ijk = world_to_voxel(image.affine.numpy(), np.asarray([record["center_mm"]], float))[0]
        fold = int(record["fold"]) if out_of_fold else None
        kwargs = {"fold": fold} if fold is not None else {}
        prediction = predictor.predict(image, Roi(points=[tuple(center_ijk)]), record, **kwargs)
        truth = {key: record[key] for key in ("case_id", "patient_id", "label", "fold", "semantics") if key in record}
        rows.append({**truth, **prediction.result})
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(rows, indent=1))
        logger.info("wrote %d predictions to %s", len(rows), output_file)
    return rows
