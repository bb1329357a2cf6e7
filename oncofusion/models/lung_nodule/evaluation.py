"""Lung-specific evaluation: the zero-shot AUROC of every semantic feature the predictions carry,
against the radiologists' ratings recorded with each case (``semantics``), with a bootstrap 95 % CI."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oncofusion.metrics.classification import Estimate, auroc

NAN_ESTIMATE = Estimate(float("nan"), float("nan"), float("nan"))


def _scorable(predictions: Sequence[dict], feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Option index of the recorded truth ``(N,)`` and the zero-shot option probabilities ``(N, K)``,
    over the cases that carry both; options follow the first such case's order."""
    rows = [r for r in predictions if feature in r.get("semantics", {}) and feature in r.get("semantic_features", {})]
    if not rows:
        return np.zeros(0, int), np.zeros((0, 0))
    options = list(rows[0]["semantic_features"][feature])
    unknown = {r["semantics"][feature] for r in rows} - set(options)
    if unknown:
        raise ValueError(f"feature '{feature}': recorded options {sorted(unknown)} have no zero-shot prompt "
                         f"(prompted options: {options}); the prompts and the manifest's semantics disagree")
    truth = np.array([options.index(r["semantics"][feature]) for r in rows], int)
    scores = np.array([[r["semantic_features"][feature][o] for o in options] for r in rows], float)
    return truth, scores


def macro_auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over the options present and absent in ``truth`` (NaN if none is).

    A two-option feature has one AUROC: its two one-vs-rest AUROCs are the same number.
    """
    columns = range(1) if scores.shape[1] == 2 else range(scores.shape[1])
    values = [auroc(truth == k, scores[:, k]) for k in columns]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def zero_shot_auroc(predictions: Sequence[dict], feature: str, num_bootstrap: int = 1000,
                    confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Macro one-vs-rest AUROC of a zero-shot feature against the recorded truth, with a percentile
    bootstrap CI over cases (resamples that lose every scorable option are skipped); NaN if not scorable."""
    truth, scores = _scorable(predictions, feature)
    value = macro_auroc(truth, scores) if truth.size else float("nan")
    if not np.isfinite(value):
        return NAN_ESTIMATE
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(num_bootstrap):
        index = rng.integers(0, truth.size, truth.size)
        if np.isfinite(draw := macro_auroc(truth[index], scores[index])):
            draws.append(draw)
    if not draws:
        return Estimate(value, float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Estimate(value, float(low), float(high))


def zero_shot_section(predictions: Sequence[dict], num_bootstrap: int = 1000) -> dict[str, dict[str, float]]:
    """Feature -> ``{"value", "low", "high"}`` zero-shot AUROC with its bootstrap 95 % CI, for the
    report's ``zero_shot_auroc`` section."""
    features = sorted({f for r in predictions for f in r.get("semantic_features", {})})
    return {feature: zero_shot_auroc(predictions, feature, num_bootstrap).to_dict() for feature in features}
