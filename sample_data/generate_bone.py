"""Generate SYNTHETIC CT volumes of a long bone with a matrix-forming tumor, and a clinical table.

Nothing here is patient data. Each case is a small field of view through a limb (air, skin fat,
muscle, a long bone with dense cortex and marrow) holding one tumor whose mineralized matrix is
either *osteoid* (cloud-like, amorphous, ill-defined dense matrix) or *chondroid* (rings and arcs,
punctate "popcorn" calcifications in a low-density cartilage matrix). Label 1 = osteoid (osteogenic
tumor), 0 = chondroid (chondrogenic tumor).

The labels are generated explicitly, so the generator knows how well any model *could* do:

1. ``y ~ Bernoulli(PREVALENCE)``;
2. clinical fields ``x | y`` (sex, age, location, pathological fracture) from class-conditional
   tables shaped after the bone-tumor literature: osteogenic tumors in younger patients, mostly
   metaphyseal, more often male and more often with a pathological fracture; chondrogenic tumors
   older, spread over diaphysis, metaphysis, flat bones and epiphysis (chondroblastoma). Location
   and fracture are missing completely at random in a few percent of cases;
3. an image-visible latent score ``z | y ~ N(+mu, 1)`` (osteoid) or ``N(-mu, 1)`` (chondroid); the
   matrix drawn into the image is a mixture, ``w = sigmoid(kappa * z)`` of it cloud-like and
   ``1 - w`` rings, arcs and dots, with random amount, size, position and noise. Intermediate ``z``
   give mixed, ambiguous matrix: the image alone is imperfect by construction.

Given ``(x, z)`` the posterior log-odds is exactly ``logit(PREVALENCE) + LLR_clinical(x) + 2 mu z``,
so the Bayes-optimal AUROC of these labels is known: ``Phi(sqrt(2) mu)`` from ``z`` alone (exact),
and Monte-Carlo estimates over many draws from the clinical table alone and from both. A model sees
``z`` only through the rendered pattern, so the image numbers are upper bounds. Location and fracture
are *not* drawn into the image (every case shows the same kind of long-bone shaft), so they reach a
model only through the clinical form and the clinical Bayes numbers stay exact.

World coordinates are RAS millimetres; the bone runs along +z (superior).

Usage::

    python -m sample_data.generate_bone --out sample_data/bone --num-cases 200 --seed 0
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
from scipy.special import expit, ndtr
from scipy.stats import rankdata

from oncofusion.data.folds import assign_folds
from sample_data.common import Grid, generator_parser, values_arg, write_nifti

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (96, 96, 64)
DEFAULT_SPACING = (0.8, 0.8, 1.5)
LABEL_NAMES = {0: "chondroid", 1: "osteoid"}
#: the bundle these studies are for: their sidecars say so, for a datastore shared with other bundles
BUNDLE = "bone_tumor_matrix"
DESCRIPTION = (
    "SYNTHETIC CT-like volumes of a long bone with one matrix-forming tumor each, and a synthetic clinical "
    "table; not patient data. Label 1 = osteoid (cloud-like matrix), 0 = chondroid (rings, arcs, popcorn "
    "calcifications). Labels, clinical fields and an image-visible latent score are drawn from explicit "
    "class-conditional distributions, so the Bayes-optimal AUROCs below are known. Made by "
    "sample_data/generate_bone.py."
)

# ----------------------------------------------------------------------------- label model

PREVALENCE = 0.5  # P(osteoid)
IMAGE_MU = 0.72  # z | y ~ N(+-mu, 1): image-only Bayes AUROC = Phi(sqrt(2) * mu)
MIX_KAPPA = 1.6  # cloud share of the matrix w = sigmoid(kappa * z)

SEXES = ("female", "male")
LOCATIONS = ("epiphysis", "metaphysis", "diaphysis", "flat bone", "spine")
P_MALE = {1: 0.62, 0: 0.48}
P_LOCATION = {1: (0.05, 0.62, 0.15, 0.10, 0.08), 0: (0.12, 0.30, 0.30, 0.20, 0.08)}
P_FRACTURE = {1: 0.20, 0: 0.09}
# age mixtures (weight, mean, sd) in years, clipped to AGE_RANGE and rounded to whole years
AGE_MIXTURE = {1: ((0.65, 17.0, 6.0), (0.35, 40.0, 15.0)), 0: ((0.20, 20.0, 6.0), (0.80, 44.0, 15.0))}
AGE_RANGE = (5, 85)
P_MISSING = {"location": 0.05, "fracture": 0.10}  # missing completely at random

# ----------------------------------------------------------------------------- appearance (HU, mm)

HU = {"air": -1000.0, "fat": -100.0, "muscle": 40.0, "cortex": 1200.0}
MEDULLA_HU = (50.0, 300.0)  # marrow, per case
NOISE_HU = (15.0, 25.0)  # quantum noise sd, per case
PSF_SIGMA_VOXELS = (0.6, 0.6, 0.4)
LIMB_SEMI_MM = ((34.0, 40.0), (31.0, 37.0))
FAT_MM = (3.0, 7.0)
BONE_RADIUS_MM = (10.0, 13.0)
CORTEX_MM = (2.5, 4.0)
TUMOR_SEMI_MM = ((7.0, 12.0), (7.0, 12.0), (8.0, 15.0))  # in-plane, in-plane, along the bone
TUMOR_BASE_HU = (10.0, 80.0)  # cartilage-like (chondroid) .. soft-tissue-like (osteoid) matrix
MINERAL_FRACTION = (0.25, 0.40)  # share of the tumor volume that is mineralized, per case
CLOUD_HU = (450.0, 650.0)
CLOUD_SIGMA_MM = 2.2
RING_RADIUS_MM = (2.5, 4.5)
RING_WIDTH_MM = 1.2
DOT_RADIUS_MM = (1.2, 2.2)
CALCIFICATION_HU = (850.0, 1150.0)


def sample_labels(rng: np.random.Generator, num: int) -> np.ndarray:
    """``num`` labels, 1 = osteoid with probability ``PREVALENCE``."""
    return (rng.random(num) < PREVALENCE).astype(int)


def sample_clinical(rng: np.random.Generator, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Class-conditional clinical fields for each label, vectorised (also used for the Monte Carlo).

    Returns arrays: ``male`` (bool), ``age`` (int years), ``location`` (index into ``LOCATIONS``,
    -1 missing), ``fracture`` (1 yes, 0 no, -1 missing).
    """
    labels = np.asarray(labels, int)
    n = labels.size
    p_male = np.where(labels == 1, P_MALE[1], P_MALE[0])
    male = rng.random(n) < p_male
    age = np.empty(n)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        weights, means, sds = (np.array(v) for v in zip(*AGE_MIXTURE[label], strict=True))
        component = rng.choice(len(weights), size=members.size, p=weights)
        age[members] = rng.normal(means[component], sds[component])
    age = np.clip(np.round(age), *AGE_RANGE).astype(int)
    location = np.empty(n, int)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        location[members] = rng.choice(len(LOCATIONS), size=members.size, p=P_LOCATION[label])
    fracture = (rng.random(n) < np.where(labels == 1, P_FRACTURE[1], P_FRACTURE[0])).astype(int)
    location[rng.random(n) < P_MISSING["location"]] = -1
    fracture[rng.random(n) < P_MISSING["fracture"]] = -1
    return {"male": male, "age": age, "location": location, "fracture": fracture}


