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


def test_screening_recovers_the_generators_effects(schema, tmp_path):
    report = write_screening(_table(800), schema, tmp_path, "synthetic table", outcome="osteoid vs chondroid")
    terms = {t["term"]: t for t in report["terms"]}
    age = terms["age (per 10 years)"]
    assert age["odds_ratio"] < 1 and age["p_value"] < 0.001 and age["ci_low"] < age["odds_ratio"] < age["ci_high"]
    assert terms["location: metaphysis vs diaphysis"]["odds_ratio"] > 1.5
    assert terms["sex: male vs female"]["odds_ratio"] > 1
    assert {"age", "location"} <= set(report["selected_fields"])
    assert [f["field"] for f in report["fields"]] == ["sex", "age", "location", "fracture"]
    assert report["converged"] and 0 < report["pseudo_r2"] < 1
    assert json.loads((tmp_path / "screening.json").read_text()) == report
    markdown = (tmp_path / "screening.md").read_text()
    assert markdown == screening_markdown(report) and "| age (per 10 years) |" in markdown and "Selected:" in markdown


def test_screening_fails_soft_on_a_tiny_table(schema):
    report = screening_report(_table(8), schema, "eight cases")
    assert "error" in report and report["selected_fields"] == []
    assert "Not fitted" in screening_markdown(report)


def test_clinical_only_baseline_is_out_of_fold(schema):
    records = _table(400, seed=1)
    rows = out_of_fold_clinical(records, schema, score_key="osteoid_probability")
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in records]
    score = auroc(np.array([r["label"] for r in rows]), np.array([r["osteoid_probability"] for r in rows]))
    assert 0.7 < score < 0.9
    subset = out_of_fold_clinical(records, schema, folds=[2])
    assert subset and {r["fold"] for r in subset} == {2}
    by_id = {r["case_id"]: r["probability"] for r in out_of_fold_clinical(records, schema)}
    assert all(by_id[r["case_id"]] == pytest.approx(r["probability"]) for r in subset)
