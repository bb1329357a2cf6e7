"""Plan and read the large square regions a whole-slide image is cut into before it is embedded.

A slide is tens of gigapixels, mostly bare glass. The plan is made on a thumbnail, never on full-resolution
pixels: :func:`tissue_mask` finds the tissue, :func:`annotation_mask` rasterises an optional tumour outline
(read from GeoJSON by :func:`read_geojson_polygons`), and :func:`plan_regions` lays a row-major grid of
``region_size`` squares at the pyramid level nearest a target pixel size, keeping the squares that hold
enough tissue (and, given an outline, enough tumour). :func:`read_regions` then decodes only those squares,
one at a time, so memory stays at one region whatever the slide size.

Coordinates follow :mod:`oncofusion.io.slides` (and OpenSlide): ``(x, y)`` = (column, row), a region's
corner in level-0 pixels, its ``size`` in pixels of the level it is read from.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2gray, rgb2hsv
from skimage.draw import polygon as draw_polygon
from skimage.filters import threshold_otsu

from oncofusion.io.slides import SlideImage

logger = logging.getLogger(__name__)

#: two Otsu classes whose means differ by less than this (channel on [0, 1]) are one material split by
#: noise (glass grain, uneven illumination), not glass and tissue: such a split is not used
MIN_CHANNEL_CONTRAST = 0.05
#: two levels whose pixel sizes differ by less than this (relative) are the same resolution (TIFF rationals)
_MPP_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Region:
    """One square of a slide to read and embed.

    ``x``, ``y``: top-left corner in level-0 pixels; ``level``: the pyramid level read; ``size``: side in
    pixels of that level; ``tissue_fraction`` and ``tumor_fraction``: share of the square covered by tissue
    and by the tumour outline (``None`` when no outline was given), measured on the thumbnail.
    """

    x: int
    y: int
    level: int
    size: int
    tissue_fraction: float
    tumor_fraction: float | None


# -- masks on the thumbnail ---------------------------------------------------------------------------
def _otsu_split(values: np.ndarray) -> float | None:
    """Otsu's threshold of ``values``, or None when the two classes it makes differ by less than
    :data:`MIN_CHANNEL_CONTRAST` (then it would only split noise, e.g. on blank glass)."""
    if values.size < 2 or float(values.max() - values.min()) < MIN_CHANNEL_CONTRAST:
        return None
    threshold = float(threshold_otsu(values))
    low, high = values[values <= threshold], values[values > threshold]
    if not low.size or not high.size or float(high.mean() - low.mean()) < MIN_CHANNEL_CONTRAST:
        return None
    return threshold


def _otsu_foreground(channel: np.ndarray) -> np.ndarray:
    """Pixels above a two-pass Otsu threshold of ``channel`` (on [0, 1], higher = more tissue-like).

    Stained tissue is itself bimodal (stain-dense epithelium, pale stroma), so when tissue fills much of
    the thumbnail one Otsu pass splits dense from pale tissue and calls the stroma glass. A second pass
    inside the lower class separates glass from pale tissue when that class holds real contrast; on a
    lower class of glass alone it finds none and the first threshold stands.
    """
    threshold = _otsu_split(channel.ravel())
    if threshold is None:
        return np.zeros(channel.shape, bool)
    refined = _otsu_split(channel[channel <= threshold])
    return channel > (threshold if refined is None else refined)


def _drop_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_pixels``."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    keep = np.bincount(labels.ravel()) >= min_pixels
    keep[0] = False
    return keep[labels]


def tissue_mask(thumbnail: np.ndarray, min_object_fraction: float = 0.001) -> np.ndarray:
    """Boolean ``(h, w)`` mask of tissue on an ``(h, w, 3)`` uint8 RGB thumbnail.

    Otsu (two-pass, see :func:`_otsu_foreground`) on saturation (HSV S) OR on inverted grey. Saturation is the main cue because background glass
    is bright *and* unsaturated while stained tissue (H&E, IHC) is coloured, so saturation separates them
    even when the scanner's white balance leaves glass grey or tinted; inverted grey adds tissue that is
    dark but weakly coloured (dense haematoxylin, thick folds). Specks and holes smaller than
    ``min_object_fraction`` of the thumbnail (dust, debris, gaps between nuclei) are then removed/filled.
    A blank thumbnail has no contrast to threshold and gives an all-False mask.
    """
    rgb = np.asarray(thumbnail)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"thumbnail must be an (h, w, 3) RGB array, got shape {rgb.shape}")
    if not 0.0 <= min_object_fraction <= 1.0:
        raise ValueError(f"min_object_fraction must lie in [0, 1], got {min_object_fraction}")
    rgb = rgb.astype(np.uint8, copy=False)
    mask = _otsu_foreground(rgb2hsv(rgb)[..., 1]) | _otsu_foreground(1.0 - rgb2gray(rgb))
    min_pixels = max(1, math.ceil(min_object_fraction * mask.size))
    mask = _drop_small(mask, min_pixels)
    return ~_drop_small(~mask, min_pixels)  # fill small holes


def annotation_mask(shape: Sequence[int], polygons: Iterable[np.ndarray], downsample: float) -> np.ndarray:
    """Boolean ``shape = (h, w)`` mask of the pixels whose centres lie inside any polygon.

    ``polygons`` are ``(N, 2)`` arrays of level-0 ``(x, y)`` vertices; ``downsample`` is level-0 pixels per
    mask pixel (the thumbnail's scale). Mask pixel ``i`` spans ``[i, i + 1)`` mask units and is tested at
    its centre, hence the half-pixel shift.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    height, width = (int(s) for s in shape)
    mask = np.zeros((height, width), bool)
    for index, vertices in enumerate(polygons):
        vertices = np.asarray(vertices, float)
        if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3:
            raise ValueError(f"polygon {index} must be an (N >= 3, 2) array of (x, y), got {vertices.shape}")
        rows = vertices[:, 1] / downsample - 0.5
        cols = vertices[:, 0] / downsample - 0.5
        rr, cc = draw_polygon(rows, cols, shape=(height, width))
        mask[rr, cc] = True
    return mask


def _exterior_rings(geometry: dict, where: str) -> list[np.ndarray]:
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
    if kind == "Polygon":
        rings = [coords[0]] if coords else []
    elif kind == "MultiPolygon":
        rings = [part[0] for part in coords or [] if part]
    else:
        raise ValueError(
            f"{where} is a {kind or 'missing'} geometry: only Polygon and MultiPolygon outline a region"
        )
    return [np.asarray(ring, float)[:, :2] for ring in rings]


def read_geojson_polygons(path: str | os.PathLike) -> list[np.ndarray]:
    """Exterior rings of the Polygon and MultiPolygon features of a GeoJSON FeatureCollection.

    Each ring is an ``(N, 2)`` float array of level-0 ``(x, y)`` pixels (QuPath's and ASAP's export
    convention). Holes are ignored: a tumour outline's holes are rare and the 1 % overlap rule is
    insensitive to them. Anything else (other JSON, other geometry types) is refused with a ValueError
    naming the file, since silently dropping part of an annotation would silently drop tumour regions.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"annotation '{path.name}' is not readable JSON: {e}") from e
    if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
        raise ValueError(
            f"annotation '{path.name}' is not a GeoJSON FeatureCollection: export the tumour outline as "
            "GeoJSON features (Polygon or MultiPolygon)"
        )
    polygons: list[np.ndarray] = []
    for index, feature in enumerate(document.get("features") or []):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        polygons += _exterior_rings(geometry, f"annotation '{path.name}' feature {index}")
    return polygons


# -- planning ---------------------------------------------------------------------------------------
def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def select_level(slide: SlideImage, target_mpp: float | None) -> int:
    """The level whose pixel size is closest to ``target_mpp`` without being coarser.

    Never coarser, because a region embedded from pixels coarser than the encoder was trained on has lost
    detail that cannot be recovered; finer is only slower. Level 0 when the slide declares no pixel size
    or no target is asked for.
    """
    if target_mpp is None or slide.mpp is None:
        logger.info(
            "slide '%s': %s, reading regions at level 0",
            slide.name,
            "no target pixel size" if target_mpp is None else "no microns-per-pixel in its metadata",
        )
        return 0
    base = float(np.mean(slide.mpp))
    candidates = [
        (level, base * downsample)
        for level, downsample in enumerate(slide.level_downsamples)
        if base * downsample <= target_mpp * (1 + _MPP_TOLERANCE)
    ]
    level, mpp = max(candidates, key=lambda c: c[1]) if candidates else (0, base)
    logger.info("slide '%s': level %d (%.3g um/px) for target %.3g um/px", slide.name, level, mpp, target_mpp)
    return level


def _box_fraction(mask: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Share of a ``(x0, y0, x1, y1)`` box (mask pixels, may run past the mask) that the mask covers."""
    x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    area = max(1, (x1 - x0) * (y1 - y0))
    return float(mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)].sum()) / area


