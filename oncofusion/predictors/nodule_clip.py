"""Inference for the nine-view CLIP nodule classifier: fold ensemble, zero-shot features, explanation."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oncofusion.networks.nodule_clip import NoduleCLIP
from oncofusion.networks.trainable import load_trainable_state
from oncofusion.predictors.folds import (
    fold_checkpoints,  # noqa: F401 (inference.json names it here)
    load_state_dict,
)
from oncofusion.predictors.folds import fold_id as _fold_id
from oncofusion.serving.predictor import InvalidRequest, Prediction, Roi
from oncofusion.transforms.geometry import voxel_to_world, world_to_voxel
from oncofusion.transforms.nine_views import VIEW_NAMES

logger = logging.getLogger(__name__)


class NoduleCLIPEnsemble(nn.Module):
    """The fold models of one training run, averaged.

    Each fold embeds the zero-shot prompt sentences once, at load time, with its own text tower; the
    text towers are then dropped, so inference runs the image path only.
    """

    def __init__(self, network: NoduleCLIP, checkpoints: Sequence[str | Path],
                 prompts: Mapping[str, Mapping[str, str]] | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        if not checkpoints:
            raise FileNotFoundError("no model checkpoint found: train the bundle first (see its docs/README.md)")
        self.prompts = {feature: dict(options) for feature, options in (prompts or {}).items()}
        members, embeddings = [], []
        self.fold_ids = [_fold_id(path) for path in checkpoints]
        for path in checkpoints:
            member = copy.deepcopy(network)
            load_trainable_state(member, load_state_dict(path, "cpu"))
            member.to(device).eval()
            embeddings.append(self._embed_prompts(member))
            member.text_tower, member.text_projection = None, None
            members.append(member)
            logger.info("loaded fold checkpoint %s", path)
        self.members = nn.ModuleList(members)
        self.prompt_embeddings = embeddings  # per member: feature -> (options, E)

    @torch.no_grad()
    def _embed_prompts(self, member: NoduleCLIP) -> dict[str, torch.Tensor]:
        if not self.prompts or member.text_tower is None:
            return {}
        return {feature: member.encode_text(list(options.values())) for feature, options in self.prompts.items()}

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(B, V, H, W) -> ensemble class probabilities (B, C)."""
        return self.predict(views)["probabilities"]

    @torch.no_grad()
    def predict(self, views: torch.Tensor, fold: int | None = None) -> dict[str, Any]:
        """Class probabilities, per-fold probabilities, view attention and zero-shot option probabilities.

        ``fold`` restricts the ensemble to that fold's model: the out-of-fold prediction for a case
        that fold was validated on.
        """
        probabilities, attentions = [], []
        zero_shot: dict[str, list[torch.Tensor]] = {feature: [] for feature in self.prompts}
        chosen = [i for i, fold_id in enumerate(self.fold_ids) if fold is None or fold_id == fold]
        if not chosen:
            raise ValueError(f"no checkpoint of fold {fold} (have folds {self.fold_ids})")
        for index in chosen:
            member, prompt_embeddings = self.members[index], self.prompt_embeddings[index]
            embedding, attention = member.encode_image(views)
            probabilities.append(torch.softmax(member.image_head(embedding), dim=-1))
            attentions.append(attention)
            for feature, options in prompt_embeddings.items():
                zero_shot[feature].append(torch.softmax(member.scale() * embedding @ options.t(), dim=-1))
        return {
            "probabilities": torch.stack(probabilities).mean(0),
            "fold_probabilities": torch.stack(probabilities),
            "attention": torch.stack(attentions).mean(0),
            "zero_shot": {feature: torch.stack(p).mean(0) for feature, p in zero_shot.items() if p},
        }


