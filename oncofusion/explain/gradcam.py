"""Grad-CAM over a fold ensemble with MONAI's ``GradCAM``, and its quantisation into a few label levels.

MONAI Label draws labels, not continuous maps, so the heatmap goes back to the client as a label
volume of one to three levels ("where the model looked, how strongly").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn


def gradcam_map(models: Sequence[nn.Module], image: torch.Tensor, target_layer: str, class_index: int,
                **forward_kwargs: torch.Tensor) -> np.ndarray:
    """Mean over ``models`` of each one's Grad-CAM for ``class_index``, rescaled to [0, 1].

    ``image``: ``(1, C, *spatial)``; extra network inputs (the clinical vector) go in ``forward_kwargs``.
    Returns the map on the input's spatial grid ``(*spatial)``; all zeros when no model has a positive
    gradient-weighted activation (nothing to show).
    """
    maps = []
    for model in models:
        was_training = model.training
        model.eval()
        cam = GradCAM(nn_module=model, target_layers=target_layer)
        with torch.enable_grad():
            heat = cam(image, class_idx=class_index, **forward_kwargs)
        maps.append(heat[0, 0].detach().cpu().numpy().astype(np.float32))
        model.train(was_training)
    heat = np.nan_to_num(np.mean(maps, axis=0))
    span = float(heat.max() - heat.min())
    return (heat - heat.min()) / span if span > 1e-8 else np.zeros_like(heat)


def heat_levels(heat: np.ndarray, thresholds: Sequence[float] = (0.4, 0.6, 0.8)) -> np.ndarray:
    """uint8 levels: 0 below ``thresholds[0]``, then 1, 2, ... for each threshold reached."""
    return np.digitize(heat, np.asarray(sorted(thresholds), float)).astype(np.uint8)