def _age_probability(age: np.ndarray, label: int) -> np.ndarray:
    """P(rounded, clipped age | label): the mixture's mass on [age - 0.5, age + 0.5], tails at the clip ends."""
    age = np.asarray(age, float)
    low = np.where(age <= AGE_RANGE[0], -np.inf, age - 0.5)
    high = np.where(age >= AGE_RANGE[1], np.inf, age + 0.5)
    return sum(w * (ndtr((high - m) / s) - ndtr((low - m) / s)) for w, m, s in AGE_MIXTURE[label])


def clinical_log_likelihood_ratio(clinical: dict[str, np.ndarray]) -> np.ndarray:
    """Exact ``log p(x | osteoid) - log p(x | chondroid)`` of clinical fields as sampled above.

    Missing values are missing completely at random, so they contribute nothing.
    """
    male = np.asarray(clinical["male"], bool)
    llr = np.where(male, np.log(P_MALE[1] / P_MALE[0]), np.log((1 - P_MALE[1]) / (1 - P_MALE[0])))
    llr = llr + np.log(_age_probability(clinical["age"], 1) / _age_probability(clinical["age"], 0))
    location = np.asarray(clinical["location"], int)
    ratio = np.log(np.array(P_LOCATION[1]) / np.array(P_LOCATION[0]))
    llr = llr + np.where(location >= 0, ratio[np.clip(location, 0, None)], 0.0)
    fracture = np.asarray(clinical["fracture"], int)
    yes, no = np.log(P_FRACTURE[1] / P_FRACTURE[0]), np.log((1 - P_FRACTURE[1]) / (1 - P_FRACTURE[0]))
    return llr + np.where(fracture == 1, yes, np.where(fracture == 0, no, 0.0))