def box_label(image: torch.Tensor, center_mm: np.ndarray, size_mm: float) -> np.ndarray:
    """uint8 mask on the image grid of the ``size_mm`` LPS-aligned cube the views were cut from."""
    shape = np.asarray(image.shape[1:])
    affine = image.affine.numpy()
    half = size_mm / 2.0
    corners = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)])
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    corner_ijk = world_to_voxel(affine, center_mm + corners * lps_to_ras)
    low = np.clip(np.floor(corner_ijk.min(0)).astype(int), 0, shape - 1)
    high = np.clip(np.ceil(corner_ijk.max(0)).astype(int) + 1, 1, shape)
    mask = np.zeros(shape, np.uint8, order="F")  # Fortran order: written to NIfTI without a transpose
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high, strict=False)], indexing="ij"), -1).reshape(-1, 3)
    offsets = (voxel_to_world(affine, grid) - center_mm) * lps_to_ras
    inside = np.all(np.abs(offsets) <= half, axis=1)
    mask[tuple(grid[inside].T)] = 1
    return mask


class NoduleCLIPPredictor:
    """Image + ROI -> malignancy probability, zero-shot semantic features and the view attention."""

    config_options: dict[str, Any] = {}

    def __init__(self, ensemble: NoduleCLIPEnsemble, preprocessing: Callable[[dict], dict],
                 class_names: Sequence[str] = ("benign", "malignant"), view_size_mm: float = 50.0,
                 model_version: str = "", device: torch.device | str = "cpu"):
        self.ensemble = ensemble
        self.preprocessing = preprocessing
        self.class_names = list(class_names)
        self.view_size_mm = view_size_mm
        self.model_version = model_version
        self.device = torch.device(device)

    def views(self, image: torch.Tensor, center_mm: np.ndarray) -> torch.Tensor:
        """The network input (1, 9, S, S) for a nodule centred at ``center_mm``."""
        return self.preprocessing({"image": image, "center_mm": center_mm})["image"][None].to(self.device)

    def predict(self, image: torch.Tensor, roi: Roi, fields: Mapping[str, Any], fold: int | None = None) -> Prediction:
        """Predict for the lesion at ``roi``; ``fold`` picks one fold's model (out-of-fold evaluation)."""
        center_ijk = roi.center_ijk()
        if not np.all((center_ijk >= 0) & (center_ijk <= np.asarray(image.shape[1:]) - 1)):
            raise InvalidRequest(f"lesion centre {tuple(np.round(center_ijk, 1))} lies outside image "
                                 f"{'x'.join(map(str, image.shape[1:]))}")
        center_mm = voxel_to_world(image.affine.numpy(), center_ijk[None])[0]
        output = self.ensemble.predict(self.views(image, center_mm), fold=fold)
        result = self._result(output, center_ijk, center_mm)
        return Prediction(result=result, label=box_label(image, center_mm, self.view_size_mm),
                          label_names={self.summary(result): 1})

    def _result(self, output: dict[str, Any], center_ijk: np.ndarray, center_mm: np.ndarray) -> dict[str, Any]:
        probabilities = output["probabilities"][0].cpu().numpy()
        zero_shot = {
            feature: dict(zip(self.ensemble.prompts[feature], map(float, p[0].cpu().numpy()), strict=False))
            for feature, p in output["zero_shot"].items()
        }
        return {
            "prediction": self.class_names[int(np.argmax(probabilities))],
            "malignancy_probability": float(probabilities[-1]),
            "class_probabilities": dict(zip(self.class_names, map(float, probabilities), strict=False)),
            "fold_malignancy_probabilities": [float(p[0, -1]) for p in output["fold_probabilities"].cpu()],
            "semantic_features": zero_shot,
            "view_attention": dict(zip(VIEW_NAMES, map(float, output["attention"][0].cpu().numpy()), strict=False)),
            "center_ijk": [float(c) for c in center_ijk],
            "center_mm": [float(c) for c in center_mm],
            "label_meaning": f"the {self.view_size_mm:g} mm cube the nine views were cut from",
            "model_version": self.model_version,
        }

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        """One line for Slicer's segment name: probability and the most likely semantic features."""
        parts = [f"malignancy {result['malignancy_probability']:.2f}"]
        for feature in ("spiculation", "texture", "margin"):
            options = result["semantic_features"].get(feature)
            if options:
                parts.append(max(options, key=options.get))
        return ", ".join(parts)