def plan_regions(
    slide: SlideImage,
    region_size: int = 4096,
    target_mpp: float | None = 0.5,
    min_tissue: float = 0.25,
    tumor_polygons: Sequence[np.ndarray] | None = None,
    min_tumor_overlap: float = 0.01,
    thumbnail_size: int = 1024,
) -> list[Region]:
    """The grid of ``region_size`` squares, row-major, that hold enough tissue (and tumour).

    The grid starts at the slide's top-left corner and covers it, the last row and column running past
    the edge (read as white). A square is kept when its tissue fraction on the thumbnail's
    :func:`tissue_mask` is at least ``min_tissue``; with ``tumor_polygons`` (level-0 ``(x, y)`` vertices),
    also only when the outline covers at least ``min_tumor_overlap`` of it, so that regions
    barely touching the tumour are dropped (SMuRF's "< 1 % overlap" rule).
    """
    if isinstance(region_size, bool) or not isinstance(region_size, (int, np.integer)) or region_size <= 0:
        raise ValueError(f"region_size must be a positive integer, got {region_size!r}")
    if target_mpp is not None and not target_mpp > 0:
        raise ValueError(f"target_mpp must be positive or None, got {target_mpp!r}")
    if thumbnail_size <= 0:
        raise ValueError(f"thumbnail_size must be positive, got {thumbnail_size!r}")
    _check_fraction(min_tissue, "min_tissue")
    _check_fraction(min_tumor_overlap, "min_tumor_overlap")

    level = select_level(slide, target_mpp)
    span = region_size * slide.level_downsamples[level]  # level-0 pixels per region side
    width0, height0 = slide.dimensions
    thumb = slide.thumbnail(thumbnail_size)
    scale_x, scale_y = width0 / thumb.shape[1], height0 / thumb.shape[0]  # level-0 pixels per thumbnail pixel
    tissue = tissue_mask(thumb)
    tumor = None
    if tumor_polygons is not None:
        tumor = annotation_mask(tissue.shape, tumor_polygons, (scale_x + scale_y) / 2)

    regions = []
    for row in range(math.ceil(height0 / span)):
        for col in range(math.ceil(width0 / span)):
            x, y = round(col * span), round(row * span)
            box = (x / scale_x, y / scale_y, (x + span) / scale_x, (y + span) / scale_y)
            tissue_fraction = _box_fraction(tissue, box)
            tumor_fraction = None if tumor is None else _box_fraction(tumor, box)
            if tissue_fraction < min_tissue or (
                tumor_fraction is not None and tumor_fraction < min_tumor_overlap
            ):
                continue
            regions.append(Region(x, y, level, int(region_size), tissue_fraction, tumor_fraction))
    logger.info(
        "slide '%s': %d of %d regions of %d px at level %d kept",
        slide.name,
        len(regions),
        math.ceil(height0 / span) * math.ceil(width0 / span),
        region_size,
        level,
    )
    return regions


