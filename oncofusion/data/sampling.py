"""Balanced sampling: each stratum of the target (a class, or events vs censored cases) is drawn equally
often in expectation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oncofusion.targets import Target


def balanced_sampler(datalist: Sequence[dict], target: Target, seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """A with-replacement sampler that draws ``len(datalist)`` records per epoch, strata balanced."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(
        target.sample_weights(datalist), num_samples=len(datalist), replacement=True, generator=generator,
    )
