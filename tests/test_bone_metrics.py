"""DeLong's paired AUROC test against its definition, the bootstrap and the null; threshold metrics
against scikit-learn; the side-by-side comparison report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from oncofusion.evaluation.comparison import comparison_markdown, write_comparison
from oncofusion.metrics.classification import auroc
from oncofusion.metrics.delong import delong_covariance, delong_interval, delong_test, placement_values
from oncofusion.metrics.threshold import accuracy, confusion, sensitivity, specificity
from oncofusion.metrics.threshold import f1_score as our_f1


def _correlated_scores(rng, n=200, separation=(1.0, 0.6), shared=0.7):
    labels = (rng.random(n) < 0.45).astype(int)
    common = rng.standard_normal(n)
    a = separation[0] * labels + shared * common + rng.standard_normal(n)
    b = separation[1] * labels + shared * common + rng.standard_normal(n)
    return labels, a, b


def _naive_delong(labels, scores_list):
    """DeLong et al. (1988) straight from the definition: psi over every positive-negative pair."""
    labels = np.asarray(labels)
    k = len(scores_list)
    v10, v01, aucs = [], [], []
    for scores in scores_list:
        pos, neg = scores[labels == 1], scores[labels == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = len(v10[0]), len(v01[0])
    s10 = np.array([[np.sum((v10[r] - aucs[r]) * (v10[s] - aucs[s])) / (m - 1) for s in range(k)] for r in range(k)])
    s01 = np.array([[np.sum((v01[r] - aucs[r]) * (v01[s] - aucs[s])) / (n - 1) for s in range(k)] for r in range(k)])
    return np.array(aucs), s10 / m + s01 / n


def test_midrank_delong_equals_the_definition_with_ties():
    rng = np.random.default_rng(0)
    labels, a, b = _correlated_scores(rng, n=150)
    a, b = np.round(a, 1), np.round(b, 1)  # many ties
    aucs, covariance = delong_covariance(labels, a, b)
    naive_aucs, naive_covariance = _naive_delong(labels, [a, b])
    np.testing.assert_allclose(aucs, naive_aucs, atol=1e-12)
    np.testing.assert_allclose(covariance, naive_covariance, rtol=1e-10, atol=1e-14)
    assert aucs[0] == pytest.approx(roc_auc_score(labels, a))
    auc, v10, v01 = placement_values(labels, a)
    assert v10.mean() == pytest.approx(auc) and v01.mean() == pytest.approx(auc)


def test_delong_standard_error_matches_the_paired_bootstrap():
    rng = np.random.default_rng(1)
    labels, a, b = _correlated_scores(rng, n=300)
    result = delong_test(labels, a, b)
    differences = []
    for _ in range(1000):
        index = rng.integers(0, labels.size, labels.size)
        if 0 < labels[index].sum() < labels.size:
            differences.append(auroc(labels[index], a[index]) - auroc(labels[index], b[index]))
    assert result.standard_error == pytest.approx(np.std(differences), rel=0.15)
    assert result.difference == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b))
    assert result.ci_low < result.difference < result.ci_high
    swapped = delong_test(labels, b, a)
    assert swapped.z == pytest.approx(-result.z) and swapped.p_value == pytest.approx(result.p_value)


def test_delong_holds_its_size_under_the_null_and_detects_a_real_gap():
    rng = np.random.default_rng(2)
    p_null = [delong_test(*_correlated_scores(rng, n=120, separation=(0.8, 0.8))).p_value for _ in range(300)]
    assert 0.02 <= np.mean(np.array(p_null) < 0.05) <= 0.09
    p_gap = [delong_test(*_correlated_scores(rng, n=200, separation=(1.5, 0.3))).p_value for _ in range(20)]
    assert np.mean(np.array(p_gap) < 0.05) > 0.9


def test_delong_edge_cases():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    same = delong_test(labels, scores, scores)
    assert same.p_value == 1.0 and same.difference == 0.0
    value, low, high = delong_interval(labels, scores)
    assert value == pytest.approx(roc_auc_score(labels, scores)) and 0 <= low <= value <= high <= 1
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.ones(4, int), scores[:4], scores[:4])


def test_threshold_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 100)
    probabilities = np.clip(0.3 * labels + 0.7 * rng.random(100), 0, 1)
    predicted = (probabilities >= 0.5).astype(int)
    assert accuracy(labels, probabilities) == pytest.approx(accuracy_score(labels, predicted))
    assert sensitivity(labels, probabilities) == pytest.approx(recall_score(labels, predicted))
    assert specificity(labels, probabilities) == pytest.approx(recall_score(1 - labels, 1 - predicted))
    assert our_f1(labels, probabilities) == pytest.approx(f1_score(labels, predicted))
    assert sum(confusion(labels, probabilities).values()) == 100
    assert np.isnan(sensitivity(np.zeros(3, int), np.ones(3)))


def _predictions(rng, n=80):
    labels, a, b = _correlated_scores(rng, n=n, separation=(2.0, 0.8))

    def rows(scores):
        probabilities = 1 / (1 + np.exp(-scores + 0.5))
        return [{"case_id": f"c{i}", "label": int(y), "p": float(p)}
                for i, (y, p) in enumerate(zip(labels, probabilities, strict=True))]

    return {"fused": rows(a), "image only": rows(b)}


def test_comparison_report_side_by_side_with_delong(tmp_path):
    predictions = _predictions(np.random.default_rng(4))
    report = write_comparison(predictions, tmp_path, "synthetic test predictions", score_key="p", num_bootstrap=200,
                              reference={"bayes_auroc": 0.9})
    assert set(report["models"]) == {"fused", "image only"}
    for metrics in report["models"].values():
        for name in ("auroc", "auprc", "accuracy", "f1", "sensitivity", "specificity"):
            assert metrics[name]["low"] <= metrics[name]["value"] <= metrics[name]["high"], name
    (comparison,) = report["comparisons"]
    assert comparison["a"] == "fused" and comparison["b"] == "image only" and comparison["p_value"] < 0.05
    assert report["reference"] == {"bayes_auroc": 0.9} and "not clinical performance" in report["note"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert (tmp_path / "report.md").read_text() == comparison_markdown(report)


def _estimate(value: float, low: float, high: float) -> dict:
    return {"value": value, "low": low, "high": high}


def test_comparison_markdown_of_a_small_report():
    metrics = {"auroc": _estimate(0.8321, 0.7766, 0.8884), "auprc": _estimate(0.81, 0.74, 0.87),
               "accuracy": _estimate(0.77, 0.71, 0.83), "f1": _estimate(0.7684, 0.7, 0.83),
               "sensitivity": _estimate(0.784, 0.7, 0.86), "specificity": _estimate(0.757, 0.67, 0.84),
               "threshold": 0.5}
    report = {
        "data": "out-of-fold predictions", "note": "a note", "score": "p", "num_cases": 200, "num_positive": 97,
        "models": {"fused": metrics, "image only": {**metrics, "auroc": _estimate(0.7944, 0.733, 0.8551)}},
        "comparisons": [{"a": "fused", "b": "image only", "difference": 0.0377, "ci_low": -0.0054, "ci_high": 0.0809,
                         "z": 1.7284, "p_value": 0.08392}],
        "reference": {"bayes_auroc": 0.909},
    }
    assert comparison_markdown(report) == """\