# -- reading ----------------------------------------------------------------------------------------
def _read_one(slide: SlideImage, region: Region) -> np.ndarray:
    """The region as ``(size, size, 3)`` uint8, white wherever it runs past the slide.

    Painted white here rather than left to the reader, whose fill is the vendor's background colour:
    every region's padding then looks the same to the encoder whichever scanner made the slide.
    """
    pixels = slide.read_region((region.x, region.y), region.level, (region.size, region.size))
    width, height = slide.level_dimensions[region.level]
    downsample = slide.level_downsamples[region.level]
    inside_w = math.ceil(width - region.x / downsample)
    inside_h = math.ceil(height - region.y / downsample)
    if inside_w < region.size or inside_h < region.size:
        pixels = pixels.copy()
        pixels[:, max(inside_w, 0) :] = 255
        pixels[max(inside_h, 0) :, :] = 255
    return pixels


def read_regions(
    slide: SlideImage, regions: Iterable[Region], out_size: int | None = None
) -> Iterator[np.ndarray]:
    """Yield each region as ``(size, size, 3)`` uint8 RGB, or ``(out_size, out_size, 3)`` when given.

    Lazily, one region at a time, so that a slide with hundreds of 4096-px regions never holds more than
    one decoded. The resize is antialiased (Lanczos): plain decimation would alias nuclei-scale texture.
    """
    if out_size is not None and (isinstance(out_size, bool) or out_size <= 0):
        raise ValueError(f"out_size must be a positive integer or None, got {out_size!r}")
    return _iter_regions(slide, list(regions), out_size)  # checked now, not at the first next()


def _iter_regions(slide: SlideImage, regions: list[Region], out_size: int | None) -> Iterator[np.ndarray]:
    for region in regions:
        pixels = _read_one(slide, region)
        if out_size is not None and out_size != region.size:
            resized = Image.fromarray(pixels).resize((out_size, out_size), Image.Resampling.LANCZOS)
            pixels = np.asarray(resized, np.uint8)
        yield pixels
