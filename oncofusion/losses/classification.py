"""Cross-entropy for records whose label is stored channel-first.

The bundles keep a class label as a ``(1,)`` tensor, the channel-first shape MONAI's post-transforms
(``AsDiscreted(to_onehot=...)``) and metrics expect; ``torch.nn.CrossEntropyLoss`` wants ``(B,)``.
"""

from __future__ import annotations

import torch
from torch import nn


class LabelCrossEntropyLoss(nn.CrossEntropyLoss):
    """``CrossEntropyLoss`` that accepts targets of shape ``(B,)`` or ``(B, 1)`` (any numeric dtype)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input, target.reshape(-1).long())
