"""Fold models and their ensemble: what every K-fold-trained bundle's predictor loads.

A K-fold run writes one model per fold, ``models/fold{k}/<file>``: a torch state dict (``model.pt``), a
LightGBM booster (``model.txt``) or a scikit-learn estimator (``model.joblib``). A member is anything
callable on the model inputs that returns *raw scores*: class logits ``(B, C)`` or a log-hazard
``(B,)``. Boosters and estimators are wrapped to return the same, so one aggregation serves them all:

- ``mean_probability``: softmax of each member's logits, averaged (classification);
- ``mean_log_hazard``: each member's log-hazard, averaged (Cox survival: a risk, never softmaxed);
- ``mean``: raw outputs averaged.

For out-of-fold evaluation a case is predicted by the model of its own fold only, the one that never
trained on it (``fold=k``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oncofusion.networks.trainable import load_trainable_state

logger = logging.getLogger(__name__)


def _softmax(raw: torch.Tensor) -> torch.Tensor:
    return torch.softmax(raw, dim=-1)


def _log_hazard(raw: torch.Tensor) -> torch.Tensor:
    return raw.reshape(raw.shape[0]) if raw.ndim == 2 and raw.shape[1] == 1 else raw


#: aggregation name -> what each member's raw output becomes before the mean over members
AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean_probability": _softmax,
    "mean_log_hazard": _log_hazard,
    "mean": lambda raw: raw,
}


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


def fold_checkpoints(model_dir: str | Path, filename: str = "model.pt") -> list[str]:
    """``models/fold*/<filename>`` of a K-fold run, or a single ``models/<filename>``."""
    model_dir = Path(model_dir)
    folds = sorted(str(p) for p in model_dir.glob(f"fold*/{filename}"))
    single = model_dir / filename
    return folds or ([str(single)] if single.is_file() else [])


class LightGBMMember:
    """A LightGBM booster file as an ensemble member: features ``(B, F)`` -> raw scores.

    A binary booster's log-odds ``s`` becomes the logits ``(0, s)``, whose softmax is the booster's own
    probability; a multi-class booster returns its ``(B, C)`` raw scores; any other objective (e.g. a
    Cox or regression booster) its raw ``(B,)`` output.
    """

    def __init__(self, path: str | Path):
        import lightgbm

        self.path = str(path)
        self.booster = lightgbm.Booster(model_file=self.path)
        self.objective = str(self.booster.params.get("objective", ""))

    def __call__(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        raw = torch.as_tensor(np.asarray(self.booster.predict(x, raw_score=True)), dtype=torch.float32)
        if self.objective.startswith("binary"):
            return torch.stack([torch.zeros_like(raw), raw], dim=-1)
        return raw


class SklearnMember:
    """A pickled scikit-learn estimator (``joblib``) as an ensemble member.

    A classifier returns ``log(predict_proba)``, whose softmax is its probability; any other estimator
    returns ``predict`` (e.g. a risk score). Only load estimator files you trust: joblib unpickles.
    """

    def __init__(self, path: str | Path):
        import joblib

        self.path = str(path)
        self.estimator = joblib.load(self.path)

    def __call__(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if hasattr(self.estimator, "predict_proba"):
            probabilities = np.clip(self.estimator.predict_proba(x), 1e-12, 1.0)
            return torch.as_tensor(np.log(probabilities), dtype=torch.float32)
        return torch.as_tensor(np.asarray(self.estimator.predict(x)), dtype=torch.float32)


#: checkpoint file loaders for members that are not torch networks, by the ``member`` name a config gives
MEMBER_LOADERS: dict[str, Callable[[str], Callable[..., torch.Tensor]]] = {
    "lightgbm": LightGBMMember,
    "sklearn": SklearnMember,
}


class Ensemble(nn.Module):
    """One member per checkpoint, aggregated by ``aggregation`` (see :data:`AGGREGATIONS`).

    Torch members: pass ``network`` (copied once per checkpoint, weights loaded, eval mode on
    ``device``). Other members: pass ``member`` (``"lightgbm"``, ``"sklearn"`` or a callable
    ``path -> member``). ``members(fold)`` picks the models to run: all, or the one trained without
    ``fold``.
    """

    def __init__(
        self,
        checkpoints: Sequence[str | Path],
        network: nn.Module | None = None,
        member: str | Callable[[str], Any] | None = None,
        aggregation: str = "mean_probability",
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if not checkpoints:
            raise FileNotFoundError("no model checkpoint found: train the bundle first (see its docs/README.md)")
        if (network is None) == (member is None):
            raise ValueError("give either a torch 'network' or a 'member' loader, not both or neither")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation '{aggregation}': use one of {sorted(AGGREGATIONS)}")
        self.aggregation = aggregation
        self.device = torch.device(device)
        self.fold_ids = [fold_id(path) for path in checkpoints]
        self.models = nn.ModuleList()  # torch members: moved by .to(), seen by hooks (Grad-CAM)
        self._callables: list[Callable[..., torch.Tensor]] = []
        for path in checkpoints:
            if network is not None:
                model = copy.deepcopy(network)
                load_trainable_state(model, load_state_dict(path, "cpu"))
                self.models.append(self.prepare_member(model.to(self.device).eval()))
            else:
                loader = MEMBER_LOADERS[member] if isinstance(member, str) else member
                self._callables.append(loader(str(path)))
            logger.info("loaded fold checkpoint %s", path)

    def prepare_member(self, model: nn.Module) -> nn.Module:
        """Called on each torch member as soon as it is loaded, before the next is copied: a subclass frees
        here what inference does not need (e.g. a text tower), so that peak memory holds one spare copy,
        not one per fold."""
        return model

    def members(self, fold: int | None = None) -> list[Callable[..., torch.Tensor]]:
        """All members, or the member of ``fold`` (an error if that fold was not trained)."""
        every = list(self.models) if len(self.models) else self._callables
        if fold is None:
            return every
        chosen = [m for m, f in zip(every, self.fold_ids, strict=True) if f == fold]
        if not chosen:
            raise ValueError(f"no checkpoint of fold {fold} (have folds {self.fold_ids})")
        return chosen

    @torch.no_grad()
    def member_outputs(self, *inputs: Any, fold: int | None = None) -> torch.Tensor:
        """Each chosen member's output after the aggregation's transform, stacked: ``(M, B, ...)``."""
        transform = AGGREGATIONS[self.aggregation]
        return torch.stack([transform(m(*inputs).float()) for m in self.members(fold)])

    @torch.no_grad()
    def forward(self, *inputs: Any, fold: int | None = None) -> torch.Tensor:
        """The aggregated output: mean probability ``(B, C)``, mean log-hazard ``(B,)``, or mean raw."""
        return self.member_outputs(*inputs, fold=fold).mean(0)
