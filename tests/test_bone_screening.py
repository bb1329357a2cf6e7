"""The clinical screening step: a multivariable logistic regression recovers the generator's effects,
writes JSON and markdown, and fails soft on tables too small to fit; the clinical-only baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from oncofusion.data.clinical import ClinicalSchema
from oncofusion.evaluation.screening import (
    design_matrix,
    out_of_fold_clinical,
    screening_markdown,
    screening_report,
    write_screening,
)
from oncofusion.metrics.classification import auroc
from sample_data.generate_bone import clinical_record, sample_clinical, sample_labels
from tests.bone_helpers import BONE_BUNDLE

FIELDS = json.loads((BONE_BUNDLE / "configs" / "inference.json").read_text())["clinical_fields"]


def _table(num: int, seed: int = 0) -> list[dict]:
    """Clinical records drawn from the synthetic generator's class-conditional tables."""
    rng = np.random.default_rng(seed)
    labels = sample_labels(rng, num)
    clinical = sample_clinical(rng, labels)
    return [{**clinical_record(clinical, i), "label": int(labels[i]), "fold": i % 5, "case_id": f"c{i}"}
            for i in range(num)]


@pytest.fixture(scope="module")
def schema() -> ClinicalSchema:
    return ClinicalSchema(FIELDS)


def test_design_matrix_uses_reference_levels_and_missing_indicators(schema):
    records = [{"sex": "male", "age": 20, "location": "metaphysis", "fracture": True},
               {"sex": "female", "age": 60, "location": None, "fracture": False}]
    matrix, names, fields = design_matrix(records, schema)
    assert "location: metaphysis vs diaphysis" in names and "location: diaphysis vs diaphysis" not in names
    assert "age (per 10 years)" in names and "location: missing" in names and "fracture: missing" not in names
    assert matrix[0, names.index("age (per 10 years)")] == pytest.approx(2.0)
    assert matrix[1, names.index("location: missing")] == 1.0
    assert fields[names.index("sex: male vs female")] == "sex"


# the regression's terms, written out from the records without the package's design matrix
TERMS = {
    "sex: male vs female": lambda r: r["sex"] == "male",
    "age (per 10 years)": lambda r: r["age"] / 10,
    **{f"location: {level} vs diaphysis": (lambda r, level=level: r["location"] == level)
       for level in ("epiphysis", "metaphysis", "flat bone", "spine")},
    "location: missing": lambda r: r["location"] is None,
    "fracture: yes vs no": lambda r: r["fracture"] is True,
    "fracture: missing": lambda r: r["fracture"] is None,
}


def _statsmodels_logit(records: list[dict], terms: list[str]):
    import statsmodels.api as sm

    x = np.array([[float(TERMS[t](r)) for t in terms] for r in records])
    return sm.Logit(np.array([r["label"] for r in records]), sm.add_constant(x)).fit(disp=0, method="newton")


def test_screening_equals_an_independent_statsmodels_fit(schema, tmp_path):
    from scipy.stats import chi2

    records = _table(800)
    report = write_screening(records, schema, tmp_path, "synthetic table", outcome="osteoid vs chondroid")
    assert [t["term"] for t in report["terms"]] == list(TERMS)
    full = _statsmodels_logit(records, list(TERMS))
    intervals = np.exp(full.conf_int(alpha=0.05)[1:])
    for term, b, (low, high), p in zip(report["terms"], full.params[1:], intervals, full.pvalues[1:], strict=True):
        assert term["odds_ratio"] == pytest.approx(np.exp(b), rel=1e-6), term["term"]
        assert (term["ci_low"], term["ci_high"]) == pytest.approx((low, high), rel=1e-6), term["term"]
        assert term["p_value"] == pytest.approx(p, rel=1e-6, abs=1e-12), term["term"]
    assert report["pseudo_r2"] == pytest.approx(full.prsquared, rel=1e-6)
    # one likelihood-ratio test per field: all of its terms dropped together
    for test in report["fields"]:
        kept = [t for t in TERMS if not t.startswith(test["field"])]
        statistic = 2 * (full.llf - _statsmodels_logit(records, kept).llf)
        assert test["df"] == len(TERMS) - len(kept) and test["lr_statistic"] == pytest.approx(statistic, rel=1e-6)
        assert test["p_value"] == pytest.approx(chi2.sf(statistic, test["df"]), rel=1e-6, abs=1e-12)
        assert test["selected"] == (test["p_value"] < 0.05)
    # the generator's direction of each effect: osteoid tumors in younger, male, metaphyseal patients
    terms = {t["term"]: t for t in report["terms"]}
    assert terms["age (per 10 years)"]["odds_ratio"] < 1 and terms["age (per 10 years)"]["p_value"] < 0.001
    assert terms["location: metaphysis vs diaphysis"]["odds_ratio"] > 1.5
    assert terms["sex: male vs female"]["odds_ratio"] > 1
    assert {"age", "location"} <= set(report["selected_fields"])
    assert [f["field"] for f in report["fields"]] == ["sex", "age", "location", "fracture"]
    assert report["converged"] and report["num_cases"] == 800
    assert report["num_events"] == sum(r["label"] for r in records)
    assert json.loads((tmp_path / "screening.json").read_text()) == report
    assert (tmp_path / "screening.md").read_text() == screening_markdown(report)


