"""Metrics of hard decisions at a probability threshold: accuracy, sensitivity, specificity, F1.

The papers report these next to the AUROC; they depend on the threshold, which is therefore part of
every result (0.5 on the ensemble's probability unless a config says otherwise, or chosen on training
data by :func:`youden_threshold`).
"""

from __future__ import annotations

import numpy as np

from oncofusion.metrics.classification import _check_binary


def confusion(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """True/false positives/negatives when ``probability >= threshold`` means positive."""
    labels, probabilities = _check_binary(labels, probabilities)
    predicted = probabilities >= threshold
    return {
        "tp": int(np.sum(predicted & (labels == 1))),
        "fp": int(np.sum(predicted & (labels == 0))),
        "tn": int(np.sum(~predicted & (labels == 0))),
        "fn": int(np.sum(~predicted & (labels == 1))),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def accuracy(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    c = confusion(labels, probabilities, threshold)
    return _ratio(c["tp"] + c["tn"], sum(c.values()))


def sensitivity(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    """Recall of the positive class; NaN without positives."""
    c = confusion(labels, probabilities, threshold)
    return _ratio(c["tp"], c["tp"] + c["fn"])


def specificity(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    """Recall of the negative class; NaN without negatives."""
    c = confusion(labels, probabilities, threshold)
    return _ratio(c["tn"], c["tn"] + c["fp"])


def f1_score(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> float:
    """Harmonic mean of precision and recall of the positive class; NaN when both are undefined."""
    c = confusion(labels, probabilities, threshold)
    return _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"])


THRESHOLD_METRICS = {"accuracy": accuracy, "sensitivity": sensitivity, "specificity": specificity, "f1": f1_score}


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold (``score >= t`` is positive) maximising sensitivity + specificity - 1, halfway between
    two neighbouring scores; 0.5 when a class is absent."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, float)
    if labels.sum() in (0, labels.size):
        return 0.5
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2.0, [values[-1] + 1e-6]])
    positives, negatives = labels == 1, labels == 0
    best, chosen = -np.inf, 0.5
    for t in candidates:
        j = np.mean(scores[positives] >= t) - np.mean(scores[negatives] >= t)
        if j > best + 1e-12:
            best, chosen = j, float(t)
    return chosen
