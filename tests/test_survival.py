"""Survival metrics, the Cox loss and the survival report, held to lifelines, statsmodels and hand values."""

from __future__ import annotations

import json
import warnings

import lifelines  # the dev extra installs it: the reference the metrics are held to
import numpy as np
import pytest
import torch
from lifelines.statistics import logrank_test as lifelines_logrank
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index as lifelines_concordance
from statsmodels.duration.hazard_regression import PHReg

from oncofusion.evaluation.report import SYNTHETIC_NOTE
from oncofusion.evaluation.survival import risk_groups, survival_report, write_survival_report
from oncofusion.losses.survival import CoxPartialLikelihoodLoss
from oncofusion.metrics.classification import auroc
from oncofusion.metrics.survival import (
    bootstrap_survival,
    concordance_index,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
)
from oncofusion.targets import SurvivalTarget


def _survival_data(seed: int, ties: bool = True):
    """Random right-censored data; with ``ties`` the times and risks take few values, so ties abound."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    if ties:
        time = rng.integers(1, 10, n).astype(float)
        risk = rng.integers(-2, 3, n).astype(float)
    else:
        time = rng.exponential(10.0, n)
        risk = rng.normal(size=n)
    event = rng.random(n) < rng.uniform(0.2, 0.9)
    return time, risk, event.astype(int)


# ----------------------------------------------------------------------------------------- C-index
@pytest.mark.parametrize("ties", [True, False])
def test_concordance_index_equals_lifelines(ties):
    checked = 0
    for seed in range(150):
        time, risk, event = _survival_data(seed, ties)
        try:
            expected = lifelines_concordance(time, -risk, event)
        except ZeroDivisionError:
            assert np.isnan(concordance_index(time, risk, event))
            continue
        assert concordance_index(time, risk, event) == pytest.approx(expected, abs=1e-9), seed
        checked += 1
    assert checked > 100


def test_concordance_index_by_hand():
    # case 3, censored at the time of event 2, is taken to outlive it, so (2, 3) is comparable
    time = np.array([1.0, 2.0, 3.0, 3.0])
    event = np.array([1, 1, 1, 0])
    risk = np.array([4.0, 1.0, 2.0, 2.0])
    # pairs (i event earlier, j): (0,1) c, (0,2) c, (0,3) c, (1,2) d, (1,3) d, (2,3) tie in risk -> 1/2
    assert concordance_index(time, risk, event) == pytest.approx(3.5 / 6)
    assert concordance_index(time, -risk, event) == pytest.approx(2.5 / 6)
    assert np.isnan(concordance_index(time, risk, np.zeros(4)))
    with pytest.raises(ValueError, match="risk must be finite"):
        concordance_index(time, np.array([1.0, np.nan, 0.0, 0.0]), event)
    with pytest.raises(ValueError, match="event must be 1"):
        concordance_index(time, risk, np.array([1, 2, 0, 0]))


# ------------------------------------------------------------------------------- Kaplan-Meier
def test_kaplan_meier_equals_lifelines():
    for seed in range(60):
        time, _, event = _survival_data(seed, ties=seed % 2 == 0)
        fitter = lifelines.KaplanMeierFitter().fit(time, event)
        times, survival = kaplan_meier(time, event)
        np.testing.assert_array_equal(times, fitter.survival_function_.index.to_numpy())
        np.testing.assert_allclose(survival, fitter.survival_function_.to_numpy()[:, 0], rtol=0, atol=1e-9)


def test_kaplan_meier_by_hand():
    times, survival = kaplan_meier([2, 3, 3, 5, 8], [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(times, [0, 2, 3, 5, 8])
    np.testing.assert_allclose(survival, [1, 4 / 5, 4 / 5 * 3 / 4, 4 / 5 * 3 / 4 * 1 / 2, 4 / 5 * 3 / 4 * 1 / 2])


# ------------------------------------------------------------------------------------ log-rank
@pytest.mark.parametrize("num_groups", [2, 3])
def test_logrank_equals_lifelines(num_groups):
    checked = 0
    for seed in range(60):
        time, _, event = _survival_data(seed, ties=seed % 2 == 0)
        groups = np.random.default_rng(seed + 1000).integers(0, num_groups, time.size)
        if np.unique(groups).size < num_groups or event.sum() == 0:
            continue
        expected = multivariate_logrank_test(time, groups, event)
        result = logrank_test(time, event, groups)
        assert result.statistic == pytest.approx(expected.test_statistic, abs=1e-9)
        assert result.p_value == pytest.approx(expected.p_value, abs=1e-9)
        assert result.degrees_of_freedom == num_groups - 1
        if num_groups == 2:
            a, b = groups == 0, groups == 1
            pairwise = lifelines_logrank(time[a], time[b], event[a], event[b])
            assert result.statistic == pytest.approx(pairwise.test_statistic, abs=1e-9)
            assert result.p_value == pytest.approx(pairwise.p_value, abs=1e-9)
        checked += 1
    assert checked > 30


def test_logrank_needs_two_groups():
    with pytest.raises(ValueError, match="at least 2 groups, got 1"):
        logrank_test([1, 2], [1, 1], ["a", "a"])


# ------------------------------------------------------------------------- time-dependent AUC
def test_time_dependent_auc_without_censoring_is_the_plain_auroc():
    rng = np.random.default_rng(0)
    time = rng.exponential(5.0, 60)
    risk = -time + rng.normal(0, 3.0, 60)
    risk[::7] = risk[0]  # some ties in risk
    event = np.ones(60, int)
    horizons = np.quantile(time, [0.2, 0.5, 0.8])
    aucs = time_dependent_auc(time, risk, event, horizons)
    for horizon, auc in zip(horizons, aucs, strict=True):
        assert auc == pytest.approx(auroc((time <= horizon).astype(int), risk), abs=1e-12)


def test_time_dependent_auc_censored_by_hand():
    # horizon 3.5: cases 0 (t=1) and 2 (t=3); controls 3 and 4; case 1 censored at 2 is neither.
    # G (censoring KM): 1 at t=1; 1 - 1/4 after the censoring at 2; unchanged at 3 -> weights 1, 4/3.
    # case 0 (risk .9) beats both controls (.8, .1); case 2 (.4) beats one -> (2 + 4/3) / ((1 + 4/3) * 2)
    time = [1, 2, 3, 4, 5]
    event = [1, 0, 1, 1, 0]
    risk = [0.9, 0.5, 0.4, 0.8, 0.1]
    assert time_dependent_auc(time, risk, event, [3.5])[0] == pytest.approx(5 / 7, abs=1e-12)


def test_time_dependent_auc_censoring_tied_with_an_event():
    # at t=2 one event and one censoring: the event leaves first, so G(2) = 1 - 1/3 and case 1 weighs 3/2
    # (not 1 as G(2-) would give, nor 4/3 as censoring-first would). Case 0 beats both controls (.5, .1),
    # case 1 (.3) beats one, a tie with a control would count one half: (2 + 1.5) / ((1 + 1.5) * 2) = 0.7
    time = [1, 2, 2, 3, 4]
    event = [1, 1, 0, 0, 0]
    risk = [0.9, 0.3, 0.7, 0.5, 0.1]
    assert time_dependent_auc(time, risk, event, [2.5])[0] == pytest.approx(0.7, abs=1e-12)
    risk = [0.9, 0.5, 0.7, 0.5, 0.1]  # case 1 now ties control 3: (2 + 1.5 * 1.5) / 5
    assert time_dependent_auc(time, risk, event, [2.5])[0] == pytest.approx(4.25 / 5, abs=1e-12)


def test_time_dependent_auc_is_nan_without_cases_or_controls():
    aucs = time_dependent_auc([1, 2, 3], [0.1, 0.2, 0.3], [1, 1, 0], [0.5, 3.0, 2.5])
    assert np.isnan(aucs[0]) and np.isnan(aucs[1])
    assert aucs[2] == pytest.approx(0.0)


# ----------------------------------------------------------------------------------- bootstrap
def test_bootstrap_survival_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    time = rng.exponential(10, 200)
    event = (rng.random(200) < 0.7).astype(int)
    risk = -np.log(time) + rng.normal(0, 1, 200)
    estimate = bootstrap_survival(concordance_index, time, risk, event, num_samples=200, seed=0)
    assert estimate.value == pytest.approx(concordance_index(time, risk, event))
    assert estimate.low < estimate.value < estimate.high
    assert 0.02 < estimate.high - estimate.low < 0.2
    assert bootstrap_survival(concordance_index, time, risk, event, num_samples=200, seed=0) == estimate
    assert bootstrap_survival(concordance_index, time, risk, event, num_samples=200, seed=1) != estimate


# ------------------------------------------------------------------------------------ Cox loss
def _phreg_loglike(time, event, covariates, beta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PHReg(time, covariates, status=event, ties="breslow").loglike(beta)


@pytest.mark.parametrize("seed", range(8))
def test_cox_loss_equals_statsmodels_breslow(seed):
    rng = np.random.default_rng(seed)
    n = 40
    time = rng.integers(1, 8, n).astype(float)  # many tied times
    event = (rng.random(n) < 0.6).astype(float)
    covariates = rng.normal(size=(n, 3))
    beta = rng.normal(size=3)
    expected = _phreg_loglike(time, event, covariates, beta)
    eta = torch.tensor(covariates @ beta, dtype=torch.float64)
    t, e = torch.tensor(time), torch.tensor(event)
    mean = CoxPartialLikelihoodLoss()(eta, t, e)
    assert mean.item() == pytest.approx(-expected / event.sum(), abs=1e-6)
    total = CoxPartialLikelihoodLoss(reduction="sum")(eta.reshape(-1, 1), t, e)
    assert total.item() == pytest.approx(-expected, abs=1e-6)
    packed = CoxPartialLikelihoodLoss()(eta, torch.stack([t, e], 1))
    assert packed.item() == pytest.approx(mean.item(), abs=1e-12)


def test_cox_loss_gradient_favours_higher_hazard_for_earlier_events():
    loss = CoxPartialLikelihoodLoss()
    time, event = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 0.0])
    right = loss(torch.tensor([2.0, 1.0, 0.0]), time, event)
    wrong = loss(torch.tensor([0.0, 1.0, 2.0]), time, event)
    assert right < wrong
    eta = torch.zeros(3, requires_grad=True)
    loss(eta, time, event).backward()
    # d/d eta_0 = -(1 - 1/3) / 2 < 0: raising the first failure's hazard lowers the loss
    torch.testing.assert_close(eta.grad, torch.tensor([-1 / 3, -1 / 12, 5 / 12]))


def test_cox_loss_without_events_is_a_connected_zero():
    eta = torch.randn(4, 1, requires_grad=True)
    value = CoxPartialLikelihoodLoss()(eta, torch.arange(1.0, 5.0), torch.zeros(4))
    assert value.item() == 0.0
    value.backward()
    torch.testing.assert_close(eta.grad, torch.zeros(4, 1))


def test_cox_loss_shape_errors():
    loss = CoxPartialLikelihoodLoss()
    with pytest.raises(ValueError, match=r"log_hazard \(3, 2\), time \(3,\) and event \(3,\)"):
        loss(torch.zeros(3, 2), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"time must be \(B, 2\)"):
        loss(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        CoxPartialLikelihoodLoss(reduction="none")


# -------------------------------------------------------------------------------------- report
def _predictions(num_cases: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=num_cases)
    event_time = rng.exponential(20.0 * np.exp(-risk))
    censor_time = rng.uniform(5, 60, num_cases)
    return [{"case_id": f"c{i}", "os": float(max(min(t, c), 0.1)), "death": int(t <= c), "risk": float(r)}
            for i, (t, c, r) in enumerate(zip(event_time, censor_time, risk, strict=True))]


def test_survival_report_numbers_match_the_references(tmp_path):
    predictions = _predictions()
    target = SurvivalTarget(time_key="os", event_key="death", time_unit="months")
    report = write_survival_report(predictions, tmp_path, "synthetic survival cohort", num_bootstrap=100,
                                   target=target)
    time = np.array([p["os"] for p in predictions])
    event = np.array([p["death"] for p in predictions])
    risk = np.array([p["risk"] for p in predictions])
    assert report["note"] == SYNTHETIC_NOTE and report["data"] == "synthetic survival cohort"
    assert report["num_cases"] == 120 and report["num_events"] == int(event.sum())
    assert report["c_index"]["value"] == pytest.approx(lifelines_concordance(time, -risk, event), abs=1e-9)
    assert report["c_index"]["low"] < report["c_index"]["value"] < report["c_index"]["high"]
    np.testing.assert_allclose(report["time_dependent_auc"]["horizons"],
                               np.quantile(time[event == 1], [0.25, 0.5, 0.75]))
    high = risk > np.median(risk)
    groups = report["risk_groups"]
    assert [g["num_cases"] for g in groups["groups"]] == [int((~high).sum()), int(high.sum())]
    expected = lifelines_logrank(time[~high], time[high], event[~high], event[high])
    assert groups["logrank"]["p_value"] == pytest.approx(expected.p_value, abs=1e-9)
    assert groups["logrank"]["p_value"] < 0.01  # risk drives the simulated hazard
    assert json.loads((tmp_path / "report.json").read_text())["c_index"] == report["c_index"]
    for name in ("km_risk_groups.png", "td_auc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_survival_report_tertiles_and_errors():
    predictions = _predictions(90, seed=1)
    for p in predictions:
        p["time"], p["event"] = p.pop("os"), p.pop("death")
    report = survival_report(predictions, "x", num_bootstrap=10, num_groups=3, horizons=[5.0, 10.0])
    assert [g["name"] for g in report["risk_groups"]["groups"]] == ["low", "intermediate", "high"]
    assert [g["num_cases"] for g in report["risk_groups"]["groups"]] == [30, 30, 30]
    assert report["risk_groups"]["logrank"]["degrees_of_freedom"] == 2
    assert report["time_dependent_auc"]["horizons"] == [5.0, 10.0]
    group, thresholds = risk_groups(np.array([1.0, 2.0, 2.0, 3.0]))
    assert group.tolist() == [0, 0, 0, 1] and thresholds.tolist() == [2.0]
    del predictions[0]["risk"]
    with pytest.raises(ValueError, match=r"predictions \['c0'\] lack the key 'risk'"):
        survival_report(predictions, "x", num_bootstrap=10)
    predictions[1]["time"] = -1
    with pytest.raises(ValueError, match="case c1: 'time' is -1"):
        survival_report(predictions, "x", num_bootstrap=10)