# Model comparison

- data: out-of-fold predictions
- cases: 200 (97 positive); score: `p`
- note: a note

| model | AUROC (95 % bootstrap CI) | AUPRC | accuracy | F1 | sensitivity | specificity |
|---|---|---|---|---|---|---|
| fused | 0.832 (0.777-0.888) | 0.810 (0.740-0.870) | 0.770 (0.710-0.830) | 0.768 (0.700-0.830) | \
0.784 (0.700-0.860) | 0.757 (0.670-0.840) |
| image only | 0.794 (0.733-0.855) | 0.810 (0.740-0.870) | 0.770 (0.710-0.830) | 0.768 (0.700-0.830) | \
0.784 (0.700-0.860) | 0.757 (0.670-0.840) |

Threshold metrics at probability >= 0.5.

| comparison | AUROC difference (95 % CI) | DeLong z | p |
|---|---|---|---|
| fused vs image only | +0.038 (-0.005 to +0.081) | 1.73 | 0.0839 |

Reference:

- bayes_auroc: 0.909
"""


def test_comparison_refuses_unpaired_cases(tmp_path):
    predictions = _predictions(np.random.default_rng(5))
    predictions["image only"] = predictions["image only"][1:]
    with pytest.raises(ValueError, match="predicted different cases"):
        write_comparison(predictions, tmp_path, "x", score_key="p")
