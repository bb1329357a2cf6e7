"""Fold assignment: the sample generators' algorithm reproduced, grouping, stratification, inner split."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from oncofusion.data.folds import assign_folds, assign_missing_folds, inner_split
from oncofusion.targets import BinaryTarget, MultiClassTarget, SurvivalTarget

#: folds the sample-data generators' original algorithm assigned to the cohorts below (recorded once), so
#: that regenerated sample data keeps its folds
GENERATOR_FOLDS = json.loads((Path(__file__).parent / "data" / "generator_folds.json").read_text())


def _cohort(seed: int, num_cases: int = 60, max_cases_per_patient: int = 4, num_strata: int = 2):
    """Patients with 1..max cases each, labels drawn per case (so some patients have mixed labels)."""
    rng = np.random.default_rng(seed)
    patients, strata = [], []
    p = 0
    while len(patients) < num_cases:
        for _ in range(int(rng.integers(1, max_cases_per_patient + 1))):
            patients.append(f"P{p:03d}")
            strata.append(int(rng.integers(0, num_strata)))
        p += 1
    order = rng.permutation(len(patients))  # cases of one patient need not be adjacent
    return [patients[i] for i in order], [strata[i] for i in order]


@pytest.mark.parametrize("seed", range(40))
def test_reproduces_the_sample_generators_assignment(seed):
    patients, labels = _cohort(seed, num_cases=20 + 3 * seed)
    recorded = GENERATOR_FOLDS["cohorts"][seed]
    assert assign_folds(patients, labels, recorded["num_folds"], seed) == recorded["folds"]


def test_reproduces_generator_with_tied_majorities():
    # every patient has one case of each label: the tie must go to label 0, as round(0.5) does there
    patients = [f"P{i // 2}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    for seed in range(10):
        assert assign_folds(patients, labels, 3, seed) == GENERATOR_FOLDS["tied"][seed]


def _check_grouped(patients, folds):
    by_patient = defaultdict(set)
    for patient, fold in zip(patients, folds, strict=True):
        by_patient[patient].add(fold)
    assert all(len(f) == 1 for f in by_patient.values())


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_strata_are_grouped_balanced_and_stratified(seed):
    patients, strata = _cohort(seed, num_cases=300, max_cases_per_patient=2, num_strata=3)
    names = ["adeno", "squamous", "small-cell"]
    strata = [names[s] for s in strata]  # any hashable stratum, here strings
    folds = assign_folds(patients, strata, 5, seed)
    _check_grouped(patients, folds)
    sizes = Counter(folds)
    assert sorted(sizes) == [0, 1, 2, 3, 4]
    assert max(sizes.values()) - min(sizes.values()) <= 3
    for name in names:
        per_fold = Counter(f for f, s in zip(folds, strata, strict=True) if s == name)
        assert max(per_fold.values()) - min(per_fold.values()) <= 3, (name, per_fold)
    assert folds == assign_folds(patients, strata, 5, seed)
    assert folds != assign_folds(patients, strata, 5, seed + 1)


def test_errors_and_warnings(caplog):
    with pytest.raises(ValueError, match="num_folds must be an integer of at least 2, got 1"):
        assign_folds(["a", "b"], [0, 1], 1, 0)
    with pytest.raises(ValueError, match="3 patient ids but 2 strata"):
        assign_folds(["a", "b", "c"], [0, 1], 2, 0)
    with pytest.raises(ValueError, match="datalist is empty"):
        assign_folds([], [], 2, 0)
    with caplog.at_level(logging.WARNING):
        folds = assign_folds(["a", "a", "b"], [0, 1, 1], 3, 0)
    assert "2 patients for 3 folds" in caplog.text
    assert folds[0] == folds[1] and folds[2] != folds[0]


TARGET = BinaryTarget(key="label", class_names=("benign", "malignant"))


def _records(seed: int, num_cases: int = 80):
    patients, labels = _cohort(seed, num_cases=num_cases)
    return [{"case_id": f"c{i}", "patient_id": p, "label": ["benign", "malignant"][y]}
            for i, (p, y) in enumerate(zip(patients, labels, strict=True))]


def test_assign_missing_folds_without_any_fold_equals_assign_folds():
    records = _records(3)
    filled = assign_missing_folds(records, 4, TARGET, seed=3)
    expected = assign_folds([r["patient_id"] for r in records], [TARGET.stratum(r) for r in records], 4, 3)
    assert [r["fold"] for r in filled] == expected
    assert all("fold" not in r for r in records)  # the input is not modified


def test_assign_missing_folds_keeps_given_folds_and_fills_the_rest():
    records = _records(4)
    given = {}
    for i, record in enumerate(records):
        if i % 3 == 0:
            fold = sum(map(ord, record["patient_id"])) % 4  # one fold per patient, chosen by its id
            record["fold"] = fold
            given[i] = fold
        elif i % 7 == 0:
            record["fold"] = None  # JSON null counts as missing
    filled = assign_missing_folds(records, 4, TARGET, seed=0)
    assert all(filled[i]["fold"] == fold for i, fold in given.items())
    assert all(isinstance(r["fold"], int) and 0 <= r["fold"] < 4 for r in filled)
    _check_grouped([r["patient_id"] for r in filled], [r["fold"] for r in filled])
    sizes = Counter(r["fold"] for r in filled)
    assert max(sizes.values()) - min(sizes.values()) <= 8, sizes


def test_assign_missing_folds_evens_out_the_given_folds():
    # fold 0 already holds 10 patients; the 10 new ones must go to fold 1
    records = [{"case_id": f"old{i}", "patient_id": f"old{i}", "label": i % 2, "fold": 0} for i in range(10)]
    records += [{"case_id": f"new{i}", "patient_id": f"new{i}", "label": i % 2} for i in range(10)]
    filled = assign_missing_folds(records, 2, TARGET, seed=0)
    assert [r["fold"] for r in filled] == [0] * 10 + [1] * 10


def test_assign_missing_folds_errors():
    records = [{"case_id": "a1", "patient_id": "A", "label": 0, "fold": 0},
               {"case_id": "a2", "patient_id": "A", "label": 1, "fold": 1}]
    with pytest.raises(ValueError, match="case a2 is in fold 1 but another case of its patient is in fold 0"):
        assign_missing_folds(records, 2, TARGET)
    with pytest.raises(ValueError, match=r"case a1: fold 5 is not an integer in 0..1"):
        assign_missing_folds([{"case_id": "a1", "patient_id": "A", "label": 0, "fold": 5}], 2, TARGET)
    with pytest.raises(ValueError, match="case b1 lacks the key 'patient_id'"):
        assign_missing_folds([{"case_id": "b1", "label": 0}], 2, TARGET)
    with pytest.raises(ValueError, match="case c1: 'label' 4 lies outside"):
        assign_missing_folds([{"case_id": "c1", "patient_id": "C", "label": 4}], 2, TARGET)


def test_assign_missing_folds_stratifies_survival_by_event():
    target = SurvivalTarget()
    rng = np.random.default_rng(0)
    records = [{"patient_id": f"P{i}", "time": float(rng.uniform(1, 60)), "event": int(i < 20)}
               for i in range(100)]
    filled = assign_missing_folds(records, 5, target, seed=1)
    events_per_fold = Counter(r["fold"] for r in filled if r["event"])
    assert sorted(events_per_fold.values()) == [4, 4, 4, 4, 4]
    assert sorted(Counter(r["fold"] for r in filled).values()) == [20] * 5


@pytest.mark.parametrize("seed", range(5))
def test_inner_split_is_grouped_stratified_and_near_the_fraction(seed):
    records = _records(seed, num_cases=200)
    train, validation = inner_split(records, 0.25, target=TARGET, seed=seed)
    assert len(train) + len(validation) == len(records)
    train_patients = {r["patient_id"] for r in train}
    assert not train_patients & {r["patient_id"] for r in validation}
    assert abs(len(validation) / len(records) - 0.25) < 0.04
    for label in ("benign", "malignant"):
        share = (sum(r["label"] == label for r in validation) / sum(r["label"] == label for r in records))
        assert abs(share - 0.25) < 0.05, (label, share)
    again = inner_split(records, 0.25, target=TARGET, seed=seed)
    assert again == (train, validation)


def test_inner_split_errors():
    records = [{"patient_id": "A", "label": 0}, {"patient_id": "A", "label": 1}]
    with pytest.raises(ValueError, match="at least 2 patients"):
        inner_split(records, 0.2, target=TARGET)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\), got 1.0"):
        inner_split(records, 1.0, target=TARGET)
    multi = MultiClassTarget(class_names=("a", "b", "c"))
    records = [{"patient_id": f"P{i}", "label": i % 3} for i in range(30)]
    train, validation = inner_split(records, 0.2, target=multi, seed=0)
    assert Counter(r["label"] for r in validation) == {0: 2, 1: 2, 2: 2}
