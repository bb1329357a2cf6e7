"""A whole-slide image as SMuRF's pathology input: one grid of region embeddings per tissue fragment.

The slide's tissue (:func:`~oncofusion.data.slide_regions.tissue_mask` on the thumbnail) falls into
*fragments*, its 8-connected components: the pieces of tissue on the glass. With a tumour outline, a
fragment whose tissue the outline covers less than ``min_tumor_overlap`` (1 %) of is dropped whole, as
in SMuRF; every tissue region of a kept fragment is kept, tumour or not (the rule is per fragment, so
:func:`~oncofusion.data.slide_regions.plan_regions` is asked for all tissue regions, not tumour ones).

Each kept region is read, shrunk to the encoder's input size and embedded (:mod:`..networks.region_encoders`),
and its vector placed at the region's ``(row, col)`` on the slide's region grid, counted from the
fragment's top-left region. A region straddling two fragments belongs to the one holding most of its
tissue on the thumbnail. Fragments come in raster order of their first thumbnail pixel (top to bottom,
then left to right) and share one ``S x S`` grid (``grid_size``):

- a fragment of ``h x w <= S x S`` regions is centre-padded with zero vectors, ``floor((S - h) / 2)``
  rows above and the rest below (likewise columns), the authors' collate convention;
- a fragment longer than ``S`` along an axis is **cropped** to the ``S`` regions around its centre of
  mass on that axis, regions weighted by their tumour fraction when an outline is given (equally
  otherwise, or when the fragment's regions hold no outline), so the crop keeps the tumour. Cropping,
  not downsampling: an average of neighbouring embeddings is a vector the encoder never produced, and
  SMuRF's pathology Swin reads embeddings at one scale. The regions cropped away are not read at all;
  their count is logged. Choose ``S`` to fit the cohort's fragments (:func:`plan_fragment_grids` tells).

The result, ``(n_fragments, S, S, D)`` float32 (``D`` = 192 for the built-in encoders), is cached on disk
by the slide's content, the annotation, the encoder's weights and every planning parameter
(:class:`~oncofusion.io.array_cache.ArrayCache`).

Regions are read by a torch ``DataLoader``: with ``num_workers > 0`` each worker process opens its own
OpenSlide handle (a handle is not safe to share across a fork), reads and shrinks regions, and the main
process encodes batches on the encoder's device while the workers read the next ones.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from oncofusion.data.slide_regions import (
    Region,
    annotation_mask,
    plan_regions,
    read_geojson_polygons,
    read_regions,
    tissue_mask,
)
from oncofusion.io.array_cache import ArrayCache
from oncofusion.io.slides import SlideImage, open_slide
from oncofusion.networks.region_encoders import weights_digest

logger = logging.getLogger(__name__)

#: bumped whenever planning or placement changes what a cached grid holds
GRID_FORMAT_VERSION = 1
DEFAULT_GRID_SIZE = 16

Annotation = str | os.PathLike | Sequence[np.ndarray] | None


@dataclass(frozen=True)
class PlacedRegion:
    """A region and its cell: ``fragment`` indexes the output's first axis, ``(row, col)`` the S x S grid."""

    region: Region
    fragment: int
    row: int
    col: int


@dataclass(frozen=True)
class FragmentGridPlan:
    """Where every region read goes: ``placed`` (row-major slide order), ``n_fragments`` kept,
    ``fragment_shapes`` (rows, cols of regions before padding or cropping), ``dropped_fragments`` (below
    the tumour overlap, or holding no region) and ``cropped_regions`` (beyond ``grid_size``)."""

    grid_size: int
    placed: tuple[PlacedRegion, ...]
    n_fragments: int
    fragment_shapes: tuple[tuple[int, int], ...]
    dropped_fragments: int
    cropped_regions: int


# -- planning --------------------------------------------------------------------------------------
def _tumor_polygons(annotation: Annotation) -> list[np.ndarray] | None:
    if annotation is None:
        return None
    if isinstance(annotation, (str, os.PathLike)):
        return read_geojson_polygons(annotation)
    return [np.asarray(p, float) for p in annotation]