def sample_image_score(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """The image-visible latent ``z``: N(+mu, 1) for osteoid, N(-mu, 1) for chondroid."""
    return rng.normal(np.where(np.asarray(labels) == 1, IMAGE_MU, -IMAGE_MU), 1.0)


def posterior_log_odds(clinical: dict[str, np.ndarray] | None, z: np.ndarray | None) -> np.ndarray:
    """Bayes posterior log-odds of osteoid from the clinical fields and/or the image score."""
    logit = np.log(PREVALENCE / (1 - PREVALENCE))
    out = np.zeros(len(z) if z is not None else len(clinical["age"])) + logit
    if clinical is not None:
        out = out + clinical_log_likelihood_ratio(clinical)
    if z is not None:
        out = out + 2.0 * IMAGE_MU * np.asarray(z)
    return out


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    ranks = rankdata(scores)
    pos = labels.sum()
    neg = labels.size - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def bayes_aurocs(num_draws: int = 200_000, seed: int = 12345) -> dict[str, float]:
    """Bayes-optimal AUROCs of the label model: image-only exact, clinical and fused by Monte Carlo.

    The Monte-Carlo standard error of an AUROC near 0.85 over 200,000 draws is about 0.001.
    """
    rng = np.random.default_rng(seed)
    labels = sample_labels(rng, num_draws)
    clinical = sample_clinical(rng, labels)
    z = sample_image_score(rng, labels)
    return {
        "bayes_auroc": round(_auroc(labels, posterior_log_odds(clinical, z)), 4),
        "bayes_auroc_image": round(float(ndtr(np.sqrt(2.0) * IMAGE_MU)), 4),
        "bayes_auroc_image_monte_carlo": round(_auroc(labels, z), 4),
        "bayes_auroc_clinical": round(_auroc(labels, clinical_log_likelihood_ratio(clinical)), 4),
        "bayes_monte_carlo_draws": num_draws,
    }


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class CaseTask:
    """Everything one worker needs to render one case."""

    case_id: str
    seed: tuple[int, ...]
    image_score: float
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    image_path: str


def _smooth_noise(shape: Sequence[int], sigma_voxels: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with the given correlation length."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_voxels)
    return field / max(float(field.std()), 1e-6)


def _anatomy(grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Limb cross-section (air, fat, muscle) with a long bone (cortex, marrow) running along z."""
    x, y, _ = grid.axes()
    spacing = np.asarray(grid.spacing)
    semi = [rng.uniform(*LIMB_SEMI_MM[0]), rng.uniform(*LIMB_SEMI_MM[1])]
    rho = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2)  # 1 at the skin
    fat = rng.uniform(*FAT_MM) / min(semi)
    bone_center = rng.uniform(-4.0, 4.0, 2)
    radius = rng.uniform(*BONE_RADIUS_MM)
    cortex = rng.uniform(*CORTEX_MM)
    r = np.sqrt((x - bone_center[0]) ** 2 + (y - bone_center[1]) ** 2)
    shape2d = np.broadcast_shapes(rho.shape, r.shape)
    hu = np.full(grid.shape, HU["air"], np.float32)
    muscle = HU["muscle"] + 8.0 * _smooth_noise(grid.shape, 3.0 / spacing, rng)
    hu = np.where(np.broadcast_to(rho <= 1.0, grid.shape), HU["fat"], hu)
    hu = np.where(np.broadcast_to(rho <= 1.0 - fat, grid.shape), muscle, hu)
    medulla = rng.uniform(*MEDULLA_HU) + 35.0 * _smooth_noise(grid.shape, 1.2 / spacing, rng)
    in_bone = np.broadcast_to((r <= radius).reshape(shape2d), grid.shape)
    in_medulla = np.broadcast_to((r <= radius - cortex).reshape(shape2d), grid.shape)
    hu = np.where(in_bone, HU["cortex"] + 60.0 * _smooth_noise(grid.shape, 1.0 / spacing, rng), hu)
    hu = np.where(in_medulla, medulla, hu)
    return hu, {"bone_center": bone_center, "radius": radius, "limb_semi": semi, "fat": fat}


def _tumor_shape(grid: Grid, center: np.ndarray, semi: np.ndarray, rng: np.random.Generator):
    """Lobulated ellipsoid occupancy (0..1, partial volume at the edge) in a local box, and the box."""
    spacing = np.asarray(grid.spacing)
    reach = semi.max() * 1.3 + 2.0
    lo = np.maximum(np.floor((center - reach - grid.origin) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((center + reach - grid.origin) / spacing).astype(int) + 1, grid.shape)
    x, y, z = grid.axes(lo, hi)
    radius = np.sqrt(((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2
                     + ((z - center[2]) / semi[2]) ** 2)
    local_shape = tuple(int(v) for v in hi - lo)
    lobulation = 0.12 * _smooth_noise(local_shape, 3.5 / spacing, rng)
    edge_mm = 0.7
    occupancy = np.clip((1.0 + lobulation - radius) * semi.mean() / edge_mm + 0.5, 0.0, 1.0)
    return occupancy.astype(np.float32), tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), lo


def _shell(local_shape, center_vox, radius_mm, width_mm, spacing, arc_normal=None) -> np.ndarray:
    """Spherical shell (a ring in any section) of ``width_mm``; half of it when ``arc_normal`` is given."""
    idx = np.ogrid[tuple(slice(0, s) for s in local_shape)]
    offsets = [(idx[a] - center_vox[a]) * spacing[a] for a in range(3)]
    dist = np.sqrt(sum(o**2 for o in offsets))
    shell = np.clip(1.0 - np.abs(dist - radius_mm) / width_mm, 0.0, 1.0)
    if arc_normal is not None:
        shell = shell * (sum(o * n for o, n in zip(offsets, arc_normal, strict=True)) > 0)
    return shell


def _dot(local_shape, center_vox, radius_mm, spacing) -> np.ndarray:
    idx = np.ogrid[tuple(slice(0, s) for s in local_shape)]
    dist = np.sqrt(sum(((idx[a] - center_vox[a]) * spacing[a]) ** 2 for a in range(3)))
    return np.clip(radius_mm + 0.5 - dist, 0.0, 1.0)


def _matrix(occupancy: np.ndarray, w: float, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HU added by mineralization inside the tumor: a share ``w`` cloud, ``1 - w`` rings, arcs and dots."""
    inside = occupancy > 0.5
    volume = float(inside.sum())
    fraction = rng.uniform(*MINERAL_FRACTION)
    added = np.zeros(occupancy.shape, np.float32)
    # cloud: the top part of a smooth random field, with soft (ill-defined) borders
    if w * fraction > 0.01:
        field = _smooth_noise(occupancy.shape, CLOUD_SIGMA_MM / spacing, rng)
        threshold = np.quantile(field[inside], 1.0 - min(w * fraction, 0.95)) if volume else np.inf
        cloud = np.clip((field - threshold) / 0.6 + 0.5, 0.0, 1.0)
        added += rng.uniform(*CLOUD_HU) * cloud
    # chondroid: rings/arcs and punctate dots until their share of the volume is reached
    target = (1.0 - w) * fraction * volume * 0.6  # calcified voxels are small and dense
    points = np.argwhere(occupancy > 0.8)
    drawn, attempts = 0.0, 0
    while drawn < target and len(points) and attempts < 200:
        attempts += 1
        center = points[rng.integers(len(points))] + rng.uniform(-0.5, 0.5, 3)
        if rng.random() < 0.6:
            normal = rng.standard_normal(3) if rng.random() < 0.6 else None
            piece = _shell(occupancy.shape, center, rng.uniform(*RING_RADIUS_MM), RING_WIDTH_MM, spacing, normal)
        else:
            piece = _dot(occupancy.shape, center, rng.uniform(*DOT_RADIUS_MM), spacing)
        added = np.maximum(added, rng.uniform(*CALCIFICATION_HU) * piece)
        drawn += float(piece.sum())
    return added * occupancy


def render_case(task: CaseTask) -> dict:
    """Render one synthetic volume, write it, and return its geometry (centre voxel, mm, ROI box)."""
    rng = np.random.default_rng(list(task.seed))
    spacing = np.asarray(task.spacing, float)
    shape = np.asarray(task.shape)
    extent = shape * spacing
    origin = -extent / 2.0 + rng.uniform(-3.0, 3.0, 3)
    grid = Grid(tuple(int(v) for v in shape), tuple(float(v) for v in spacing), tuple(float(v) for v in origin))
    hu, anatomy = _anatomy(grid, rng)

    # the tumor: in the marrow or eccentric, breaching the cortex, somewhere along the shaft
    semi = np.array([rng.uniform(*r) for r in TUMOR_SEMI_MM])
    angle = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0.0, anatomy["radius"] * 0.85)
    center = np.array([
        anatomy["bone_center"][0] + offset * np.cos(angle),
        anatomy["bone_center"][1] + offset * np.sin(angle),
        rng.uniform(-0.2, 0.2) * extent[2] + (origin[2] + extent[2] / 2.0),
    ])
    center_ijk = np.round((center - origin) / spacing).astype(int)
    center = origin + center_ijk * spacing  # the centre sits on a voxel
    occupancy, box, lo = _tumor_shape(grid, center, semi, rng)
    w = float(expit(MIX_KAPPA * task.image_score))
    base = TUMOR_BASE_HU[0] + w * (TUMOR_BASE_HU[1] - TUMOR_BASE_HU[0]) + rng.normal(0.0, 6.0)
    tumor_hu = base + 10.0 * _smooth_noise(occupancy.shape, 1.5 / spacing, rng)
    tumor_hu += _matrix(occupancy, w, spacing, rng)
    hu[box] += occupancy * (tumor_hu - hu[box])

    hu = ndimage.gaussian_filter(hu, PSF_SIGMA_VOXELS)
    hu += rng.normal(0.0, rng.uniform(*NOISE_HU), grid.shape).astype(np.float32)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    write_nifti(image, grid.affine, Path(task.image_path))

    mask = np.argwhere(occupancy > 0.5) + lo
    box_lo, box_hi = mask.min(0), mask.max(0)
    center_mm = grid.affine @ np.r_[center_ijk, 1.0]
    return {
        "center_ijk": [int(v) for v in center_ijk],
        "center_mm": [round(float(v), 3) for v in center_mm[:3]],
        "roi": [[int(v) for v in box_lo], [int(v) for v in box_hi]],
        "tumor_semi_axes_mm": [round(float(v), 2) for v in semi],
        "osteoid_share": round(w, 4),
    }


def _render_all(tasks: Sequence[CaseTask], workers: int) -> list[dict]:
    if workers <= 1:
        return [render_case(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(render_case, tasks, chunksize=4))


# ----------------------------------------------------------------------------- tables and manifest


def clinical_record(clinical: dict[str, np.ndarray], index: int) -> dict:
    """The clinical fields of one case as JSON values (``None`` = missing)."""
    location = int(clinical["location"][index])
    fracture = int(clinical["fracture"][index])
    return {
        "sex": "male" if clinical["male"][index] else "female",
        "age": int(clinical["age"][index]),
        "location": LOCATIONS[location] if location >= 0 else None,
        "fracture": bool(fracture) if fracture >= 0 else None,
    }


def generate(
    out: str | Path,
    num_cases: int = 200,
    seed: int = 0,
    num_folds: int = 5,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    workers: int = 1,
    bayes_draws: int = 200_000,
) -> dict:
    """Write ``num_cases`` synthetic cases under ``out`` and return the manifest (also written)."""
    out = Path(out)
    datastore = out / "datastore"
    (datastore / "sidecars").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    labels = sample_labels(rng, num_cases)
    clinical = sample_clinical(rng, labels)
    z = sample_image_score(rng, labels)
    tasks = [
        CaseTask(f"bone_{i:04d}", (seed, i, 2), float(z[i]), tuple(shape), tuple(spacing),
                 str(datastore / f"bone_{i:04d}.nii.gz"))
        for i in range(num_cases)
    ]
    geometries = _render_all(tasks, workers)
    patients = [f"SYN-BONE-{seed:02d}-{i:04d}" for i in range(num_cases)]
    folds = assign_folds(patients, [int(v) for v in labels], num_folds, seed)
    posterior = expit(posterior_log_odds(clinical, z))
    cases = []
    for i, (task, geometry) in enumerate(zip(tasks, geometries, strict=True)):
        label = int(labels[i])
        sidecar = {
            "case_id": task.case_id,
            "patient_id": patients[i],
            "center_ijk": geometry["center_ijk"],
            "center_mm": geometry["center_mm"],
            "roi": geometry["roi"],
            "label": label,
            "label_name": LABEL_NAMES[label],
            "label_meaning": "1 = osteoid (osteogenic), 0 = chondroid (chondrogenic) matrix mineralization",
            **clinical_record(clinical, i),
            "synthetic": True,
            "bundle": BUNDLE,  # this bundle's study in a datastore shared with other bundles' (make demo)
        }
        (datastore / "sidecars" / f"{task.case_id}.json").write_text(json.dumps(sidecar, indent=2))
        row = {k: v for k, v in sidecar.items() if k not in ("label_meaning", "synthetic", "bundle")}
        row.update({
            "image": f"datastore/{task.case_id}.nii.gz",
            "fold": int(folds[i]),
            "oracle": {
                "image_score": round(float(z[i]), 4),
                "osteoid_share": geometry["osteoid_share"],
                "posterior": round(float(posterior[i]), 4),
            },
        })
        cases.append(row)
    labels_arr = np.asarray(labels)
    sample_oracle = {}
    if 0 < labels_arr.sum() < labels_arr.size:
        sample_oracle = {
            "combined": round(_auroc(labels_arr, posterior_log_odds(clinical, z)), 4),
            "image": round(_auroc(labels_arr, z), 4),
            "clinical": round(_auroc(labels_arr, clinical_log_likelihood_ratio(clinical)), 4),
        }
    manifest = {
        "description": DESCRIPTION,
        "synthetic": True,
        "seed": seed,
        "num_folds": num_folds,
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        **bayes_aurocs(bayes_draws),
        "bayes_note": (
            "Bayes-optimal AUROC of the generator's own labels: 'bayes_auroc' from clinical fields and the "
            "image-visible latent score together, '_image' from the score alone (exact), '_clinical' from the "
            "clinical fields alone; Monte Carlo over 'bayes_monte_carlo_draws' draws. A model sees the score only "
            "through the rendered matrix, so the image numbers are upper bounds."
        ),
        "sample_oracle_auroc": sample_oracle,
        "label_model": {
            "prevalence_osteoid": PREVALENCE,
            "image_mu": IMAGE_MU,
            "mix_kappa": MIX_KAPPA,
            "p_male": {LABEL_NAMES[k]: v for k, v in P_MALE.items()},
            "age_mixture": {LABEL_NAMES[k]: [list(c) for c in v] for k, v in AGE_MIXTURE.items()},
            "p_location": {LABEL_NAMES[k]: dict(zip(LOCATIONS, v, strict=True)) for k, v in P_LOCATION.items()},
            "p_fracture": {LABEL_NAMES[k]: v for k, v in P_FRACTURE.items()},
            "p_missing": P_MISSING,
        },
        "cases": cases,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = generator_parser(__doc__.split("\n\n")[0], "sample_data/bone", 200)
    parser.add_argument("--shape", type=values_arg(int, 3), default=DEFAULT_SHAPE, help="voxels, e.g. 96,96,64")
    parser.add_argument("--spacing", type=values_arg(float, 3), default=DEFAULT_SPACING, help="mm, e.g. 0.8,0.8,1.5")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    parser.add_argument("--bayes-draws", type=int, default=200_000, help="Monte-Carlo draws for the Bayes AUROCs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = generate(args.out, args.num_cases, args.seed, args.num_folds, args.shape, args.spacing,
                        args.workers, args.bayes_draws)
    logger.info(
        "wrote %d synthetic bone cases to %s in %.0fs; Bayes AUROC %.3f (image %.3f, clinical %.3f)",
        len(manifest["cases"]), args.out, time.perf_counter() - start, manifest["bayes_auroc"],
        manifest["bayes_auroc_image"], manifest["bayes_auroc_clinical"],
    )


if __name__ == "__main__":
    main()
