"""Survival metrics: Harrell's C-index, time-dependent AUC, Kaplan-Meier, log-rank test, bootstrap CIs.

Written on numpy/scipy so that reports need no survival package at run time; the tests hold them
equal to lifelines (C-index, Kaplan-Meier, log-rank) and to hand-computed values (time-dependent AUC).

Conventions: ``time`` is the follow-up (>= 0), ``event`` is 1 for an observed event and 0 for a
censored case, and ``risk`` is a score where higher means *shorter* survival (a Cox log-hazard).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import chi2

from oncofusion.metrics.classification import Estimate

__all__ = [
    "LogRankResult",
    "bootstrap_survival",
    "concordance_index",
    "kaplan_meier",
    "logrank_test",
    "time_dependent_auc",
]

#: rows of the (events x cases) comparison matrix built at once by :func:`concordance_index`
_CHUNK_ELEMENTS = 4_000_000


def _check_survival(time: np.ndarray, event: np.ndarray, *others: tuple[str, np.ndarray]
                    ) -> tuple[np.ndarray, ...]:
    """Flat float ``time``, 0/1 int ``event`` and flat float ``others``, all finite and of one length."""
    time = np.asarray(time, dtype=np.float64).ravel()
    event_raw = np.asarray(event).ravel()
    if event_raw.shape != time.shape:
        raise ValueError(f"{time.size} times but {event_raw.size} event indicators")
    if not np.isfinite(time).all() or (time < 0).any():
        raise ValueError("time must be finite and >= 0 for every case")
    if event_raw.dtype == bool:
        event_out = event_raw.astype(int)
    else:
        event_float = event_raw.astype(np.float64)
        if not np.isin(event_float, (0.0, 1.0)).all():
            raise ValueError("event must be 1 (event observed) or 0 (censored) for every case")
        event_out = event_float.astype(int)
    arrays = []
    for name, values in others:
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.shape != time.shape:
            raise ValueError(f"{time.size} times but {values.size} values of {name}")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} must be finite for every case (found NaN or inf)")
        arrays.append(values)
    return (time, event_out, *arrays)


def concordance_index(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C: the share of comparable pairs whose earlier failure has the higher ``risk``.

    A pair (i, j) is comparable when i has an event and ``time[i] < time[j]``, or ``time[i] == time[j]``
    and j is censored (a case censored at the time of an event is taken to outlive it). Two events at
    the same time are not compared. A tie in risk counts one half. This is lifelines'
    ``concordance_index(time, -risk, event)``. NaN when no pair is comparable.
    """
    time, event, risk = _check_survival(time, event, ("risk", risk))
    events = np.flatnonzero(event == 1)
    concordant, tied, pairs = 0, 0, 0
    step = max(1, _CHUNK_ELEMENTS // max(time.size, 1))
    for start in range(0, events.size, step):
        rows = events[start:start + step]
        t_i, r_i = time[rows, None], risk[rows, None]
        comparable = (time[None, :] > t_i) | ((time[None, :] == t_i) & (event[None, :] == 0))
        pairs += int(comparable.sum())
        concordant += int((comparable & (risk[None, :] < r_i)).sum())
        tied += int((comparable & (risk[None, :] == r_i)).sum())
    return (concordant + 0.5 * tied) / pairs if pairs else float("nan")


def _counts(time: np.ndarray, event: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """At each time of ``grid``: cases still at risk (``time >= t``), events and censorings at ``t``."""
    ordered = np.sort(time)
    ordered_events = np.sort(time[event == 1])
    ordered_censored = np.sort(time[event == 0])

    def at(values: np.ndarray) -> np.ndarray:
        return np.searchsorted(values, grid, side="right") - np.searchsorted(values, grid, side="left")

    at_risk = time.size - np.searchsorted(ordered, grid, side="left")
    return at_risk, at(ordered_events), at(ordered_censored)


def _censoring_survival(time: np.ndarray, event: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``G(t)``, the Kaplan-Meier estimate of P(censoring time > t), as a right-continuous step function.

    Censoring is the "event" here; at a tied time the events leave the risk set before the censored
    cases do (a case censored at t was still followed at t), as in scikit-survival.
    """
    grid = np.unique(time)
    at_risk, events, censored = _counts(time, event, grid)
    remaining = at_risk - events
    factor = np.where(remaining > 0, 1.0 - censored / np.maximum(remaining, 1), 1.0)
    survival = np.cumprod(factor)

    def evaluate(t: np.ndarray) -> np.ndarray:
        index = np.searchsorted(grid, t, side="right") - 1
        return np.where(index >= 0, survival[np.maximum(index, 0)], 1.0)

    return evaluate


def time_dependent_auc(time: np.ndarray, risk: np.ndarray, event: np.ndarray,
                       times: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cumulative/dynamic AUC at each horizon in ``times`` (Uno et al. 2007; Hung & Chiang 2010).

    At horizon t the cases are those with an event by t (``time <= t``, ``event == 1``) and the
    controls those still followed after t (``time > t``). Censoring before t hides whether a case is a
    case, so each case is weighted by ``1 / G(time_i)``, the inverse probability of having stayed
    uncensored until its event, with ``G`` the Kaplan-Meier estimate of the censoring distribution on
    the same data; controls share the weight ``1 / G(t)``, which cancels. Then::

        AUC(t) = sum_{i case, j control} w_i ([risk_i > risk_j] + 0.5 [risk_i == risk_j])
                 / (sum_{i case} w_i * number of controls)

    which is scikit-survival's ``cumulative_dynamic_auc`` with the censoring fitted on these cases.
    Without censoring all weights are 1 and AUC(t) is the plain AUROC of cases against controls.
    NaN at a horizon without cases or without controls (before the first event, from the last time on).
    """
    time, event, risk = _check_survival(time, event, ("risk", risk))
    horizons = np.asarray(times, dtype=np.float64).ravel()
    if not np.isfinite(horizons).all():
        raise ValueError(f"every horizon in times must be finite, got {horizons.tolist()}")
    weight = np.zeros_like(time)
    has_event = event == 1
    if has_event.any():
        with np.errstate(divide="ignore"):
            weight[has_event] = 1.0 / _censoring_survival(time, event)(time[has_event])
    aucs = np.full(horizons.size, np.nan)
    for k, horizon in enumerate(horizons):
        cases = has_event & (time <= horizon)
        controls = np.sort(risk[time > horizon])
        if cases.any() and controls.size:
            below = np.searchsorted(controls, risk[cases], side="left")
            tied = np.searchsorted(controls, risk[cases], side="right") - below
            w = weight[cases]
            aucs[k] = float(w @ (below + 0.5 * tied) / (w.sum() * controls.size))
    return aucs


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(times, survival)``: the Kaplan-Meier step function, ``survival[k]`` holding on [times[k], times[k+1]).

    ``times`` starts at 0 (survival 1 unless events happen at 0) and holds every distinct observed
    time, censored ones included, as lifelines' ``KaplanMeierFitter.survival_function_`` does.
    """
    time, event = _check_survival(time, event)
    if time.size == 0:
        raise ValueError("kaplan_meier needs at least one case")
    grid = np.unique(np.r_[0.0, time])
    at_risk, deaths, _ = _counts(time, event, grid)
    factor = np.where(at_risk > 0, 1.0 - deaths / np.maximum(at_risk, 1), 1.0)
    return grid, np.cumprod(factor)


@dataclass
class LogRankResult:
    """The log-rank chi-square statistic, its p value and degrees of freedom (groups - 1)."""

    statistic: float
    p_value: float
    degrees_of_freedom: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def logrank_test(time: np.ndarray, event: np.ndarray, groups: Sequence) -> LogRankResult:
    """Log-rank test that two or more groups share one survival function.

    At each event time the observed events of each group are compared with those expected under a
    common hazard (hypergeometric variance); ``U = Z' V^+ Z`` over all groups but one is chi-square
    with groups - 1 degrees of freedom, as lifelines' ``multivariate_logrank_test`` computes it.
    """
    time, event = _check_survival(time, event)
    groups = np.asarray(groups).ravel()
    if groups.shape != time.shape:
        raise ValueError(f"{time.size} times but {groups.size} group labels")
    labels, member = np.unique(groups, return_inverse=True)
    if labels.size < 2:
        raise ValueError(f"the log-rank test compares at least 2 groups, got {labels.size}")
    grid = np.unique(time[event == 1])
    per_group = [_counts(time[member == g], event[member == g], grid) for g in range(labels.size)]
    at_risk = np.stack([c[0] for c in per_group], 1).astype(float)  # (T, G)
    deaths = np.stack([c[1] for c in per_group], 1).astype(float)  # (T, G)
    n = at_risk.sum(1)
    d = deaths.sum(1)
    observed_minus_expected = (deaths - at_risk * (d / n)[:, None]).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(n > 1, (n - d) / (n - 1), 1.0) * d / n**2
    share = at_risk * np.sqrt(factor)[:, None]
    covariance = np.diag((at_risk * (n * factor)[:, None]).sum(0)) - share.T @ share
    z = observed_minus_expected[:-1]
    statistic = float(z @ np.linalg.pinv(covariance[:-1, :-1]) @ z)
    dof = int(labels.size - 1)
    return LogRankResult(statistic, float(chi2.sf(statistic, dof)), dof)


def bootstrap_survival(metric: Callable[[np.ndarray, np.ndarray, np.ndarray], float], time: np.ndarray,
                       risk: np.ndarray, event: np.ndarray, num_samples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> Estimate:
    """Percentile bootstrap of ``metric(time, risk, event)`` over cases.

    Resamples where the metric is undefined (NaN: no comparable pair, no event) are skipped, as in
    :func:`oncofusion.metrics.classification.bootstrap`, whose :class:`Estimate` this returns.
    """
    time, event, risk = _check_survival(time, event, ("risk", risk))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_samples):
        index = rng.integers(0, time.size, time.size)
        value = metric(time[index], risk[index], event[index])
        if np.isfinite(value):
            values.append(value)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail]) if values else (float("nan"), float("nan"))
    return Estimate(float(metric(time, risk, event)), float(low), float(high))