def _window(cells: np.ndarray, weights: np.ndarray, size: int) -> int:
    """Offset that maps a fragment's cells (one axis) into ``[0, size)``: centred padding when they fit,
    else the ``size`` cells around their weighted centre of mass (kept inside the fragment)."""
    low, high = int(cells.min()), int(cells.max())
    extent = high - low + 1
    if extent <= size:
        return (size - extent) // 2 - low
    centre = float(np.average(cells, weights=weights)) if weights.sum() > 0 else float(cells.mean())
    start = min(max(math.floor(centre - (size - 1) / 2 + 0.5), low), high - size + 1)
    return -start


def plan_fragment_grids(
    slide: SlideImage,
    region_size: int = 4096,
    target_mpp: float | None = 0.5,
    grid_size: int = DEFAULT_GRID_SIZE,
    min_tissue: float = 0.25,
    annotation: Annotation = None,
    min_tumor_overlap: float = 0.01,
    thumbnail_size: int = 1024,
) -> FragmentGridPlan:
    """Fragments, their kept regions and each region's cell (see the module docstring); reads only the
    thumbnail. ``annotation``: a GeoJSON path or level-0 ``(N, 2)`` ``(x, y)`` polygons, or None (every
    fragment kept)."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size <= 0:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    polygons = _tumor_polygons(annotation)
    regions = plan_regions(slide, region_size=region_size, target_mpp=target_mpp, min_tissue=min_tissue,
                           tumor_polygons=polygons, min_tumor_overlap=0.0, thumbnail_size=thumbnail_size)
    thumb = slide.thumbnail(thumbnail_size)  # the same thumbnail and mask plan_regions used
    labels, n_labels = ndimage.label(tissue_mask(thumb), structure=np.ones((3, 3), bool))
    width0, height0 = slide.dimensions
    scale = (width0 / thumb.shape[1], height0 / thumb.shape[0])  # level-0 pixels per thumbnail pixel
    keep = _kept_fragments(labels, n_labels, polygons, sum(scale) / 2, min_tumor_overlap)
    members = _fragment_members(slide, regions, labels, keep, scale)

    placed: list[PlacedRegion] = []
    shapes = []
    for fragment, label in enumerate(sorted(members)):
        shapes.append(_place(members[label], fragment, grid_size, placed))
    cropped = sum(len(cells) for cells in members.values()) - len(placed)
    if cropped:
        logger.warning("%d regions lie beyond the %dx%d fragment grid and are cropped away (largest fragment "
                       "%dx%d regions): raise grid_size to keep them", cropped, grid_size, grid_size,
                       *max(shapes, key=max))
    logger.info("%d of %d tissue fragments kept (%d regions placed)", len(members), n_labels, len(placed))
    return FragmentGridPlan(grid_size, tuple(placed), len(members), tuple(shapes), n_labels - len(members), cropped)


def _kept_fragments(labels: np.ndarray, n_labels: int, polygons: list[np.ndarray] | None, downsample: float,
                    min_tumor_overlap: float) -> np.ndarray:
    """Boolean per label (0 = glass, never kept): fragments whose tissue the outline covers at least
    ``min_tumor_overlap`` of; all of them without an outline."""
    keep = np.ones(n_labels + 1, bool)
    keep[0] = False
    if polygons is not None:
        tumor = annotation_mask(labels.shape, polygons, downsample)
        area = np.bincount(labels.ravel(), minlength=n_labels + 1)
        inside = np.bincount(labels[tumor], minlength=n_labels + 1)
        keep &= inside >= min_tumor_overlap * np.maximum(area, 1)
    return keep


def _region_label(slide: SlideImage, region: Region, labels: np.ndarray, scale: tuple[float, float]) -> int:
    """The fragment a region belongs to: the one holding most of the tissue in its box (0: none)."""
    span = region.size * slide.level_downsamples[region.level]
    x0, y0 = region.x / scale[0], region.y / scale[1]
    x1, y1 = (region.x + span) / scale[0], (region.y + span) / scale[1]
    window = labels[max(math.floor(y0), 0) : max(math.ceil(y1), 0), max(math.floor(x0), 0) : max(math.ceil(x1), 0)]
    counts = np.bincount(window.ravel())
    counts[0] = 0
    return int(counts.argmax()) if counts.sum() else 0


def _fragment_members(slide: SlideImage, regions: Sequence[Region], labels: np.ndarray, keep: np.ndarray,
                      scale: tuple[float, float]) -> dict[int, list[tuple[Region, int, int]]]:
    """Kept fragment label -> its regions with their ``(row, col)`` on the slide's region grid."""
    members: dict[int, list[tuple[Region, int, int]]] = {}
    for region in regions:
        label = _region_label(slide, region, labels, scale)
        if keep[label]:
            span = region.size * slide.level_downsamples[region.level]
            members.setdefault(label, []).append((region, round(region.y / span), round(region.x / span)))
    return members


