"""MONAI dictionary transforms used by the bundles' configs."""

from oncofusion.transforms.geometry import ResampleCube, ResampleCubed
from oncofusion.transforms.nine_views import NineViewsd, extract_nine_views
from oncofusion.transforms.text import RandReportAugmentd

__all__ = ["NineViewsd", "RandReportAugmentd", "ResampleCube", "ResampleCubed", "extract_nine_views"]
