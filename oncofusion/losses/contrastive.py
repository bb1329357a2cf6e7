"""Symmetric image-text contrastive loss plus the image and text heads' cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ContrastiveOutput:
    """Everything the contrastive + classification loss needs from one training forward pass."""

    image_embedding: torch.Tensor  # (B, E), L2-normalised
    text_embedding: torch.Tensor  # (B, E), L2-normalised
    image_logits: torch.Tensor  # (B, num_classes)
    text_logits: torch.Tensor  # (B, num_classes)
    logit_scale: torch.Tensor  # scalar, already exponentiated
    attention: torch.Tensor  # (B, V)


def clip_contrastive_loss(
    image_embedding: torch.Tensor, text_embedding: torch.Tensor, scale: torch.Tensor | float,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """In-batch InfoNCE in both directions: the i-th image should pick the i-th text and vice versa.

    Embeddings are (B, E) and L2-normalised; ``scale`` is the exponentiated logit scale.
    """
    logits_per_image = scale * image_embedding @ text_embedding.t()
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, targets, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits_per_image.t(), targets, label_smoothing=label_smoothing)
    return (image_to_text + text_to_image) / 2.0


class ContrastiveClassificationLoss(nn.Module):
    """``clip_weight * CLIP loss + mean(image_weight * CE(image head), text_weight * CE(text head))``."""

    def __init__(self, label_smoothing: float = 0.1, clip_weight: float = 1.0, image_weight: float = 1.0,
                 text_weight: float = 1.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.clip_weight = clip_weight
        self.image_weight = image_weight
        self.text_weight = text_weight

    def forward(self, output: ContrastiveOutput, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1).long()
        contrastive = clip_contrastive_loss(
            output.image_embedding, output.text_embedding, output.logit_scale, self.label_smoothing
        )
        classification = (
            self.image_weight * F.cross_entropy(output.image_logits, labels)
            + self.text_weight * F.cross_entropy(output.text_logits, labels)
        ) / 2.0
        return self.clip_weight * contrastive + classification
