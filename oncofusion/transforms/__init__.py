"""Generic MONAI dictionary transforms used by the bundles' configs (model-specific ones live with
their model under :mod:`oncofusion.models`)."""

from oncofusion.transforms.geometry import ResampleCube, ResampleCubed

__all__ = ["ResampleCube", "ResampleCubed"]
