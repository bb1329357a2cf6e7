"""Balanced sampling: each stratum of the target (a class, or events vs censored cases) is drawn equally
often in expectation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oncofusion.targets import Target


def balanced_sampler(datalist: Sequence[dict], target: Target, seed: int = 0,
                     batch_size: int = 1) -> torch.utils.data.WeightedRandomSampler:
    """A with-replacement sampler that draws ``len(datalist)`` records per epoch, strata balanced.

    An epoch draws at least ``batch_size`` records: with fewer (a small fold of a small cohort), a loader
    that drops the last partial batch would train nothing, and the run would end without a checkpoint
    and without an error.
    """
    if not datalist:
        raise ValueError("no training records: the fold's training part is empty")
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(
        target.sample_weights(datalist), num_samples=max(len(datalist), batch_size), replacement=True,
        generator=generator,
    )
