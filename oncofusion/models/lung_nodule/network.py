"""Nine-view CLIP classifier for lung nodules (Zhuang et al., J Biomed Inform 2025).

Each of the nine 2D views goes through the image tower; attention pooling over the views gives the
nodule's image embedding. In training a report sentence goes through the text tower and a projection
head; the two embeddings are aligned contrastively and both feed a malignancy head. At inference only
the image path runs, and semantic features are read zero-shot against sentence embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oncofusion.losses.contrastive import ContrastiveOutput
from oncofusion.networks.blocks import AttentionPool, ProjectionHead


class NoduleCLIP(nn.Module):
    """``forward(views)``: (B, V, H, W) -> malignancy logits (B, num_classes).

    ``forward(views, texts)`` (training) returns a :class:`ContrastiveOutput`. Both go through
    ``forward`` so that DistributedDataParallel sees every parameter used.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module | None = None,
        embed_dim: int = 256,
        attention_dim: int = 128,
        num_classes: int = 2,
        dropout: float = 0.1,
        temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        gated_attention: bool = False,
    ):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.pool = AttentionPool(image_tower.out_features, embed_dim, attention_dim, gated=gated_attention)
        self.text_projection = (
            ProjectionHead(text_tower.out_features, embed_dim, dropout) if text_tower is not None else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        self.image_head = nn.Linear(embed_dim, num_classes)
        self.text_head = nn.Linear(embed_dim, num_classes)

    def encode_image(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V, H, W) -> normalised embedding (B, E) and per-view attention weights (B, V)."""
        batch, num_views, height, width = views.shape
        features = self.image_tower(views.reshape(batch * num_views, 1, height, width))
        pooled, attention = self.pool(features.reshape(batch, num_views, -1))
        return F.normalize(pooled, dim=-1), attention

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences -> normalised embedding (B, E) in the same space as the images."""
        if self.text_tower is None or self.text_projection is None:
            raise RuntimeError("this network was built without a text tower")
        return F.normalize(self.text_projection(self.text_tower(texts)), dim=-1)

    def scale(self) -> torch.Tensor:
        """The learnt inverse temperature, clamped as in CLIP so that training stays stable."""
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def forward(self, views: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor | ContrastiveOutput:
        image_embedding, attention = self.encode_image(views)
        image_logits = self.image_head(image_embedding)
        if texts is None:
            return image_logits
        text_embedding = self.encode_text(texts)
        return ContrastiveOutput(
            image_embedding=image_embedding,
            text_embedding=text_embedding,
            image_logits=image_logits,
            text_logits=self.text_head(text_embedding),
            logit_scale=self.scale(),
            attention=attention,
        )
