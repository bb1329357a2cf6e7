"""Fold checkpoints and their ensemble: what every K-fold-trained bundle's predictor loads.

A K-fold run writes ``models/fold{k}/model.pt``. At inference the fold models' probabilities are
averaged; for out-of-fold evaluation a case is predicted by the model of its own fold only, the one
that never trained on it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from oncofusion.networks.trainable import load_trainable_state

logger = logging.getLogger(__name__)


def load_state_dict(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A network state dict from a checkpoint saved bare or under ``"model"`` (MONAI's CheckpointSaver)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    return checkpoint


def fold_id(path: str | Path) -> int | None:
    """``.../fold3/model.pt`` -> 3; a single model has no fold."""
    name = Path(path).parent.name
    return int(name[4:]) if name.startswith("fold") and name[4:].isdigit() else None


def fold_checkpoints(model_dir: str | Path) -> list[str]:
    """``models/fold*/model.pt`` of a K-fold run, or a single ``models/model.pt``."""
    model_dir = Path(model_dir)
    folds = sorted(str(p) for p in model_dir.glob("fold*/model.pt"))
    single = model_dir / "model.pt"
    return folds or ([str(single)] if single.is_file() else [])


class FoldEnsemble(nn.Module):
    """One copy of ``network`` per checkpoint, in eval mode on ``device``.

    ``members(fold)`` picks the models to run: all of them, or the one trained without ``fold``.
    """

    def __init__(self, network: nn.Module, checkpoints: Sequence[str | Path], device: torch.device | str = "cpu"):
        super().__init__()
        if not checkpoints:
            raise FileNotFoundError("no model checkpoint found: train the bundle first (see its docs/README.md)")
        self.fold_ids = [fold_id(path) for path in checkpoints]
        members = []
        for path in checkpoints:
            member = copy.deepcopy(network)
            load_trainable_state(member, load_state_dict(path, "cpu"))
            members.append(member.to(device).eval())
            logger.info("loaded fold checkpoint %s", path)
        self.models = nn.ModuleList(members)
        self.device = torch.device(device)

    def members(self, fold: int | None = None) -> list[nn.Module]:
        """All models, or the model of ``fold`` (an error if that fold was not trained)."""
        if fold is None:
            return list(self.models)
        chosen = [m for m, f in zip(self.models, self.fold_ids, strict=True) if f == fold]
        if not chosen:
            raise ValueError(f"no checkpoint of fold {fold} (have folds {self.fold_ids})")
        return chosen

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor, fold: int | None = None) -> torch.Tensor:
        """Mean softmax probability ``(B, C)`` over the chosen members."""
        return torch.stack([torch.softmax(m(*inputs), dim=-1) for m in self.members(fold)]).mean(0)
