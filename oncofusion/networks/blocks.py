"""Small building blocks shared by the networks: attention pooling over views and projection heads."""

from __future__ import annotations

import torch
from torch import nn


class AttentionPool(nn.Module):
    """Attention-based multiple-instance pooling over a bag of view embeddings (Ilse et al. 2018).

    ``(B, V, in_features) -> (B, hidden_features)`` plus the softmax weights ``(B, V)``, which say
    which view the prediction rests on. ``gated=True`` adds the sigmoid gate of gated attention.
    """

    def __init__(self, in_features: int = 512, hidden_features: int = 256, attention_features: int = 128,
                 gated: bool = False):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU())
        self.score = nn.Sequential(nn.Linear(hidden_features, attention_features), nn.Tanh())
        self.gate = nn.Sequential(nn.Linear(hidden_features, attention_features), nn.Sigmoid()) if gated else None
        self.weight = nn.Linear(attention_features, 1)

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed(views)  # (B, V, H)
        scores = self.score(hidden)
        if self.gate is not None:
            scores = scores * self.gate(hidden)
        weights = torch.softmax(self.weight(scores).squeeze(-1), dim=1)  # (B, V)
        pooled = torch.einsum("bv,bvh->bh", weights, hidden)
        return pooled, weights


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> dropout, residual, LayerNorm: maps a text embedding into the joint space."""

    def __init__(self, in_features: int = 512, out_features: int = 256, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(in_features, out_features)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(out_features, out_features), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.norm(projected + self.mlp(projected))
