"""Fold assignment and the inner split: the exact refusals, warnings and tie-breaks."""

from __future__ import annotations

import logging

import pytest

from oncofusion.data.folds import _ordered, assign_folds, assign_missing_folds, inner_split
from oncofusion.targets import BinaryTarget

TARGET = BinaryTarget()


def _records(n: int = 8) -> list[dict]:
    return [{"case_id": f"c{i}", "patient_id": f"p{i}", "label": i % 2} for i in range(n)]


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        call(*args, **kwargs)
    return str(e.value)


def test_ids_of_mixed_types_are_ordered_by_type_name_then_repr():
    names = {f"n{i:02d}" for i in range(30)}
    assert _ordered(names | {10, 2}) == [10, 2, *sorted(names)]  # "10" sorts before "2"
    assert _ordered({10, 9, 1}) == [1, 9, 10]


def test_assign_folds_accepts_patient_ids_of_mixed_types():
    patients = ["b", 2, "a", 1, "b", 2]
    folds = assign_folds(patients, [0, 1, 0, 1, 0, 1], 2, seed=0)
    assert folds == assign_folds(patients, [0, 1, 0, 1, 0, 1], 2, seed=0)
    assert folds[0] == folds[4] and folds[1] == folds[5]


@pytest.mark.parametrize("num_folds", [2.5, "3", True, 1, None])
def test_num_folds_must_be_an_integer_of_at_least_two(num_folds):
    message = f"num_folds must be an integer of at least 2, got {num_folds!r}"
    assert _message(assign_folds, ["p1", "p2"], [0, 1], num_folds, 0) == message
    assert _message(assign_missing_folds, _records(), num_folds, TARGET) == message


def test_assign_folds_refuses_an_empty_datalist():
    assert _message(assign_folds, [], [], 2, 0) == "no cases to assign to folds: the datalist is empty"
    assert _message(assign_folds, ["p1"], [0, 1], 2, 0) == (
        "1 patient ids but 2 strata: give one of each per case")


def test_assign_folds_warns_only_when_folds_stay_empty(caplog):
    with caplog.at_level(logging.WARNING, logger="oncofusion.data.folds"):
        assert sorted(assign_folds(["p1", "p2", "p3"], [0, 1, 0], 3, 0)) == [0, 1, 2]
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="oncofusion.data.folds"):
        assign_folds(["p1", "p2", "p1"], [0, 1, 0], 5, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "2 patients for 5 folds: 3 folds will be empty; lower num_folds"]


def test_a_case_without_the_patient_key_is_named_or_said_to_lack_an_id():
    records = [{"case_id": "c1", "patient_id": "p1", "label": 0}, {"label": 1}]
    assert _message(assign_missing_folds, records, 2, TARGET) == (
        "case without case_id lacks the key 'patient_id': folds are grouped by patient; add it or pass the key "
        "that holds the patient id as patient_key")
    records[1] = {"case_id": "c2", "patient_id": None, "label": 1}
    assert _message(inner_split, records, 0.5, target=TARGET).startswith("case c2 lacks the key 'patient_id'")


@pytest.mark.parametrize("fold", [1.5, "1", True, -1, 3])
def test_a_kept_fold_must_be_an_integer_in_range(fold):
    records = _records(4)
    records[2]["fold"] = fold
    assert _message(assign_missing_folds, records, 3, TARGET) == (
        f"case c2: fold {fold!r} is not an integer in 0..2; fix it or remove it to have it assigned")
    del records[2]["case_id"]
    assert _message(assign_missing_folds, records, 3, TARGET).startswith("case without case_id: fold ")


def test_a_patient_split_over_two_folds_is_refused_naming_the_case():
    records = [{"case_id": "a", "patient_id": "p", "label": 0, "fold": 0},
               {"case_id": "b", "patient_id": "p", "label": 1, "fold": 1}]
    assert _message(assign_missing_folds, records, 2, TARGET) == (
        "case b is in fold 1 but another case of its patient is in fold 0: a patient's cases must share one fold")


