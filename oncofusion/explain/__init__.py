"""Explanations: Grad-CAM heatmaps on the image, integrated gradients over the clinical inputs."""

from oncofusion.explain.attribution import field_contributions, integrated_gradients
from oncofusion.explain.gradcam import gradcam_map, heat_levels

__all__ = ["field_contributions", "gradcam_map", "heat_levels", "integrated_gradients"]
