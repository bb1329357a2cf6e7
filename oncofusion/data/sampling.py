"""Class balance by inverse-frequency sampling: each class is drawn equally often in expectation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def inverse_frequency_weights(datalist: Sequence[dict], label_key: str = "label") -> torch.Tensor:
    """One weight per record, proportional to 1 / (count of its class)."""
    if not datalist:
        raise ValueError("cannot balance an empty datalist")
    labels = [int(record[label_key]) for record in datalist]
    counts = Counter(labels)
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)


def inverse_frequency_sampler(datalist: Sequence[dict], label_key: str = "label",
                              seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """A with-replacement sampler that draws ``len(datalist)`` records per epoch, classes balanced."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(
        inverse_frequency_weights(datalist, label_key), num_samples=len(datalist), replacement=True,
        generator=generator,
    )
