"""AUROC, AUPRC, bootstrap CIs and calibration for binary predictions.

Written on numpy so that the evaluation report, the benchmarks and the tests share one
definition; the tests hold them equal to scikit-learn's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    raw = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if raw.shape != scores.shape:
        raise ValueError(f"{raw.size} labels but {scores.size} scores")
    if not set(np.unique(raw).tolist()) <= {0, 1}:  # checked before any cast: 0.7 is not a class
        raise ValueError("labels must be 0 or 1")
    return raw.astype(int), scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class is absent."""
    labels, scores = _check_binary(labels, scores)
    positives = labels.sum()
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, as scikit-learn defines it."""
    labels, scores = _check_binary(labels, scores)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    threshold_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    true_positives = np.cumsum(sorted_labels)[threshold_ends]
    predicted = threshold_ends + 1
    precision = true_positives / predicted
    recall = true_positives / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at each distinct threshold, from (0, 0) to (1, 1)."""
    labels, scores = _check_binary(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    tps = np.cumsum(sorted_labels)[ends]
    fps = ends + 1 - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


@dataclass
class Estimate:
    """A point estimate with its percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray, scores: np.ndarray,
    num_samples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> Estimate:
    """Percentile bootstrap over cases; resamples missing a class are skipped (their metric is NaN)."""
    labels, scores = _check_binary(labels, scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_samples):
        index = rng.integers(0, labels.size, labels.size)
        value = metric(labels[index], scores[index])
        if np.isfinite(value):
            values.append(value)
    tail = (1.0 - confidence) / 2.0
    low, high = (np.quantile(values, [tail, 1.0 - tail]) if values else (float("nan"), float("nan")))
    return Estimate(metric(labels, scores), float(low), float(high))


def calibration_curve(labels: np.ndarray, probabilities: np.ndarray, num_bins: int = 10) -> dict[str, list]:
    """Mean predicted probability, observed frequency and count per equal-width bin (empty bins dropped)."""
    labels, probabilities = _check_binary(labels, probabilities)
    bins = np.clip((probabilities * num_bins).astype(int), 0, num_bins - 1)
    curve: dict[str, list] = {"predicted": [], "observed": [], "count": []}
    for b in range(num_bins):
        members = bins == b
        if members.any():
            curve["predicted"].append(float(probabilities[members].mean()))
            curve["observed"].append(float(labels[members].mean()))
            curve["count"].append(int(members.sum()))
    return curve