def test_assign_missing_folds_seed_defaults_to_zero():
    records = _records()
    folds = [r["fold"] for r in assign_missing_folds(records, 3, TARGET)]
    assert folds == [r["fold"] for r in assign_missing_folds(records, 3, TARGET, seed=0)]
    assert folds != [r["fold"] for r in assign_missing_folds(records, 3, TARGET, seed=1)]
    assert folds == assign_folds([r["patient_id"] for r in records], [r["label"] for r in records], 3, 0)


def test_assign_missing_folds_keeps_given_folds_and_fills_the_rest():
    records = _records(6)
    records[0]["fold"] = 2
    records[3]["fold"] = 0
    records.append({"case_id": "c0b", "patient_id": "p0", "label": 1})
    out = assign_missing_folds(records, 3, TARGET)
    assert out[0]["fold"] == 2 and out[3]["fold"] == 0 and out[6]["fold"] == 2
    assert all(isinstance(r["fold"], int) and 0 <= r["fold"] < 3 for r in out)
    assert "fold" not in records[1]


def test_assign_missing_folds_warns_only_when_folds_stay_empty(caplog):
    with caplog.at_level(logging.WARNING, logger="oncofusion.data.folds"):
        assign_missing_folds(_records(3), 3, TARGET)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="oncofusion.data.folds"):
        assign_missing_folds(_records(2), 4, TARGET)
    assert [r.getMessage() for r in caplog.records] == [
        "2 patients for 4 folds: some folds are empty; lower num_folds"]


def test_inner_split_defaults_to_a_fifth_and_seed_zero():
    records = _records(10)
    train, validation = inner_split(records, target=TARGET)
    assert (len(train), len(validation)) == (8, 2)
    assert (train, validation) == inner_split(records, 0.2, target=TARGET, seed=0)
    names = [r["case_id"] for r in inner_split(_records(), target=TARGET)[1]]
    assert names != [r["case_id"] for r in inner_split(_records(), target=TARGET, seed=1)[1]]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_inner_split_fraction_lies_strictly_between_zero_and_one(fraction):
    assert _message(inner_split, _records(), fraction, target=TARGET) == (
        f"fraction is the validation share and must lie in (0, 1), got {fraction!r}")


def test_inner_split_needs_two_patients_and_works_with_two():
    one = [{"case_id": f"c{i}", "patient_id": "p", "label": i % 2} for i in range(4)]
    assert _message(inner_split, one, 0.5, target=TARGET) == (
        "inner_split needs at least 2 patients in the training folds, got 1")
    train, validation = inner_split(_records(2), 0.5, target=TARGET)
    assert len(train) == 1 and len(validation) == 1


def test_inner_split_refuses_a_fraction_that_leaves_validation_empty():
    records = [{"case_id": "a", "patient_id": "p1", "label": 0}, {"case_id": "b", "patient_id": "p2", "label": 1}]
    assert _message(inner_split, records, 0.1, target=TARGET) == (
        "a validation fraction of 0.1 over 2 patients leaves one side empty; raise the fraction or add patients")


def test_inner_split_overall_quota_breaks_a_tie_of_the_stratum_quota():
    """fraction 0.25 over 7 cases (6 of class 0): p2 (3 cases) trains; p0 (one case of each class, so its
    majority is class 0) finds both sides exactly at their class-0 quota (3 - 0.75 * 6 == 0 - 0.25 * 6) and
    goes to training, which is further below its overall quota (3 - 0.75 * 7 < 0 - 0.25 * 7); p1 and p3
    then fill validation."""
    labels = {"p0": [1, 0], "p1": [0], "p2": [0, 0, 0], "p3": [0]}
    records = [{"case_id": f"{p}c{i}", "patient_id": p, "label": v}
               for p, values in labels.items() for i, v in enumerate(values)]
    train, validation = inner_split(records, 0.25, target=TARGET, seed=0)
    assert sorted(r["case_id"] for r in validation) == ["p1c0", "p3c0"]
    assert sorted(r["patient_id"] for r in train) == ["p0", "p0", "p2", "p2", "p2"]
