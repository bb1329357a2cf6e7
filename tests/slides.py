"""Whole-slide images for tests: small tiled pyramidal TIFFs that OpenSlide reads (built by the sample-data
helpers, which the generators share)."""

from sample_data.slides import write_pyramid

__all__ = ["write_pyramid"]
