"""DeLong's test: are two AUROCs measured on the same cases different?

Two models scored on the same cases give correlated AUROCs; comparing their bootstrap intervals side by
side ignores that correlation and is too conservative. DeLong, DeLong & Clarke-Pearson (1988) estimate
the covariance of correlated AUROCs from the placement values (structural components) of each case;
the midrank formulation of Sun & Xu (2014) computes them in O(n log n).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm, rankdata

from oncofusion.metrics.classification import _check_binary


@dataclass
class DeLongResult:
    """Paired comparison of AUROC ``a`` with AUROC ``b`` (``difference = auroc_a - auroc_b``)."""

    auroc_a: float
    auroc_b: float
    difference: float
    standard_error: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    num_positive: int
    num_negative: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def placement_values(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and the structural components of each positive (``V10``) and each negative (``V01``) case.

    ``V10[i]`` is the share of negatives that positive ``i`` outscores (ties count one half), ``V01[j]`` the
    share of positives that outscore negative ``j``; both average to the AUROC.
    """
    labels, scores = _check_binary(labels, scores)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    m, n = positives.size, negatives.size
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both classes among the labels")
    overall = rankdata(np.concatenate([positives, negatives]))
    within_pos, within_neg = rankdata(positives), rankdata(negatives)
    v10 = (overall[:m] - within_pos) / n
    v01 = 1.0 - (overall[m:] - within_neg) / m
    auc = float((overall[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    return auc, v10, v01


def delong_covariance(labels: np.ndarray, *score_sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs ``(K,)`` of ``K`` score vectors on the same cases and their DeLong covariance ``(K, K)``."""
    components = [placement_values(labels, s) for s in score_sets]
    aucs = np.array([c[0] for c in components])
    v10 = np.stack([c[1] for c in components])  # (K, m)
    v01 = np.stack([c[2] for c in components])  # (K, n)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(aucs), len(aucs)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(aucs), len(aucs)))
    return aucs, s10 / m + s01 / n


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                confidence: float = 0.95) -> DeLongResult:
    """Two-sided DeLong test of ``AUROC(a) == AUROC(b)`` on paired scores, with a CI of the difference.

    Identical rankings have zero variance of the difference: the p-value is then 1 (no evidence of a
    difference), not NaN.
    """
    labels = np.asarray(labels).ravel()  # placement_values checks the classes before any cast
    aucs, covariance = delong_covariance(labels, scores_a, scores_b)
    difference = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    if se > 0:
        z = difference / se
        p = float(2.0 * norm.sf(abs(z)))
    else:
        z, p = 0.0, 1.0
    half = float(norm.ppf(0.5 + confidence / 2.0)) * se
    return DeLongResult(
        auroc_a=float(aucs[0]), auroc_b=float(aucs[1]), difference=difference, standard_error=se, z=float(z),
        p_value=p, ci_low=difference - half, ci_high=difference + half,
        num_positive=int(labels.sum()), num_negative=int(labels.size - labels.sum()),
    )


def delong_interval(labels: np.ndarray, scores: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """AUROC with DeLong's asymptotic confidence interval (clipped to [0, 1])."""
    aucs, covariance = delong_covariance(labels, scores)
    half = float(norm.ppf(0.5 + confidence / 2.0)) * float(np.sqrt(max(covariance[0, 0], 0.0)))
    return float(aucs[0]), max(0.0, float(aucs[0]) - half), min(1.0, float(aucs[0]) + half)
