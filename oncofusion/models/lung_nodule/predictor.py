"""Inference for the nine-view CLIP nodule classifier: fold ensemble, zero-shot features, explanation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncofusion.contract import InputSpec
from oncofusion.ensemble import Ensemble
from oncofusion.models.lung_nodule.network import NoduleCLIP
from oncofusion.models.lung_nodule.nine_views import VIEW_NAMES
from oncofusion.predictor import Context, PredictorTemplate
from oncofusion.transforms.geometry import voxel_to_world, world_to_voxel

logger = logging.getLogger(__name__)


class NoduleCLIPEnsemble(Ensemble):
    """The fold models of one training run, averaged, with zero-shot semantic features.

    Each fold embeds the zero-shot prompt sentences once, at load time, with its own text tower; the
    text towers are then dropped, so inference runs the image path only.
    """

    def __init__(self, network: NoduleCLIP, checkpoints: Sequence[str | Path],
                 prompts: Mapping[str, Mapping[str, str]] | None = None, device: torch.device | str = "cpu"):
        # set before the members load: prepare_member embeds the prompts as each one arrives
        self.prompts = {feature: dict(options) for feature, options in (prompts or {}).items()}
        self.prompt_embeddings = []  # per member: feature -> (options, E)
        super().__init__(checkpoints, network=network, aggregation="mean_probability", device=device)

    def prepare_member(self, member: NoduleCLIP) -> NoduleCLIP:
        """Embed the prompts with this member's text tower, then drop the tower (inference reads images)."""
        self.prompt_embeddings.append(self._embed_prompts(member))
        member.text_tower, member.text_projection = None, None
        return member

    @torch.no_grad()
    def _embed_prompts(self, member: NoduleCLIP) -> dict[str, torch.Tensor]:
        if not self.prompts or member.text_tower is None:
            return {}
        return {feature: member.encode_text(list(options.values())) for feature, options in self.prompts.items()}

    @torch.no_grad()
    def predict(self, views: torch.Tensor, fold: int | None = None) -> dict[str, Any]:
        """Per-member class probabilities ``(M, B, C)``, view attention and zero-shot option probabilities
        (both averaged over the chosen members)."""
        chosen = set(map(id, self.members(fold)))
        probabilities, attentions = [], []
        zero_shot: dict[str, list[torch.Tensor]] = {feature: [] for feature in self.prompts}
        for member, prompt_embeddings in zip(self.models, self.prompt_embeddings, strict=True):
            if id(member) not in chosen:
                continue
            embedding, attention = member.encode_image(views)
            probabilities.append(torch.softmax(member.image_head(embedding), dim=-1))
            attentions.append(attention)
            for feature, options in prompt_embeddings.items():
                zero_shot[feature].append(torch.softmax(member.scale() * embedding @ options.t(), dim=-1))
        return {
            "member_probabilities": torch.stack(probabilities),
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


class NoduleCLIPPredictor(PredictorTemplate):
    """Image + ROI -> malignancy probability, zero-shot semantic features and the view attention."""

    def __init__(self, ensemble: NoduleCLIPEnsemble, preprocessing: Callable[[dict], dict],
                 inputs: InputSpec | None = None, class_names: Sequence[str] = ("benign", "malignant"),
                 view_size_mm: float = 50.0, model_version: str = "", device: torch.device | str = "cpu"):
        super().__init__(ensemble, inputs, class_names, positive_class=-1, score_key="malignancy_probability",
                         model_version=model_version, device=device)
        self.preprocessing = preprocessing
        self.view_size_mm = view_size_mm

    def model_inputs(self, context: Context) -> tuple[torch.Tensor]:
        """The nine views ``(1, 9, S, S)`` of the nodule."""
        image = context.images[self.inputs.primary.name]
        views = self.preprocessing({"image": image, "center_mm": context.center_mm})["image"]
        return (views[None].to(self.device),)

    def forward(self, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        return self.ensemble.predict(*model_inputs, fold=context.fold)

    def result(self, output: dict[str, Any], model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        result = self.class_result(output["member_probabilities"])
        result.update({
            "semantic_features": {
                feature: dict(zip(self.ensemble.prompts[feature], map(float, p[0].cpu().numpy()), strict=False))
                for feature, p in output["zero_shot"].items()
            },
            "view_attention": dict(zip(VIEW_NAMES, map(float, output["attention"][0].cpu().numpy()), strict=False)),
            "center_ijk": [float(c) for c in context.center_index],
            "center_mm": [float(c) for c in context.center_mm],
            "label_meaning": f"the {self.view_size_mm:g} mm cube the nine views were cut from",
        })
        return result

    def draw(self, result: dict[str, Any], output: Any, model_inputs: Sequence[Any],
             context: Context) -> tuple[np.ndarray, dict[str, int]]:
        """The cube the views were cut from, named after the summary."""
        image = context.images[self.inputs.primary.name]
        return box_label(image, context.center_mm, self.view_size_mm), {self.summarize(result): 1}

    def summarize(self, result: Mapping[str, Any]) -> str:
        """One line for Slicer's segment name: probability and the most likely semantic features."""
        parts = [f"malignancy {result['malignancy_probability']:.2f}"]
        for feature in ("spiculation", "texture", "margin"):
            options = result["semantic_features"].get(feature)
            if options:
                parts.append(max(options, key=options.get))
        return ", ".join(parts)
