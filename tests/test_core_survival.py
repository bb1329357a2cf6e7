"""Survival metrics at their edges: input checks, large inputs, hand-computed IPCW weights and quiet NaNs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_concordance

from oncofusion.metrics.classification import Estimate
from oncofusion.metrics.survival import (
    bootstrap_survival,
    concordance_index,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
)

# six cases with a censoring tied to the first event: G(1) = 0.8, G(2) = 0.8, G(4) = 0.8 * 2/3
TIME = np.array([1.0, 1.0, 2.0, 3.0, 4.0, 5.0])
EVENT = np.array([1, 0, 1, 0, 1, 0])
RISK = np.array([5.0, 0.0, 0.5, 0.0, 0.5, 2.0])
W1, W2, W4 = 1 / 0.8, 1 / 0.8, 1 / (0.8 * 2 / 3)


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return call(*args, **kwargs)


def _message(call, *args) -> str:
    with pytest.raises(ValueError) as e:
        call(*args)
    return str(e.value)


# -- input checks -----------------------------------------------------------------------------------
def test_lengths_must_agree_naming_what_differs():
    assert _message(concordance_index, [1, 2, 3], [0.1, 0.2, 0.3], [1, 0]) == "3 times but 2 event indicators"
    assert _message(concordance_index, [1, 2, 3], [0.1, 0.2], [1, 0, 1]) == "3 times but 2 values of risk"
    assert _message(logrank_test, [1, 2, 3], [1, 0, 1], ["a", "b"]) == "3 times but 2 group labels"


@pytest.mark.parametrize("time", [[1.0, float("nan")], [1.0, -0.5], [float("inf"), 2.0]])
def test_times_must_be_finite_and_not_negative(time):
    assert _message(kaplan_meier, time, [1, 0]) == "time must be finite and >= 0 for every case"


@pytest.mark.parametrize("event", [[1, 2], [0.5, 1], [-1, 0]])
def test_events_must_be_zero_or_one(event):
    assert _message(kaplan_meier, [1.0, 2.0], event) == (
        "event must be 1 (event observed) or 0 (censored) for every case")


@pytest.mark.parametrize("call", [
    lambda risk: concordance_index(TIME, risk, EVENT),
    lambda risk: time_dependent_auc(TIME, risk, EVENT, [2.0]),
    lambda risk: bootstrap_survival(concordance_index, TIME, risk, EVENT, num_samples=5),
])
def test_risk_must_be_finite_naming_the_risk(call):
    risk = RISK.copy()
    risk[2] = np.nan
    with pytest.raises(ValueError) as e:
        call(risk)
    assert str(e.value) == "risk must be finite for every case (found NaN or inf)"


def test_boolean_events_are_indicators():
    as_bool = EVENT.astype(bool)
    assert concordance_index(TIME, RISK, as_bool) == concordance_index(TIME, RISK, EVENT)
    for got, expected in zip(kaplan_meier(TIME, as_bool), kaplan_meier(TIME, EVENT), strict=True):
        np.testing.assert_allclose(got, expected)


def test_a_follow_up_of_zero_is_a_valid_time():
    times, survival = kaplan_meier([0.0, 1.0], [1, 0])
    np.testing.assert_allclose(times, [0.0, 1.0])
    np.testing.assert_allclose(survival, [0.5, 0.5])


# -- C-index ----------------------------------------------------------------------------------------
def test_concordance_index_over_several_chunks_equals_lifelines():
    rng = np.random.default_rng(0)
    n = 2100  # more events than rows of one (events x cases) chunk
    time = rng.permutation(n).astype(float) + 1.0
    event = (rng.random(n) < 0.97).astype(int)
    risk = rng.integers(0, 40, n).astype(float) - time / 200.0 * rng.integers(0, 2, n)
    expected = lifelines_concordance(time, -risk, event)
    assert concordance_index(time, risk, event) == pytest.approx(expected, abs=1e-12)


def test_concordance_index_without_comparable_pairs_is_nan_quietly():
    assert math.isnan(_quiet(concordance_index, [1.0, 2.0], [0.3, 0.1], [0, 0]))
    assert math.isnan(_quiet(concordance_index, [2.0, 2.0], [0.3, 0.1], [1, 1]))


# -- time-dependent AUC -----------------------------------------------------------------------------
def test_time_dependent_auc_weights_cases_by_inverse_censoring_survival():
    auc = _quiet(time_dependent_auc, TIME, RISK, EVENT, [2, 3.5, 4.5])
    # at 2: cases t=1 (3 of 3 controls below) and t=2 (risk 0.5: above 0, tied with 0.5, below 2); the
    # event at the horizon is a case
    assert auc[0] == pytest.approx((W1 * 3 + W2 * 1.5) / ((W1 + W2) * 3))
    # at 3.5: controls t=4 (risk 0.5) and t=5 (risk 2); the case of risk 0.5 ties one of them
    assert auc[1] == pytest.approx((W1 * 2 + W2 * 0.5) / ((W1 + W2) * 2))
    # at 4.5: the only control (risk 2) is outscored by the first case only
    assert auc[2] == pytest.approx(W1 / (W1 + W2 + W4))


def test_time_dependent_auc_is_nan_without_cases_or_controls_quietly():
    auc = _quiet(time_dependent_auc, TIME, RISK, EVENT, np.array([0.5, 5.0, 9.0]))
    assert np.isnan(auc).all() and auc.shape == (3,)


def test_time_dependent_auc_of_a_case_whose_censoring_survival_is_zero_is_quiet():
    auc = _quiet(time_dependent_auc, [1.0, 2.0, 2.0], [2.0, 1.0, 0.0], [1, 1, 0], [1.5, 2.0])
    assert auc[0] == 1.0 and math.isnan(auc[1])


def test_time_dependent_auc_horizons_must_be_finite():
    assert _message(time_dependent_auc, TIME, RISK, EVENT, [2, None]) == (
        "every horizon in times must be finite, got [2.0, nan]")


# -- Kaplan-Meier and log-rank ----------------------------------------------------------------------
def test_kaplan_meier_of_one_case_and_of_none():
    times, survival = kaplan_meier([5.0], [1])
    np.testing.assert_allclose(times, [0.0, 5.0])
    np.testing.assert_allclose(survival, [1.0, 0.0])
    assert _message(kaplan_meier, [], []) == "kaplan_meier needs at least one case"


def test_logrank_with_a_single_case_left_at_risk_is_quiet():
    result = _quiet(logrank_test, [1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], [0, 1, 0, 1])
    assert math.isfinite(result.statistic) and result.degrees_of_freedom == 1
    assert _message(logrank_test, [1.0, 2.0], [1, 1], ["a", "a"]) == (
        "the log-rank test compares at least 2 groups, got 1")


# -- bootstrap --------------------------------------------------------------------------------------
def _follow_up_mean(time, risk, event):
    return float(np.mean(time))


def test_bootstrap_survival_defaults_and_percentiles():
    rng = np.random.default_rng(1)
    time, risk, event = rng.exponential(5.0, 40), rng.normal(size=40), rng.integers(0, 2, 40)
    estimate = bootstrap_survival(_follow_up_mean, time, risk, event)
    assert estimate == bootstrap_survival(_follow_up_mean, time, risk, event, num_samples=1000, confidence=0.95,
                                          seed=0)
    assert estimate != bootstrap_survival(_follow_up_mean, time, risk, event, num_samples=1001)
    assert estimate != bootstrap_survival(_follow_up_mean, time, risk, event, seed=1)
    draws = np.random.default_rng(0)
    values = [np.mean(time[draws.integers(0, 40, 40)]) for _ in range(1000)]
    np.testing.assert_allclose([estimate.low, estimate.high], np.quantile(values, [0.025, 0.975]))
    assert estimate.value == pytest.approx(np.mean(time))
    narrow = bootstrap_survival(_follow_up_mean, time, risk, event, confidence=0.5)
    np.testing.assert_allclose([narrow.low, narrow.high], np.quantile(values, [0.25, 0.75]))


def test_bootstrap_survival_resamples_every_case():
    time = np.arange(1.0, 13.0)
    estimate = bootstrap_survival(lambda t, r, e: float(t.min()), time, np.zeros(12), np.ones(12), num_samples=200)
    assert estimate.low == 1.0


def test_bootstrap_survival_with_no_defined_resample_is_nan():
    estimate = bootstrap_survival(concordance_index, [1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [0, 0, 0], num_samples=20)
    assert isinstance(estimate, Estimate)
    assert all(math.isnan(v) for v in estimate.to_dict().values())
