"""Grad-CAM over a fold ensemble with MONAI's ``GradCAM``, and its quantisation into a few label levels.

MONAI Label draws labels, not continuous maps, so the heatmap goes back to the client as a label
volume of one to three levels ("where the model looked, how strongly").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn


def _member_map(model: nn.Module, image: torch.Tensor, target_layer: str, class_index: int,
                forward_kwargs: Mapping[str, torch.Tensor]) -> np.ndarray:
    """One model's Grad-CAM ``(*spatial)``, computed on a throwaway copy of it.

    MONAI's ``GradCAM`` registers a forward and a full backward hook on the target layer each time it is
    built and never removes them, and its ``ModelWithHooks`` keeps the class score, whose autograd graph
    holds those hooks, which hold the wrapper: a cycle through C++ that Python's garbage collector cannot
    free. Built on the served models, every request left two more hooks (run on every later forward) and
    leaked its wrapper, activations and graph. On a copy the hooks go with it and the served weights get
    no ``.grad`` (concurrent requests no longer share hooks either). The copy's hooks and the wrapper still
    point at each other: clearing the wrapper's state and its ``model`` leaves no cycle, so reference
    counting frees everything on return instead of waiting for a full garbage collection, which a server
    runs too rarely (45 MB per request piled up). The copy costs milliseconds for the networks explained
    here.
    """
    disposable = copy.deepcopy(model).eval()
    cam = GradCAM(nn_module=disposable, target_layers=target_layer)
    try:
        with torch.enable_grad():
            heat = cam(image, class_idx=class_index, **forward_kwargs)
        return heat[0, 0].detach().cpu().numpy().astype(np.float32)
    finally:
        hooks = cam.nn_module
        hooks.score = None
        hooks.activations.clear()
        hooks.gradients.clear()
        hooks.model = None


def gradcam_map(models: Sequence[nn.Module], image: torch.Tensor, target_layer: str, class_index: int,
                **forward_kwargs: torch.Tensor) -> np.ndarray:
    """Mean over ``models`` of each one's Grad-CAM for ``class_index``, rescaled to [0, 1].

    ``image``: ``(1, C, *spatial)``; extra network inputs (the clinical vector) go in ``forward_kwargs``.
    Returns the map on the input's spatial grid ``(*spatial)``; all zeros when no model has a positive
    gradient-weighted activation (nothing to show). The models are left exactly as they were: no hook,
    no gradient, same train/eval mode.
    """
    maps = [_member_map(model, image, target_layer, class_index, forward_kwargs) for model in models]
    heat = np.nan_to_num(np.mean(maps, axis=0))
    span = float(heat.max() - heat.min())
    return (heat - heat.min()) / span if span > 1e-8 else np.zeros_like(heat)


def heat_levels(heat: np.ndarray, thresholds: Sequence[float] = (0.4, 0.6, 0.8)) -> np.ndarray:
    """uint8 levels: 0 below ``thresholds[0]``, then 1, 2, ... for each threshold reached."""
    return np.digitize(heat, np.asarray(sorted(thresholds), float)).astype(np.uint8)
