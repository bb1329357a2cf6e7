"""Open a whole-slide image lazily through OpenSlide.

A slide at 40x is around 100,000 x 80,000 pixels (tens of GB decoded): it is never decoded whole.
:class:`SlideImage` keeps the OpenSlide handle and decodes only the regions and thumbnails asked for;
its memory is OpenSlide's tile cache, whose size it declares as ``nbytes`` so that
:class:`~oncofusion.io.cache.ImageCache` can keep it within a byte budget.

Coordinates follow OpenSlide: ``(x, y)`` = (column, row), ``location`` in level-0 pixels, ``size`` as
``(width, height)`` in pixels of the level read. Arrays are returned as ``(height, width, 3)`` uint8 RGB,
the layout of every pathology toolkit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.contract import InvalidRequest

logger = logging.getLogger(__name__)

#: OpenSlide's own default tile cache per handle
DEFAULT_TILE_CACHE_BYTES = 32 * 2**20
#: a region read is capped: anything bigger is a request for the whole slide in disguise
MAX_REGION_PIXELS = 8192 * 8192
#: TIFF ResolutionUnit -> micrometres per unit
_RESOLUTION_UNITS_UM = {"centimeter": 1e4, "inch": 25400.0}


def _pair(value: Any, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"slide {name} must be two integers, got {value!r}", 422) from e
    return a, b


class SlideImage:
    """An open whole-slide image: geometry, resolution and on-demand region reads.

    Safe to share between threads (OpenSlide reads are thread-safe); the handle closes when the object
    is garbage-collected, so a cache may drop it while a request still reads from it.
    """

    def __init__(
        self, slide: Any, name: str, tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES, source: str = ""
    ):
        self._slide = slide
        self._source = source  # full path, only to keep it out of error messages (folders may name patients)
        self.name = name
        self.nbytes = int(tile_cache_bytes)
        props = slide.properties
        self.vendor = props.get("openslide.vendor", "")
        background = props.get("openslide.background-color", "FFFFFF")
        try:
            self.background = tuple(int(background[i : i + 2], 16) for i in (0, 2, 4))
        except ValueError:
            self.background = (255, 255, 255)
        self.mpp, self.mpp_source = self._microns_per_pixel(props)

    @staticmethod
    def _microns_per_pixel(props: Any) -> tuple[tuple[float, float] | None, str]:
        try:
            mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
            if min(mpp) > 0:
                return mpp, "openslide"
        except (KeyError, ValueError):
            pass
        unit = str(props.get("tiff.ResolutionUnit", "")).lower()
        try:
            per_unit = _RESOLUTION_UNITS_UM[unit]
            res = (float(props["tiff.XResolution"]), float(props["tiff.YResolution"]))
            if min(res) > 0:
                return (per_unit / res[0], per_unit / res[1]), "tiff_resolution"
        except (KeyError, ValueError):
            pass
        return None, "none"

    # -- geometry ----------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return int(self._slide.level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level, level 0 the full resolution."""
        return tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's properties (vendor metadata); may name the case, so never log them."""
        return dict(self._slide.properties)

    def best_level_for_downsample(self, downsample: float) -> int:
        return int(self._slide.get_best_level_for_downsample(float(downsample)))

    # -- pixels ------------------------------------------------------------------------------------
    def _to_rgb(self, rgba: Any) -> np.ndarray:
        """OpenSlide marks pixels outside the scanned area transparent; paint them the slide background."""
        array = np.asarray(rgba)
        if array.shape[-1] == 3:
            return array.astype(np.uint8, copy=False)
        if array[..., 3].min() == 255:  # wholly inside the scanned area: nothing to paint, skip the blend
            return np.ascontiguousarray(array[..., :3])
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        background = np.asarray(self.background, np.float32)
        rgb = array[..., :3].astype(np.float32) * alpha + background * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """Pixels of ``level`` in a ``size = (width, height)`` box whose top-left corner is ``location =
        (x, y)`` in level-0 pixels, as ``(height, width, 3)`` uint8 RGB."""
        x, y = _pair(location, "location")
        w, h = _pair(size, "size")
        if (
            isinstance(level, bool)
            or not isinstance(level, (int, np.integer))
            or not 0 <= level < self.level_count
        ):
            raise InvalidRequest(
                f"level {level!r} is out of range for slide '{self.name}': it has {self.level_count} levels "
                f"(0-{self.level_count - 1})",
                422,
            )
        if w <= 0 or h <= 0:
            raise InvalidRequest(f"slide region size must be positive, got {w}x{h}", 422)
        if w * h > MAX_REGION_PIXELS:
            raise InvalidRequest(
                f"slide region {w}x{h} at level {level} is larger than the {MAX_REGION_PIXELS} pixels one read "
                "may decode: read a lower-resolution level or tiles",
                422,
            )
        width0, height0 = self.dimensions
        scale = self.level_downsamples[level]
        if x >= width0 or y >= height0 or x + w * scale <= 0 or y + h * scale <= 0:
            raise InvalidRequest(
                f"slide region at ({x}, {y}) of {w}x{h} pixels at level {level} lies outside slide "
                f"'{self.name}' ({width0}x{height0} at level 0)",
                422,
            )
        return self._to_rgb(self._decode(lambda: self._slide.read_region((x, y), int(level), (w, h))))

    def thumbnail(self, max_size: int | Sequence[int] = 512) -> np.ndarray:
        """The whole slide within ``max_size`` (an int for both sides, or ``(width, height)``), aspect kept,
        read from the best pyramid level, as ``(height, width, 3)`` uint8 RGB."""
        w, h = (
            (max_size, max_size) if isinstance(max_size, (int, np.integer)) else _pair(max_size, "max_size")
        )
        if w <= 0 or h <= 0:
            raise InvalidRequest(f"thumbnail size must be positive, got {w}x{h}", 422)
        return self._to_rgb(self._decode(lambda: self._slide.get_thumbnail((int(w), int(h))).convert("RGB")))

    def _decode(self, read: Any) -> Any:
        """Run an OpenSlide read; a corrupt tile surfaces only here, and is the file's fault (415)."""
        try:
            return read()
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self._source:
                reason = reason.replace(self._source, self.name)
            raise InvalidRequest(f"cannot decode slide '{self.name}': {reason}", 415) from e

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SlideImage('{self.name}', {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count}, "
            f"mpp={self.mpp})"
        )