def _place(cells: list[tuple[Region, int, int]], fragment: int, grid_size: int,
           placed: list[PlacedRegion]) -> tuple[int, int]:
    """Append the fragment's regions that fit the grid to ``placed``; return its (rows, cols) extent."""
    rows = np.array([row for _, row, _ in cells])
    cols = np.array([col for _, _, col in cells])
    weights = np.array([region.tumor_fraction or 0.0 for region, _, _ in cells])
    row_shift, col_shift = _window(rows, weights, grid_size), _window(cols, weights, grid_size)
    for region, row, col in cells:
        if 0 <= row + row_shift < grid_size and 0 <= col + col_shift < grid_size:
            placed.append(PlacedRegion(region, fragment, row + row_shift, col + col_shift))
    return int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1


# -- reading ---------------------------------------------------------------------------------------
class SlideRegionDataset(Dataset):
    """Regions of one slide as ``(index, (3, S, S) uint8)``, ``S`` = ``out_size`` (None: region size).

    Opens the slide lazily in the process that reads, and again after a fork: every DataLoader worker
    gets its own OpenSlide handle; none is pickled.
    """

    def __init__(self, slide_path: str | os.PathLike, regions: Sequence[Region], out_size: int | None = None):
        self.slide_path = Path(slide_path)
        self.regions = list(regions)
        self.out_size = out_size
        self._slide: SlideImage | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def _handle(self) -> SlideImage:
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.slide_path), os.getpid()
        return self._slide

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        (pixels,) = read_regions(self._handle(), [self.regions[index]], self.out_size)
        pixels = pixels if pixels.flags.writeable else pixels.copy()
        return index, torch.from_numpy(pixels).permute(2, 0, 1)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None, "_pid": None}

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._pid = None, None


