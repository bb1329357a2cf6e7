"""Targets: the exact error messages a datalist author reads, and the tensors the batches carry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oncofusion.targets import BinaryTarget, MultiClassTarget, SurvivalTarget

SUBTYPE = MultiClassTarget(key="subtype", class_names=("adeno", "squamous", "small-cell"))
SURVIVAL = SurvivalTarget(time_key="os", event_key="death", time_unit="weeks")


def _message(call, *args) -> str:
    with pytest.raises(ValueError) as e:
        call(*args)
    return str(e.value)


@pytest.mark.parametrize("case", [["subtype", 1], "subtype", 3])
def test_a_case_that_is_no_mapping_is_refused_by_type(case):
    assert _message(SUBTYPE.parse, case) == (
        f"a case must be a mapping of field names to values, got {type(case).__name__}")


def test_class_index_messages_give_the_range_and_the_names():
    assert _message(SUBTYPE.parse, {"case_id": "c1", "subtype": "large-cell"}) == (
        "case c1: 'subtype' is 'large-cell', not one of the classes adeno, squamous, small-cell (nor an index 0..2)")
    assert _message(SUBTYPE.parse, {"case_id": "c2", "subtype": 1.5}) == (
        "case c2: 'subtype' is 1.5; expected a class index 0..2 or a class name (adeno, squamous, small-cell)")
    assert _message(SUBTYPE.parse, {"subtype": float("inf")}) == (
        "a case without case_id: 'subtype' is inf; expected a class index 0..2 or a class name "
        "(adeno, squamous, small-cell)")
    assert _message(SUBTYPE.class_index, 7) == (
        "a case without case_id: 'subtype' 7 lies outside 0..2 for classes adeno, squamous, small-cell")


@pytest.mark.parametrize("value, expected", [
    (np.array(2), 2), (np.array([1]), 1), (torch.tensor(2.0), 2), (np.float32(0.0), 0), ("squamous", 1),
])
def test_class_index_reads_one_element_arrays_and_names(value, expected):
    assert SUBTYPE.class_index(value) == expected


def test_class_index_refuses_arrays_of_several_values():
    with pytest.raises(ValueError, match=r"'subtype' is array\(\[1, 2\]\); expected a class index"):
        SUBTYPE.class_index(np.array([1, 2]))


@pytest.mark.parametrize("make, message", [
    (lambda: BinaryTarget(class_names="ab"), "BinaryTarget: class_names must be a list of names, got 'ab'"),
    (lambda: MultiClassTarget(class_names=3), "MultiClassTarget: class_names must be a list of names, got 3"),
    (lambda: BinaryTarget(class_names=("a", "b", "c")), "BinaryTarget: class_names needs 2 names, got ['a', 'b', 'c']"),
    (lambda: MultiClassTarget(class_names=("a",)), "MultiClassTarget: class_names needs at least 2 names, got ['a']"),
    (lambda: MultiClassTarget(class_names=("a", "b", "a")),
     "MultiClassTarget: class_names repeat a name: ['a', 'b', 'a']"),
])
def test_class_names_messages_name_the_target(make, message):
    assert _message(make) == message


def test_class_names_become_a_tuple_of_strings():
    target = MultiClassTarget(class_names=[0, 1, 2])
    assert target.class_names == ("0", "1", "2") and target.num_outputs == 3
    assert target.class_index("2") == 2 and target.class_index(2) == 2


def test_survival_messages_name_the_case_the_key_and_the_unit():
    assert _message(SURVIVAL.parse, {"case_id": "p1", "os": 0.0, "death": 1}) == (
        "case p1: 'os' is 0.0; follow-up must be > 0 weeks (check the index and last-contact dates)")
    assert _message(SURVIVAL.parse, {"case_id": "p2", "os": True, "death": 1}) == (
        "case p2: 'os' is True; expected a finite number of weeks")
    assert _message(SURVIVAL.parse, {"case_id": "p3", "os": 2, "death": 0.5}) == (
        "case p3: 'death' is 0.5; expected 1 (event observed), 0 (censored) or a bool")
    assert _message(SURVIVAL.stratum, {"case_id": "p4", "death": -1}) == (
        "case p4: 'death' is -1; expected 1 (event observed), 0 (censored) or a bool")
    assert _message(SURVIVAL.stratum, {"case_id": "p5"}) == (
        "case p5 lacks the key 'death'; add it to the datalist or change the target's key")


def test_survival_reads_numpy_and_tensor_values():
    assert SURVIVAL.parse({"os": np.array([2.5]), "death": torch.tensor(True)}) == {"os": 2.5, "death": 1}
    assert SURVIVAL.stratum({"death": np.int64(0)}) == 0
    assert SURVIVAL.keys == ("os", "death") and SURVIVAL.num_outputs == 1


def test_sample_weights_refuse_an_empty_datalist_with_the_fix():
    assert _message(SUBTYPE.sample_weights, []) == (
        "cannot weight an empty datalist; check the folds the config selects")


def test_class_to_tensor_is_a_long_channel():
    label = SUBTYPE.to_tensor({"subtype": "small-cell"})
    assert label.dtype == torch.long and label.shape == (1,) and label.item() == 2