def open_slide(
    path: str | os.PathLike, what: str = "slide", tile_cache_bytes: int = DEFAULT_TILE_CACHE_BYTES
) -> SlideImage:
    """Open a whole-slide image (SVS, NDPI, MRXS, tiled pyramidal TIFF... anything OpenSlide reads).

    Nothing is decoded until :meth:`SlideImage.read_region` or :meth:`SlideImage.thumbnail` is called.
    """
    path = Path(path)
    if not str(path) or not path.exists():
        raise InvalidRequest(f"{what} '{path.name or path}' not found", 400)
    try:
        import openslide
    except ImportError as e:  # pragma: no cover - openslide-python is a dependency
        raise InvalidRequest(
            "whole-slide images need openslide-python and openslide-bin on the server", 415
        ) from e
    unsupported = InvalidRequest(
        f"{what} '{path.name}' is not a whole-slide image OpenSlide can open: send a tiled pyramidal TIFF, "
        "SVS, NDPI, MRXS, SCN or another OpenSlide format",
        415,
    )
    if path.is_dir():
        raise unsupported
    try:
        if openslide.OpenSlide.detect_format(str(path)) is None:
            raise unsupported
        slide = openslide.OpenSlide(str(path))
        if tile_cache_bytes != DEFAULT_TILE_CACHE_BYTES:
            slide.set_cache(openslide.OpenSlideCache(int(tile_cache_bytes)))
    except InvalidRequest:
        raise
    except Exception as e:  # OpenSlideError and friends: a corrupt or truncated file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidRequest(
            f"cannot open {what} '{path.name}' with OpenSlide: {reason.replace(str(path), path.name)}", 415
        ) from e
    return SlideImage(slide, path.name, tile_cache_bytes, source=str(path))
