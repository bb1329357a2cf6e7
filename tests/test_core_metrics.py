"""Classification, threshold and DeLong metrics at their edges: one case of a class, ties at the
threshold, undefined values, and bootstrap intervals checked against their definition."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm

from oncofusion.evaluation.comparison import threshold_section, training_fold_thresholds
from oncofusion.metrics.classification import (
    Estimate,
    auprc,
    auroc,
    bootstrap,
    calibration_curve,
    roc_curve,
)
from oncofusion.metrics.delong import delong_covariance, delong_interval, delong_test, placement_values
from oncofusion.metrics.threshold import (
    THRESHOLD_METRICS,
    accuracy,
    confusion,
    f1_score,
    sensitivity,
    specificity,
    youden_threshold,
)

RNG = np.random.default_rng(7)
LABELS = np.array([0, 1] * 15)
SCORES = LABELS * 0.8 + RNG.standard_normal(30)


def _quiet(call, *args, **kwargs):
    """``call`` with every numpy warning raised: an undefined metric is NaN, quietly."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return call(*args, **kwargs)


def _mean_score(labels, scores):
    return float(np.mean(scores))


def _percentile_bootstrap(metric, labels, scores, num_samples, confidence, seed):
    """The definition: resample cases with replacement, keep finite values, take the central quantiles."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_samples):
        index = rng.integers(0, len(labels), len(labels))
        value = metric(labels[index], scores[index])
        if np.isfinite(value):
            values.append(value)
    tail = (1 - confidence) / 2
    return np.quantile(values, [tail, 1 - tail])


# -- input checks -----------------------------------------------------------------------------------
def test_labels_must_be_binary_and_match_the_scores():
    with pytest.raises(ValueError) as e:
        auroc([0, 1, 2], [0.1, 0.2, 0.3])
    assert str(e.value) == "labels must be 0 or 1"
    with pytest.raises(ValueError) as e:
        auprc([0, 1, 1], [0.1, 0.2])
    assert str(e.value) == "3 labels but 2 scores"


def test_boolean_labels_and_scores_are_numbers():
    labels = np.array([True, False, True, False, True])
    hard = np.array([True, False, False, False, True])
    soft = hard.astype(float)
    assert auprc(labels, hard) == auprc(labels.astype(int), soft)
    for got, expected in zip(roc_curve(labels, hard), roc_curve(labels.astype(int), soft), strict=True):
        np.testing.assert_allclose(got, expected)
    assert calibration_curve(labels, hard) == calibration_curve(labels.astype(int), soft)


# -- AUROC, AUPRC, ROC curve ------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_auroc_without_one_class_is_nan_without_warnings(labels):
    assert math.isnan(_quiet(auroc, labels, [0.1, 0.5, 0.9]))


def test_auroc_with_a_single_positive_or_negative():
    assert auroc([1, 0, 0, 0], [0.5, 0.1, 0.9, 0.2]) == pytest.approx(2 / 3)
    assert auroc([0, 1, 1, 1], [0.5, 0.1, 0.9, 0.5]) == pytest.approx(0.5)


def test_auprc_without_positives_is_nan_without_warnings():
    assert math.isnan(_quiet(auprc, [0, 0, 0], [0.1, 0.5, 0.9]))


def test_auprc_with_a_single_positive_is_its_reciprocal_rank():
    assert auprc([0, 1, 0, 0], [0.9, 0.5, 0.7, 0.1]) == pytest.approx(1 / 3)
    assert auprc([0, 0, 1], [0.1, 0.2, 0.3]) == pytest.approx(1.0)


def test_roc_curve_of_one_case_of_each_class():
    fpr, tpr = roc_curve([0, 1], [0.2, 0.8])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 1.0, 1.0])
    fpr, tpr = roc_curve([1, 0], [0.2, 0.8])
    np.testing.assert_allclose(fpr, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.0, 1.0])


def test_roc_curve_of_one_class_stays_at_zero_on_the_other_axis():
    fpr, tpr = _quiet(roc_curve, [1, 1], [0.2, 0.8])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0])


# -- bootstrap --------------------------------------------------------------------------------------
def test_bootstrap_defaults_are_1000_samples_95_percent_seed_0():
    estimate = bootstrap(auroc, LABELS, SCORES)
    assert estimate == bootstrap(auroc, LABELS, SCORES, num_samples=1000, confidence=0.95, seed=0)
    assert estimate.value == auroc(LABELS, SCORES)
    np.testing.assert_allclose([estimate.low, estimate.high],
                               _percentile_bootstrap(auroc, LABELS, SCORES, 1000, 0.95, 0))
    assert estimate != bootstrap(auroc, LABELS, SCORES, seed=1)
    mean = bootstrap(_mean_score, LABELS, SCORES)
    assert mean == bootstrap(_mean_score, LABELS, SCORES, num_samples=1000)
    assert mean != bootstrap(_mean_score, LABELS, SCORES, num_samples=1001)


@pytest.mark.parametrize("confidence", [0.5, 0.9])
def test_bootstrap_interval_is_the_central_percentile_range(confidence):
    estimate = bootstrap(auprc, LABELS, SCORES, num_samples=200, confidence=confidence, seed=3)
    np.testing.assert_allclose([estimate.low, estimate.high],
                               _percentile_bootstrap(auprc, LABELS, SCORES, 200, confidence, 3))


def test_bootstrap_resamples_every_case():
    scores = np.arange(12, dtype=float)
    lowest = bootstrap(lambda labels, s: float(s.min()), np.zeros(12), scores, num_samples=200)
    assert lowest.low == 0.0 and lowest.value == 0.0


def test_bootstrap_with_no_defined_resample_is_nan():
    estimate = bootstrap(auroc, [0, 0, 0], [0.1, 0.2, 0.3], num_samples=20)
    assert isinstance(estimate, Estimate)
    assert all(math.isnan(v) for v in estimate.to_dict().values())


# -- calibration ------------------------------------------------------------------------------------
def test_calibration_curve_uses_ten_equal_bins_and_keeps_the_edges():
    probabilities = np.array([0.0, 0.05, 0.15, 0.19, 0.55, 0.95, 1.0, 1.0])
    labels = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    curve = calibration_curve(labels, probabilities)
    assert curve["count"] == [2, 2, 1, 3]
    np.testing.assert_allclose(curve["predicted"], [0.025, 0.17, 0.55, (0.95 + 2) / 3])
    np.testing.assert_allclose(curve["observed"], [0.0, 0.5, 1.0, 2 / 3])
    assert calibration_curve(labels, probabilities, num_bins=2)["count"] == [4, 4]


# -- threshold metrics ------------------------------------------------------------------------------
def test_a_probability_at_the_threshold_counts_as_positive():
    labels, probabilities = [1, 0, 1, 0], [0.5, 0.5, 0.4, 0.6]
    assert confusion(labels, probabilities) == {"tp": 1, "fp": 2, "tn": 0, "fn": 1}
    assert confusion(labels, probabilities, 0.4) == {"tp": 2, "fp": 2, "tn": 0, "fn": 0}


def test_threshold_metrics_use_the_threshold_they_are_given():
    labels, probabilities = [1, 1, 0, 0, 0], [0.9, 0.35, 0.3, 0.2, 0.45]
    assert accuracy(labels, probabilities) == pytest.approx(0.8)
    assert accuracy(labels, probabilities, 0.3) == pytest.approx(0.6)
    assert sensitivity(labels, probabilities) == pytest.approx(0.5)
    assert sensitivity(labels, probabilities, 0.3) == pytest.approx(1.0)
    assert specificity(labels, probabilities) == pytest.approx(1.0)
    assert specificity(labels, probabilities, 0.3) == pytest.approx(1 / 3)
    assert f1_score(labels, probabilities) == pytest.approx(2 / 3)
    assert f1_score(labels, probabilities, 0.3) == pytest.approx(4 / 6)
    assert f1_score(labels, probabilities, 0.4) == pytest.approx(0.5)
    assert f1_score(labels, probabilities, 0.95) == pytest.approx(0.0)
    assert set(THRESHOLD_METRICS) == {"accuracy", "sensitivity", "specificity", "f1"}


def test_threshold_metrics_of_a_single_case_per_class():
    assert sensitivity([1, 0], [0.9, 0.1]) == 1.0
    assert specificity([1, 0], [0.9, 0.1]) == 1.0
    assert accuracy([1], [0.2]) == 0.0
    assert math.isnan(sensitivity([0, 0], [0.9, 0.1]))
    assert math.isnan(specificity([1, 1], [0.9, 0.1]))
    assert math.isnan(f1_score([0, 0], [0.1, 0.2]))


# -- DeLong -----------------------------------------------------------------------------------------
def test_placement_values_of_a_single_positive():
    auc, v10, v01 = placement_values([1, 0, 0], [0.9, 0.5, 0.95])
    assert auc == pytest.approx(0.5)
    np.testing.assert_allclose(v10, [0.5])
    np.testing.assert_allclose(v01, [1.0, 0.0])
    with pytest.raises(ValueError) as e:
        placement_values([1, 1], [0.2, 0.3])
    assert str(e.value) == "DeLong's test needs both classes among the labels"


def _delong_variance(v10, v01):
    m, n = len(v10), len(v01)
    s10 = np.var(v10, ddof=1) if m > 1 else 0.0
    s01 = np.var(v01, ddof=1) if n > 1 else 0.0
    return s10 / m + s01 / n


@pytest.mark.parametrize("labels, scores", [
    ([1, 0, 0, 0], [0.6, 0.5, 0.9, 0.1]),
    ([0, 1, 1, 1], [0.6, 0.5, 0.9, 0.1]),
    ([1, 1, 0, 0, 0], [0.6, 0.2, 0.5, 0.9, 0.1]),
    ([1, 1, 1, 0, 0], [0.6, 0.2, 0.5, 0.9, 0.1]),
])
def test_delong_variance_with_one_or_two_cases_of_a_class(labels, scores):
    aucs, covariance = _quiet(delong_covariance, labels, scores)
    _, v10, v01 = placement_values(labels, scores)
    assert covariance.shape == (1, 1)
    assert aucs[0] == pytest.approx(auroc(labels, scores))
    assert covariance[0, 0] == pytest.approx(_delong_variance(v10, v01))


def test_delong_test_reports_both_aurocs_the_counts_and_the_interval():
    scores_b = SCORES + RNG.standard_normal(30)
    result = delong_test(LABELS, SCORES, scores_b)
    assert result.auroc_a == pytest.approx(auroc(LABELS, SCORES))
    assert result.auroc_b == pytest.approx(auroc(LABELS, scores_b))
    assert result.difference == pytest.approx(result.auroc_a - result.auroc_b)
    assert (result.num_positive, result.num_negative) == (15, 15)
    half = norm.ppf(0.975) * result.standard_error
    assert result.standard_error > 0
    assert (result.ci_low, result.ci_high) == pytest.approx((result.difference - half, result.difference + half))
    assert result.z == pytest.approx(result.difference / result.standard_error)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(result.z)))
    narrow = delong_test(LABELS, SCORES, scores_b, confidence=0.5)
    assert narrow.ci_high - narrow.ci_low == pytest.approx(2 * norm.ppf(0.75) * result.standard_error)
    assert delong_test([True, False, True], [0.9, 0.1, 0.3], [0.8, 0.2, 0.1]).num_negative == 1


def test_delong_test_of_identical_rankings_has_no_evidence_of_a_difference():
    result = delong_test(LABELS, SCORES, 2 * SCORES + 1)
    assert (result.z, result.p_value, result.standard_error) == (0.0, 1.0, 0.0)
    assert result.ci_low == result.ci_high == result.difference == 0.0
    assert result.to_dict()["num_positive"] == 15


def test_delong_interval_is_the_normal_interval_clipped_to_the_unit_range():
    auc, low, high = delong_interval(LABELS, SCORES)
    _, covariance = delong_covariance(LABELS, SCORES)
    half = norm.ppf(0.975) * math.sqrt(covariance[0, 0])
    assert (auc, low, high) == pytest.approx((auroc(LABELS, SCORES), auc - half, auc + half))
    assert delong_interval(LABELS, SCORES, 0.95) == (auc, low, high)
    _, low80, high80 = delong_interval(LABELS, SCORES, 0.8)
    assert high80 - low80 == pytest.approx(2 * norm.ppf(0.9) * math.sqrt(covariance[0, 0]))
    perfect = delong_interval([0, 0, 1, 1, 0, 1], [0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert perfect == (1.0, 1.0, 1.0)
    labels, scores = [0, 1, 0, 1, 0, 1], np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.7])
    assert delong_interval(labels, scores) == pytest.approx((1 / 9, 0.0, 0.4190897387443729))
    assert delong_interval(labels, -scores) == pytest.approx((8 / 9, 0.5809102612556272, 1.0))


@pytest.mark.parametrize("labels", [[0.7, 1, 0, 0.2], [0, 1.9, 1, 0]])
def test_fractional_labels_are_refused_not_truncated(labels):
    scores = [0.1, 0.8, 0.6, 0.3]
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auroc(np.array(labels), np.array(scores))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        delong_test(np.array(labels), np.array(scores), np.array(scores[::-1]))
    assert auroc(np.array([0.0, 1.0, 1.0, 0.0]), np.array(scores)) == 1.0  # whole floats are classes


def test_youden_threshold_separates_separable_scores_halfway_between_the_classes():
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.7, 0.9])) == pytest.approx(0.5)
    assert youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.9])) == pytest.approx(0.25)
    # overlapping classes: 2 of 3 positives and no negative above 0.475 (J = 2/3) beats every lower cut
    labels, scores = np.array([0, 0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.4, 0.45, 0.35, 0.5, 0.6])
    assert youden_threshold(labels, scores) == pytest.approx(0.475)
    assert youden_threshold(np.array([1, 1]), np.array([0.2, 0.9])) == 0.5  # one class: no choice to make


def test_training_fold_thresholds_leave_the_fold_out_and_score_each_case_at_its_folds_threshold():
    """Fold k's threshold is chosen without fold k: its own cases would leak the test labels."""
    rows = [{"fold": 0, "label": 0, "p": 0.1}, {"fold": 0, "label": 1, "p": 0.2},
            {"fold": 1, "label": 0, "p": 0.6}, {"fold": 1, "label": 1, "p": 0.8}]
    assert training_fold_thresholds(rows, "p") == {0: pytest.approx(0.7), 1: pytest.approx(0.15)}
    section = threshold_section({"m": rows}, "p", num_bootstrap=20)["m"]
    # fold 0 at 0.7: both negative (1 of 2 right); fold 1 at 0.15: both positive (1 of 2 right)
    assert section["accuracy"]["value"] == pytest.approx(0.5) and section["sensitivity"]["value"] == pytest.approx(0.5)
