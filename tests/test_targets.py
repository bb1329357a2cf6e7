"""Targets: parsing and its error messages, strata, sample weights, losses, config instantiation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from oncofusion.losses.classification import LabelCrossEntropyLoss
from oncofusion.losses.survival import CoxPartialLikelihoodLoss
from oncofusion.targets import BinaryTarget, MultiClassTarget, SurvivalTarget, Target

TUMOUR = BinaryTarget(key="malignant", class_names=("benign", "malignant"))
SUBTYPE = MultiClassTarget(key="subtype", class_names=("adeno", "squamous", "small-cell"))
SURVIVAL = SurvivalTarget(time_key="os", event_key="death", time_unit="months")


def test_config_instantiates_each_target_by_target_key():
    parser = ConfigParser({
        "binary": {"_target_": "oncofusion.targets.BinaryTarget", "key": "malignant",
                   "class_names": ["benign", "malignant"]},
        "multi": {"_target_": "oncofusion.targets.MultiClassTarget", "key": "subtype",
                  "class_names": ["adeno", "squamous", "small-cell"]},
        "survival": {"_target_": "oncofusion.targets.SurvivalTarget", "time_key": "os", "event_key": "death"},
    })
    assert parser.get_parsed_content("binary") == TUMOUR
    assert parser.get_parsed_content("multi") == SUBTYPE
    survival = parser.get_parsed_content("survival")
    assert survival == SURVIVAL and isinstance(survival, Target)
    assert [t.kind for t in (TUMOUR, SUBTYPE, survival)] == ["binary", "multiclass", "survival"]
    assert [t.evaluation for t in (TUMOUR, SUBTYPE, survival)] == ["classification", "classification", "survival"]
    assert [t.num_outputs for t in (TUMOUR, SUBTYPE, survival)] == [2, 3, 1]


def test_binary_defaults_and_keys():
    target = BinaryTarget()
    assert target.key == "label" and target.class_names == ("negative", "positive")
    assert target.keys == ("label",)
    assert SURVIVAL.keys == ("os", "death")


@pytest.mark.parametrize("value, expected", [
    (0, 0), (1, 1), (True, 1), (np.int64(1), 1), (1.0, 1), ("benign", 0), ("malignant", 1),
    (torch.tensor([1]), 1),
])
def test_binary_parse_accepts_indices_bools_and_names(value, expected):
    fields = TUMOUR.parse({"case_id": "c1", "malignant": value, "other": "ignored"})
    assert fields == {"malignant": expected}
    assert type(fields["malignant"]) is int


@pytest.mark.parametrize("case, message", [
    ({"case_id": "lung-003", "malignant": 3}, "case lung-003: 'malignant' 3 lies outside 0..1 for classes "
                                             "benign, malignant"),
    ({"case_id": "lung-004", "malignant": -1}, "case lung-004: 'malignant' -1 lies outside 0..1"),
    ({"case_id": "lung-005", "malignant": "maligant"}, "case lung-005: 'malignant' is 'maligant', not one of "
                                                      "the classes benign, malignant"),
    ({"case_id": "lung-006", "malignant": 0.5}, "case lung-006: 'malignant' is 0.5; expected a class index"),
    ({"case_id": "lung-007"}, "case lung-007 lacks the key 'malignant'"),
    ({"case_id": "lung-008", "malignant": None}, "case lung-008 lacks the key 'malignant'"),
    ({"malignant": 2}, "a case without case_id: 'malignant' 2 lies outside"),
])
def test_binary_parse_errors_name_case_key_and_expectation(case, message):
    with pytest.raises(ValueError) as error:
        TUMOUR.parse(case)
    assert message in str(error.value)


def test_multiclass_parse_and_range():
    assert SUBTYPE.parse({"subtype": "small-cell"}) == {"subtype": 2}
    assert SUBTYPE.parse({"subtype": 1}) == {"subtype": 1}
    with pytest.raises(ValueError, match=r"case x: 'subtype' 3 lies outside 0..2 for classes adeno, squamous, "
                                         r"small-cell"):
        SUBTYPE.parse({"case_id": "x", "subtype": 3})


@pytest.mark.parametrize("make, message", [
    (lambda: BinaryTarget(class_names=("a", "b", "c")), "needs 2 names"),
    (lambda: MultiClassTarget(class_names=("a",)), "needs at least 2 names"),
    (lambda: MultiClassTarget(), "needs at least 2 names"),
    (lambda: MultiClassTarget(class_names=("a", "a")), "repeat a name"),
    (lambda: BinaryTarget(class_names="ab"), "must be a list of names"),
])
def test_class_names_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_survival_parse_converts_and_validates():
    assert SURVIVAL.parse({"os": 12, "death": True}) == {"os": 12.0, "death": 1}
    assert SURVIVAL.parse({"os": np.float32(3.5), "death": 0.0}) == {"os": 3.5, "death": 0}
    cases = [
        ({"case_id": "p1", "os": 0, "death": 1}, "case p1: 'os' is 0; follow-up must be > 0 months"),
        ({"case_id": "p2", "os": -2.0, "death": 1}, "case p2: 'os' is -2.0; follow-up must be > 0"),
        ({"case_id": "p3", "os": float("nan"), "death": 1}, "case p3: 'os' is nan; expected a finite number"),
        ({"case_id": "p4", "os": "12", "death": 1}, "case p4: 'os' is '12'; expected a finite number"),
        ({"case_id": "p5", "os": 5, "death": 2}, "case p5: 'death' is 2; expected 1 (event observed), 0"),
        ({"case_id": "p6", "os": 5, "death": "yes"}, "case p6: 'death' is 'yes'"),
        ({"case_id": "p7", "death": 1}, "case p7 lacks the key 'os'"),
        ({"case_id": "p8", "os": 4}, "case p8 lacks the key 'death'"),
    ]
    for case, message in cases:
        with pytest.raises(ValueError) as error:
            SURVIVAL.parse(case)
        assert message in str(error.value), case


def test_strata():
    assert TUMOUR.stratum({"malignant": "malignant"}) == 1
    assert SUBTYPE.stratum({"subtype": 2}) == 2
    assert SURVIVAL.stratum({"os": 3.0, "death": False}) == 0
    assert SURVIVAL.stratum({"os": 3.0, "death": 1}) == 1


def test_sample_weights_are_inverse_stratum_frequency():
    datalist = [{"malignant": v} for v in (0, 0, 0, 1)]
    np.testing.assert_allclose(TUMOUR.sample_weights(datalist).numpy(), [1 / 3, 1 / 3, 1 / 3, 1.0])
    datalist = [{"subtype": v} for v in ("adeno", 2, 2, 1, "adeno")]
    np.testing.assert_allclose(SUBTYPE.sample_weights(datalist).numpy(), [0.5, 0.5, 0.5, 1.0, 0.5])
    datalist = [{"os": t, "death": e} for t, e in ((1, 1), (2, 0), (3, 0), (4, 0), (5, 0))]
    weights = SURVIVAL.sample_weights(datalist)
    np.testing.assert_allclose(weights.numpy(), [1.0, 0.25, 0.25, 0.25, 0.25])
    assert weights.dtype == torch.double
    with pytest.raises(ValueError, match="empty datalist"):
        TUMOUR.sample_weights([])


def test_default_losses_and_tensors():
    assert isinstance(TUMOUR.default_loss(), LabelCrossEntropyLoss)
    assert isinstance(SUBTYPE.default_loss(), torch.nn.CrossEntropyLoss)
    assert isinstance(SURVIVAL.default_loss(), CoxPartialLikelihoodLoss)
    label = TUMOUR.to_tensor({"malignant": "malignant"})
    assert label.dtype == torch.long and label.tolist() == [1]
    packed = SURVIVAL.to_tensor({"os": 7.5, "death": True})
    assert packed.dtype == torch.float32 and packed.tolist() == [7.5, 1.0]

    logits = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    labels = torch.stack([TUMOUR.to_tensor({"malignant": v}) for v in (0, 1)])  # (B, 1) as batched
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    torch.testing.assert_close(TUMOUR.default_loss()(logits, labels), expected)
