"""Inference for the CT + clinical fusion classifier (SC-Net) and its image-only ablation (S-Net).

Image + ROI + clinical form -> class probabilities (fold ensemble), a Grad-CAM heatmap drawn as a label
volume on the image grid, and each clinical field's contribution to the log-odds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from oncofusion.contract import InputSpec
from oncofusion.data.clinical import ClinicalSchema
from oncofusion.data.roi import roi_extent_mm, roi_region
from oncofusion.ensemble import Ensemble
from oncofusion.explain.attribution import field_contributions, integrated_gradients
from oncofusion.explain.gradcam import gradcam_map, heat_levels
from oncofusion.predictor import Context, PredictorTemplate, radius_option
from oncofusion.transforms.cube_to_image import cube_to_image

logger = logging.getLogger(__name__)

RADIUS_OPTION = "radius_mm"


class SCNetPredictor(PredictorTemplate):
    """Image + ROI (+ clinical fields) -> probabilities, heatmap label and clinical contributions.

    ``preprocessing`` turns ``{"image", "center_mm"}`` into the network's CT patch; ``schema`` validates and
    encodes the clinical fields (only the fused network reads them). ``positive_class`` is the class whose
    probability is the score (and whose log-odds the contributions explain).
    """

    def __init__(
        self,
        ensemble: Ensemble,
        preprocessing: Callable[[dict], dict],
        schema: ClinicalSchema,
        inputs: InputSpec | None = None,
        class_names: Sequence[str] = ("chondroid", "osteoid"),
        positive_class: int = 1,
        crop_size_mm: float = 40.0,
        cam_layer: str = "image_encoder.resnet.layer3",
        cam_thresholds: Sequence[float] = (0.4, 0.6, 0.8),
        click_radius_mm: float = 10.0,
        integration_steps: int = 32,
        summary_fields: int = 2,
        explain: bool = True,
        model_version: str = "",
        device: torch.device | str = "cpu",
    ):
        fusion = bool(getattr(ensemble.models[0], "fusion", False))
        super().__init__(ensemble, inputs or InputSpec(fields=schema if fusion else None), class_names,
                         positive_class, model_version=model_version, device=device)
        self.preprocessing = preprocessing
        self.schema = schema
        self.crop_size_mm = float(crop_size_mm)
        self.cam_layer = cam_layer
        self.cam_thresholds = tuple(sorted(float(t) for t in cam_thresholds))
        self.click_radius_mm = float(click_radius_mm)
        self.integration_steps = int(integration_steps)
        self.summary_fields = int(summary_fields)
        self.explain = bool(explain)
        self.fusion = fusion
        self.variant = "SC-Net (CT + clinical)" if self.fusion else "S-Net (CT only)"
        options: dict[str, Any] = self.schema.config_options() if self.fusion else {}
        self.config_options: dict[str, Any] = {**options, RADIUS_OPTION: self.click_radius_mm}

    # -- inputs ---------------------------------------------------------------------------------------
    def clinical_values(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Validated clinical values (``None`` = missing); empty for the image-only model."""
        return self.schema.validate(fields) if self.fusion else {}

    def _radius(self, fields: Mapping[str, Any]) -> float:
        return radius_option(fields, RADIUS_OPTION, self.click_radius_mm, self.crop_size_mm, " (the crop size)")

    def patch(self, image: torch.Tensor, center_mm: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The CT patch ``(1, 1, N, N, N)`` around ``center_mm`` and its affine."""
        patch = self.preprocessing({"image": image, "center_mm": np.asarray(center_mm, float)})["image"]
        affine = patch.affine.numpy() if hasattr(patch, "affine") else np.eye(4)
        return torch.as_tensor(patch, dtype=torch.float32)[None].to(self.device), affine

    def model_inputs(self, context: Context) -> tuple[torch.Tensor, ...]:
        """The CT patch, and the clinical vector ``(1, F)`` for the fused network."""
        image = context.images[self.inputs.primary.name]
        patch, context.extras["patch_affine"] = self.patch(image, context.center_mm)
        if not self.fusion:
            return (patch,)
        values = self.clinical_values(context.fields)
        return patch, torch.from_numpy(self.schema.encode(values))[None].to(self.device)

    # -- prediction -----------------------------------------------------------------------------------
    def result(self, output: torch.Tensor, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        image = context.images[self.inputs.primary.name]
        shape = tuple(int(s) for s in image.shape[1:])
        affine = image.affine.numpy() if hasattr(image, "affine") else np.eye(4)
        region = context.extras["region"] = roi_region(context.roi, shape, affine, self._radius(context.fields))
        extent = roi_extent_mm(region, context.center_index, affine)
        result = self.class_result(output)
        result.update({
            "model_variant": self.variant,
            "clinical_fields": dict(self.clinical_values(context.fields)),
            "center_ijk": [float(c) for c in context.center_index],
            "center_mm": [float(c) for c in context.center_mm],
            "crop_size_mm": self.crop_size_mm,
            "roi_extent_mm": round(extent, 2),
            "roi_exceeds_crop": bool(extent > self.crop_size_mm / 2.0),
        })
        return result

    def draw(self, result: dict[str, Any], output: torch.Tensor, model_inputs: Sequence[Any],
             context: Context) -> tuple[np.ndarray | None, dict[str, int]]:
        """Clinical contributions (fused model) and the Grad-CAM heatmap inside the ROI."""
        if not self.explain:
            return None, {}
        image = context.images[self.inputs.primary.name]
        shape = tuple(int(s) for s in image.shape[1:])
        affine = image.affine.numpy() if hasattr(image, "affine") else np.eye(4)
        members = self.ensemble.members(context.fold)
        patch = model_inputs[0]
        predicted = self.class_names.index(result["prediction"])
        if self.fusion:
            result["clinical_contributions"] = self.contributions(members, patch, model_inputs[1],
                                                                  result["clinical_fields"])
            result["clinical_contribution_method"] = (
                f"integrated gradients ({self.integration_steps} steps) of the {self.class_names[self.positive_class]} "
                "log-odds over the clinical vector, from the all-missing encoding, mean over fold models")
        heat = gradcam_map(members, patch, self.cam_layer, predicted,
                           **({"clinical": model_inputs[1]} if self.fusion else {}))
        result["heatmap"] = {
            "method": f"Grad-CAM at {self.cam_layer} for class {self.class_names[predicted]}, mean over fold models",
            "levels": {str(len(self.cam_thresholds) - level): f">= {t:g}" for level, t in enumerate(self.cam_thresholds)},
            "label_meaning": "Grad-CAM levels inside the ROI on the image grid: 1 = the strongest (the summary "
                             "segment, the one 3D Slicer imports), higher values = weaker levels",
        }
        return self._heatmap_label(heat, context.extras["patch_affine"], affine, shape, context.extras["region"], result)

    def contributions(self, members: Sequence[torch.nn.Module], patch: torch.Tensor, clinical: torch.Tensor,
                      values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Each field's share of the positive-class log-odds relative to "nothing known" (mean over folds)."""
        baseline = torch.from_numpy(self.schema.missing_vector()).to(self.device)
        other = 1 - self.positive_class if len(self.class_names) == 2 else None
        totals: dict[str, float] = dict.fromkeys(self.schema.names, 0.0)
        for member in members:
            with torch.no_grad():
                features = member.image_features(patch)

            def log_odds(vectors: torch.Tensor, member=member, features=features) -> torch.Tensor:
                logits = member.fuse(features.expand(vectors.shape[0], -1), vectors)
                log_p = torch.log_softmax(logits, dim=-1)
                return log_p[:, self.positive_class] - (log_p[:, other] if other is not None else 0.0)

            attributions = integrated_gradients(log_odds, clinical[0], baseline, self.integration_steps)
            for name, value in field_contributions(attributions.cpu(), self.schema.slices()).items():
                totals[name] += value / len(members)
        return {name: {"value": self.schema.display(name, values.get(name)), "log_odds": round(total, 4)}
                for name, total in totals.items()}

    def _heatmap_label(self, heat: np.ndarray, patch_affine: np.ndarray, affine: np.ndarray, shape: tuple,
                       region: np.ndarray, result: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
        """Levels of the heatmap inside the ROI on the image grid, the strongest at value 1.

        Value 1 is the region users should see, named after the summary: 3D Slicer imports only value 1
        of a one-segment result. Weaker levels follow as 2, 3, ... for clients that show every value.
        When the map is flat (nothing to show) the ROI itself is drawn at value 1 under the summary name.
        """
        on_image = cube_to_image(heat, patch_affine, affine, shape, order=1)
        rising = np.where(region, heat_levels(on_image, self.cam_thresholds), 0).astype(np.uint8)
        summary = self.summarize(result)
        top = len(self.cam_thresholds)
        if not (rising == top).any():
            return region.astype(np.uint8), {summary: 1}
        levels = np.where(rising > 0, top + 1 - rising, 0).astype(np.uint8)
        names = {summary: 1}
        for value in range(2, top + 1):
            names[f"Grad-CAM >= {self.cam_thresholds[top - value]:g}"] = value
        return levels, names

    def summarize(self, result: Mapping[str, Any]) -> str:
        """One line for Slicer's segment name, e.g. ``osteoid 0.78 (age 14, metaphysis)``."""
        predicted = result["prediction"]
        text = f"{predicted} {result['class_probabilities'][predicted]:.2f}"
        contributions = result.get("clinical_contributions")
        if not self.fusion:
            return f"{text} (CT only)"
        if not contributions:
            return text
        sign = 1.0 if self.class_names.index(predicted) == self.positive_class else -1.0
        supporting = sorted(
            ((sign * c["log_odds"], name) for name, c in contributions.items()
             if result["clinical_fields"].get(name) is not None and sign * c["log_odds"] > 0.01),
            reverse=True,
        )[: self.summary_fields]
        if not supporting:
            return text
        return f"{text} ({', '.join(contributions[name]['value'] for _, name in supporting)})"