SMALL_REPORT = {
    "data": "a table", "note": "a note", "method": "a method", "outcome": "osteoid vs chondroid", "alpha": 0.05,
    "num_cases": 120, "num_events": 50, "pseudo_r2": 0.1234, "dropped_terms": ["location: spine vs diaphysis"],
    "terms": [
        {"term": "sex: male vs female", "field": "sex", "odds_ratio": 1.5, "ci_low": 0.75, "ci_high": 3.0,
         "p_value": 0.2513},
        {"term": "age (per 10 years)", "field": "age", "odds_ratio": 0.666, "ci_low": 0.554, "ci_high": 0.801,
         "p_value": 0.0002},
    ],
    "fields": [
        {"field": "sex", "df": 1, "lr_statistic": 1.3149, "p_value": 0.2515, "selected": False},
        {"field": "age", "df": 1, "lr_statistic": 14.2, "p_value": float("nan"), "selected": True},
    ],
    "selected_fields": ["age"],
    "warnings": ["a warning"],
}


def test_screening_markdown_of_a_small_report():
    assert screening_markdown(SMALL_REPORT) == """\
# Clinical-feature screening

- data: a table
- outcome: osteoid vs chondroid; 120 cases, 50 events
- method: a method
- note: a note

| term | odds ratio | 95 % CI | p |
|---|---|---|---|
| sex: male vs female | 1.50 | 0.75-3.00 | 0.251 |
| age (per 10 years) | 0.67 | 0.55-0.80 | <0.001 |

Per field (likelihood-ratio test, selected when p < 0.05):

| field | df | LR chi2 | p | selected |
|---|---|---|---|---|
| sex | 1 | 1.31 | 0.252 | no |
| age | 1 | 14.20 | n/a | yes |

Selected: age. McFadden pseudo-R2 0.123.
Terms without variation, left out: location: spine vs diaphysis.
Fit warnings: a warning.
"""
    unfitted = {**SMALL_REPORT, "error": "too few cases"}
    assert screening_markdown(unfitted) == """\
# Clinical-feature screening

- data: a table
- outcome: osteoid vs chondroid; 120 cases, 50 events
- method: a method
- note: a note

**Not fitted:** too few cases
"""


def test_screening_fails_soft_on_a_tiny_table(schema):
    report = screening_report(_table(8), schema, "eight cases")
    assert "error" in report and report["selected_fields"] == []
    assert "Not fitted" in screening_markdown(report)


def _logistic_scores(schema, train: list[dict], test: list[dict]) -> np.ndarray:
    """P(label 1) of ``test`` under an L2 (C = 1) logistic regression fitted on ``train`` alone."""
    from sklearn.linear_model import LogisticRegression

    x_train = np.stack([schema.encode_raw(r) for r in train])
    model = LogisticRegression(C=1.0, max_iter=1000).fit(x_train, [r["label"] for r in train])
    return model.predict_proba(np.stack([schema.encode_raw(r) for r in test]))[:, 1]


def test_clinical_only_baseline_is_out_of_fold(schema):
    records = _table(400, seed=1)
    rows = out_of_fold_clinical(records, schema, score_key="osteoid_probability")
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in records]
    scores = np.array([r["osteoid_probability"] for r in rows])
    # each case scored by a regression that never saw its fold ...
    expected = np.full(len(records), np.nan)
    for fold in range(5):
        held_out = [i for i, r in enumerate(records) if r["fold"] == fold]
        expected[held_out] = _logistic_scores(schema, [r for r in records if r["fold"] != fold],
                                              [records[i] for i in held_out])
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    # ... which is not the regression fitted on every fold
    in_sample = _logistic_scores(schema, records, records)
    assert np.mean(np.abs(scores - in_sample) > 1e-4) > 0.9
    assert 0.7 < auroc(np.array([r["label"] for r in rows]), scores) < 0.9
    subset = out_of_fold_clinical(records, schema, folds=[2])
    assert subset and {r["fold"] for r in subset} == {2}
    by_id = {r["case_id"]: r["probability"] for r in out_of_fold_clinical(records, schema)}
    assert all(by_id[r["case_id"]] == pytest.approx(r["probability"]) for r in subset)
