"""The balanced training sampler every bundle's train.json uses."""

from __future__ import annotations

import pytest
import torch

from oncofusion.data.sampling import balanced_sampler
from oncofusion.targets import BinaryTarget


def records(positives: int, negatives: int) -> list[dict]:
    return [{"label": 1}] * positives + [{"label": 0}] * negatives


def test_classes_are_drawn_equally_often_from_an_imbalanced_cohort():
    datalist = records(10, 90)
    drawn = [datalist[i]["label"] for _ in range(20) for i in balanced_sampler(datalist, BinaryTarget(), seed=_)]
    assert len(drawn) == 20 * 100
    assert sum(drawn) / len(drawn) == pytest.approx(0.5, abs=0.03)


def test_a_fold_smaller_than_one_batch_still_trains_one_full_batch():
    """With ``drop_last`` (the bundles' train loaders), an epoch of 5 records and batch 16 trained nothing."""
    datalist = records(2, 3)
    sampler = balanced_sampler(datalist, BinaryTarget(), batch_size=16)
    loader = torch.utils.data.DataLoader(datalist, batch_size=16, sampler=sampler, drop_last=True)
    assert [len(batch["label"]) for batch in loader] == [16]
    assert len(balanced_sampler(records(20, 20), BinaryTarget(), batch_size=16)) == 40


def test_an_empty_training_part_is_refused():
    with pytest.raises(ValueError, match="no training records"):
        balanced_sampler([], BinaryTarget())
