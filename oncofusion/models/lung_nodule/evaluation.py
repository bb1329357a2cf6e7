"""Lung-specific evaluation: the zero-shot AUROC of every semantic feature the predictions carry,
against the radiologists' ratings recorded with each case (``semantics``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oncofusion.metrics.classification import auroc


def zero_shot_auroc(predictions: Sequence[dict], feature: str) -> float:
    """Macro one-vs-rest AUROC of a zero-shot feature against the recorded truth (NaN if not scorable)."""
    rows = [r for r in predictions if feature in r.get("semantics", {}) and feature in r.get("semantic_features", {})]
    if not rows:
        return float("nan")
    options = list(rows[0]["semantic_features"][feature])
    scores = []
    for option in options:
        truth = np.array([r["semantics"][feature] == option for r in rows], int)
        if 0 < truth.sum() < truth.size:
            scores.append(auroc(truth, np.array([r["semantic_features"][feature][option] for r in rows])))
        if len(options) == 2:  # both one-vs-rest AUROCs of a binary feature are the same number
            break
    return float(np.mean(scores)) if scores else float("nan")


def zero_shot_section(predictions: Sequence[dict]) -> dict[str, float]:
    """Feature -> zero-shot AUROC, for the report's ``zero_shot_auroc`` section."""
    features = sorted({f for r in predictions for f in r.get("semantic_features", {})})
    return {feature: zero_shot_auroc(predictions, feature) for feature in features}
