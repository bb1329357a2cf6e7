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

from oncofusion.data.clinical import ClinicalSchema
from oncofusion.data.roi import roi_extent_mm, roi_region
from oncofusion.explain.attribution import field_contributions, integrated_gradients
from oncofusion.explain.gradcam import gradcam_map, heat_levels
from oncofusion.predictors.folds import FoldEnsemble
from oncofusion.serving.predictor import InvalidRequest, Prediction, Roi
from oncofusion.transforms.cube_to_image import cube_to_image
from oncofusion.transforms.geometry import voxel_to_world

logger = logging.getLogger(__name__)

RADIUS_OPTION = "radius_mm"


class SCNetPredictor:
    """Image + ROI (+ clinical fields) -> probabilities, heatmap label and clinical contributions.

    ``preprocessing`` turns ``{"image", "center_mm"}`` into the network's CT patch; ``schema`` validates and
    encodes the clinical fields (only the fused network reads them). ``positive_class`` is the class whose
    probability is the score (and whose log-odds the contributions explain).
    """

    def __init__(
        self,
        ensemble: FoldEnsemble,
        preprocessing: Callable[[dict], dict],
        schema: ClinicalSchema,
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
        self.ensemble = ensemble
        self.preprocessing = preprocessing
        self.schema = schema
        self.class_names = list(class_names)
        self.positive_class = int(positive_class)
        self.crop_size_mm = float(crop_size_mm)
        self.cam_layer = cam_layer
        self.cam_thresholds = tuple(sorted(float(t) for t in cam_thresholds))
        self.click_radius_mm = float(click_radius_mm)
        self.integration_steps = int(integration_steps)
        self.summary_fields = int(summary_fields)
        self.explain = bool(explain)
        self.model_version = model_version
        self.device = torch.device(device)
        self.fusion = bool(getattr(ensemble.models[0], "fusion", False))
        self.variant = "SC-Net (CT + clinical)" if self.fusion else "S-Net (CT only)"
        options: dict[str, Any] = self.schema.config_options() if self.fusion else {}
        self.config_options: dict[str, Any] = {**options, RADIUS_OPTION: self.click_radius_mm}
        self.score_key = f"{self.class_names[self.positive_class]}_probability"

    # -- inputs ---------------------------------------------------------------------------------------
    def clinical_values(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Validated clinical values (``None`` = missing); empty for the image-only model."""
        return self.schema.validate(fields) if self.fusion else {}

    def _radius(self, fields: Mapping[str, Any]) -> float:
        value = fields.get(RADIUS_OPTION, self.click_radius_mm)
        if value is None or (isinstance(value, str) and not value.strip()):
            return self.click_radius_mm
        try:
            radius = float(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{RADIUS_OPTION} {value!r} is not a number") from None
        if not 0 < radius <= self.crop_size_mm:
            raise InvalidRequest(f"{RADIUS_OPTION} {radius:g} is outside 0-{self.crop_size_mm:g} mm (the crop size)")
        return radius

    def inputs(self, image: torch.Tensor, center_mm: np.ndarray, values: Mapping[str, Any]
               ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Network inputs: CT patch ``(1, 1, N, N, N)``, clinical vector ``(1, F)`` or None, and the patch affine."""
        patch = self.preprocessing({"image": image, "center_mm": np.asarray(center_mm, float)})["image"]
        affine = patch.affine.numpy() if hasattr(patch, "affine") else np.eye(4)
        patch = torch.as_tensor(patch, dtype=torch.float32)[None].to(self.device)
        clinical = None
        if self.fusion:
            clinical = torch.from_numpy(self.schema.encode(values))[None].to(self.device)
        return patch, clinical, affine

    # -- prediction -----------------------------------------------------------------------------------
    def predict(self, image: torch.Tensor, roi: Roi, fields: Mapping[str, Any], fold: int | None = None) -> Prediction:
        """Predict for the tumor at ``roi``; ``fold`` picks one fold's model (out-of-fold evaluation)."""
        shape = tuple(int(s) for s in image.shape[1:])
        center_ijk = roi.center_ijk()
        if not np.all((center_ijk >= 0) & (center_ijk <= np.asarray(shape) - 1)):
            raise InvalidRequest(f"lesion centre {tuple(np.round(center_ijk, 1))} lies outside image "
                                 f"{'x'.join(map(str, shape))}")
        values = self.clinical_values(fields)
        radius = self._radius(fields)
        affine = image.affine.numpy() if hasattr(image, "affine") else np.eye(4)
        center_mm = voxel_to_world(affine, center_ijk[None])[0]
        patch, clinical, patch_affine = self.inputs(image, center_mm, values)
        members = self.ensemble.members(fold)
        args = (patch,) if clinical is None else (patch, clinical)
        with torch.no_grad():
            fold_probabilities = torch.stack([torch.softmax(m(*args), dim=-1)[0] for m in members]).cpu().numpy()
        probabilities = fold_probabilities.mean(0)
        predicted = int(np.argmax(probabilities))
        region = roi_region(roi, shape, affine, radius)
        extent = roi_extent_mm(region, center_ijk, affine)
        result: dict[str, Any] = {
            "prediction": self.class_names[predicted],
            self.score_key: float(probabilities[self.positive_class]),
            "class_probabilities": dict(zip(self.class_names, map(float, probabilities), strict=True)),
            "fold_probabilities": [float(p[self.positive_class]) for p in fold_probabilities],
            "model_variant": self.variant,
            "clinical_fields": dict(values),
            "center_ijk": [float(c) for c in center_ijk],
            "center_mm": [float(c) for c in center_mm],
            "crop_size_mm": self.crop_size_mm,
            "roi_extent_mm": round(extent, 2),
            "roi_exceeds_crop": bool(extent > self.crop_size_mm / 2.0),
            "model_version": self.model_version,
        }
        if not self.explain:
            return Prediction(result=result, label=None, label_names={})
        if self.fusion:
            result["clinical_contributions"] = self.contributions(members, patch, clinical, values)
            result["clinical_contribution_method"] = (
                f"integrated gradients ({self.integration_steps} steps) of the {self.class_names[self.positive_class]} "
                "log-odds over the clinical vector, from the all-missing encoding, mean over fold models")
        heat = gradcam_map(members, patch, self.cam_layer, predicted,
                           **({"clinical": clinical} if clinical is not None else {}))
        label, label_names = self._heatmap_label(heat, patch_affine, affine, shape, region, result)
        result["heatmap"] = {
            "method": f"Grad-CAM at {self.cam_layer} for class {self.class_names[predicted]}, mean over fold models",
            "levels": {str(level + 1): f">= {t:g}" for level, t in enumerate(self.cam_thresholds)},
            "label_meaning": "Grad-CAM levels inside the ROI on the image grid (highest = the summary segment)",
        }
        return Prediction(result=result, label=label, label_names=label_names)

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
        """Levels of the heatmap inside the ROI on the image grid, named for Slicer's segment list.

        When the map is flat (nothing to show) the ROI itself is drawn under the summary name.
        """
        on_image = cube_to_image(heat, patch_affine, affine, shape, order=1)
        levels = np.where(region, heat_levels(on_image, self.cam_thresholds), 0).astype(np.uint8)
        summary = self.summary(result)
        top = len(self.cam_thresholds)
        if not (levels == top).any():
            return region.astype(np.uint8), {summary: 1}
        names = {summary: top}
        for level in range(top - 1, 0, -1):
            names[f"Grad-CAM >= {self.cam_thresholds[level - 1]:g}"] = level
        return levels, names

    def summary(self, result: Mapping[str, Any]) -> str:
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