def region_loader(dataset: SlideRegionDataset, batch_size: int = 8, num_workers: int = 0,
                  pin_memory: bool = False) -> DataLoader:
    """Batches ``(indices (B,), pixels (B, 3, S, S) uint8)`` in the dataset's order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=2 if num_workers else None)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def embed_plan(slide_path: str | os.PathLike, plan: FragmentGridPlan, encoder: nn.Module, batch_size: int = 8,
               num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """Read, encode and place every region of ``plan``: ``(n_fragments, S, S, D)`` float32, zero where
    no region lies. ``encoder`` maps ``(B, 3, H, W)`` uint8 to ``(B, D)``; it runs in eval mode under
    ``no_grad`` on its own device, and regions are shrunk to its ``input_size`` (if it has one) while read."""
    size = plan.grid_size
    dataset = SlideRegionDataset(slide_path, [p.region for p in plan.placed], getattr(encoder, "input_size", None))
    device = _device_of(encoder)
    grids: np.ndarray | None = None
    was_training = encoder.training
    encoder.eval()
    try:
        loader = region_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
        with torch.no_grad(), tqdm(total=len(dataset), desc="slide regions", unit="region",
                                   disable=not progress) as bar:
            for indices, pixels in loader:
                vectors = encoder(pixels.to(device, non_blocking=True))
                if vectors.ndim != 2 or vectors.shape[0] != len(indices):
                    raise ValueError(f"region encoder must map (B, 3, H, W) to (B, D), got {tuple(vectors.shape)} "
                                     f"for B = {len(indices)}")
                vectors = vectors.float().cpu().numpy()
                if grids is None:
                    grids = np.zeros((plan.n_fragments, size, size, vectors.shape[1]), np.float32)
                for index, vector in zip(indices.tolist(), vectors, strict=True):
                    cell = plan.placed[index]
                    grids[cell.fragment, cell.row, cell.col] = vector
                bar.update(len(indices))
    finally:
        encoder.train(was_training)
        dataset.close()
    if grids is None:  # no region at all: the embedding width still comes from the encoder
        width = int(getattr(encoder, "embed_dim", 0)) or 0
        grids = np.zeros((plan.n_fragments, size, size, width), np.float32)
    return grids


def _annotation_identity(annotation: Annotation, cache: ArrayCache) -> str | None:
    if annotation is None:
        return None
    if isinstance(annotation, (str, os.PathLike)):
        return cache.content_digest(annotation)
    digest = hashlib.sha256()
    for polygon in annotation:
        array = np.ascontiguousarray(np.asarray(polygon, np.float64))
        digest.update(repr(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def _embed_slide(slide: SlideImage, slide_path: Path, encoder: nn.Module, annotation: Annotation,
                 planning: dict[str, Any], batch_size: int, num_workers: int, progress: bool) -> np.ndarray:
    plan = plan_fragment_grids(slide, annotation=annotation, **planning)
    if not plan.n_fragments:
        reason = (f"none is covered by the tumour annotation by at least {planning['min_tumor_overlap']:.0%}: "
                  "check that the annotation belongs to this slide and is in level-0 pixels"
                  if annotation is not None else "no tissue region was found on its thumbnail")
        raise ValueError(f"slide '{slide.name}' has no tissue fragment left to embed: {reason}")
    return embed_plan(slide_path, plan, encoder, batch_size, num_workers, progress)


def slide_fragment_grids(
    slide_path: str | os.PathLike,
    encoder: nn.Module,
    *,
    annotation: Annotation = None,
    region_size: int = 4096,
    target_mpp: float | None = 0.5,
    grid_size: int = DEFAULT_GRID_SIZE,
    min_tissue: float = 0.25,
    min_tumor_overlap: float = 0.01,
    thumbnail_size: int = 1024,
    batch_size: int = 8,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """``(n_fragments, grid_size, grid_size, D)`` float32 region embeddings of one slide (see the module
    docstring), read from ``cache_dir`` when this slide content, annotation, encoder weights and these
    planning parameters were embedded before. ``batch_size`` and ``num_workers`` change speed, never the
    result.

    Raises :class:`~oncofusion.contract.InvalidRequest` naming the file when OpenSlide cannot open it,
    and ValueError when no fragment is left (no tissue found, or none overlapping the annotation).
    """
    slide_path = Path(slide_path)
    planning = {"region_size": region_size, "target_mpp": target_mpp, "grid_size": grid_size,
                "min_tissue": min_tissue, "min_tumor_overlap": min_tumor_overlap,
                "thumbnail_size": thumbnail_size}
    with open_slide(slide_path) as slide:  # a clear error naming the file before anything is hashed
        compute = functools.partial(_embed_slide, slide, slide_path, encoder, annotation, planning,
                                    batch_size, num_workers, progress)
        if cache_dir is None:
            return compute()
        cache = ArrayCache(cache_dir)
        key = {
            "format": GRID_FORMAT_VERSION,
            "slide": cache.content_digest(slide_path),
            "annotation": _annotation_identity(annotation, cache),
            "encoder": weights_digest(encoder),
            "region_size": int(region_size),
            "target_mpp": None if target_mpp is None else float(target_mpp),
            "grid_size": int(grid_size),
            "min_tissue": float(min_tissue),
            "min_tumor_overlap": float(min_tumor_overlap),
            "thumbnail_size": int(thumbnail_size),
        }
        grids = cache.get(key, compute)
        logger.info("slide fragment grids %s (%s)", "read from the cache" if cache.hits else "computed and cached",
                    cache.path(key).name)
        return grids
