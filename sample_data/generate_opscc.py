"""Generate SYNTHETIC oropharyngeal cancer (OPSCC) patients: a neck CT with tumor and lymph-node masks, an
H&E-like whole-slide image with a tumor annotation, tumor grade and disease-free survival.

Nothing here is patient data. Each patient has five latent traits, standard normal: ``size`` (primary
tumor), ``nodal`` (nodal burden), ``necrosis``, ``nuclear`` (nuclear pleomorphism and density) and
``stroma`` (tumor-stroma ratio). The images carry them:

- CT (int16 HU, RAS, 96x96x48 voxels of 1x1x2.5 mm by default): a neck phantom (fat, muscle, the
  oropharyngeal airway, a vertebra with its canal, contrast-filled carotids and jugulars, the mandible in
  the upper slices) with an enhancing lobulated primary tumor at the lateral oropharyngeal wall, its
  radius from ``size``, its necrotic core and texture from ``necrosis``; 0-3 neck lymph nodes (count and
  size from ``nodal``, cystic with an enhancing rim with a probability rising with ``necrosis``);
  scanner blur and noise.
- Slide (tiled pyramidal TIFF, 3 levels, 2048 px square at 0.5 um/px by default): 1-3 tissue fragments on
  glass, textured with the real immunohistochemistry image that ships with scikit-image, recoloured as
  H&E. Inside the tumor outline, epithelium (hematoxylin depth and nuclear packing from ``nuclear``) is
  mixed with fibrous stroma (share from ``stroma``); tissue outside it is stroma. Every slide draws a
  stain jitter that carries no label. The first fragment always holds tumor; the others hold none half
  of the time (their tumor overlap is 0, so SMuRF's < 1 % rule drops them).

Label model (explicit; coefficients in :data:`LABEL_MODEL`, copied into the manifest)::

    grade logit g = b0 + b_nuclear*nuclear + b_necrosis*necrosis + u_g,     u_g ~ N(0, sigma_u^2)
    grade ~ Bernoulli(sigmoid(g))                                        1 = high grade
    log-hazard  h = b_size*size + b_nodes*(nodes - 1) + b_necrosis*necrosis + b_nuclear*nuclear
                    + b_stroma*stroma + b_grade*grade + u_s,             u_s ~ N(0, sigma_u^2)
    T ~ Weibull proportional hazards, S(t) = exp(-(t / scale)^shape * exp(h)),
        scale chosen so that the median is ``median_months`` at h = 0
    C = min(uniform accrual follow-up, exponential loss to follow-up), independent of everything
    dfs_months = min(T, C), dfs_event = [T <= C]

Recorded ceilings, each named for what it is:

- ``latent_oracle_*``: the true linear predictors (``h`` for the C-index, ``g`` for the grade AUROC),
  unobserved terms included: no model sees ``u``, so this is an unreachable oracle;
- ``generating_variables_*``: the same without ``u``, every generating variable known exactly;
- ``observable_*_oof``: the estimate of the best reachable from what a model observes: an L2-penalised
  Cox model (:func:`~sample_data.common.cox_oof_cindex`) and an L2 logistic regression
  (:func:`~sample_data.common.logistic_oof_auroc`), out of fold over the manifest's patient folds, on
  features measured from the written files only (:func:`measure_ct` on the CT and its masks,
  :func:`measure_slide` on the slide and its annotation); for all features and per modality (``ct``,
  ``slide``), since the bundle compares radiology-only, pathology-only and fusion models.

Layout::

    <out>/manifest.json                            description, synthetic, seed, num_folds, geometry, the
                                                   ceilings above, censoring_rate, label_model, cases[]
    <out>/datastore/<case_id>.nii.gz               the CT (NIfTI descrip says SYNTHETIC)
    <out>/datastore/labels/final/<case_id>.nii.gz  both masks as one label map (1 tumor, 2 lymph node): the
                                                   study's label as MONAI Label serves it
    <out>/datastore/labels/tumor/<case_id>.nii.gz  primary tumor mask (0/1), CT grid
    <out>/datastore/labels/node/<case_id>.nii.gz   lymph node mask (0/1, may be empty), CT grid
    <out>/datastore/<case_id>_he.tiff              the slide (ImageDescription says SYNTHETIC)
    <out>/datastore/annotations/<case_id>_he.geojson  tumor outline: FeatureCollection of Polygons in
                                                   level-0 (x, y) pixels
    <out>/datastore/sidecars/<case_id>.json        case_id, patient_id, bundle, grade, grade_name, dfs_months,
                                                   dfs_event, images {"slide": "<case_id>_he"} (datastore
                                                   id), slide, slide_annotation, tumor_mask, node_mask
                                                   (paths relative to the datastore folder), label_names,
                                                   center_ijk, center_mm (primary tumor), synthetic: true

Manifest rows hold ``image``, ``tumor_mask``, ``node_mask``, ``slide``, ``slide_annotation`` (relative to
the manifest), ``grade``, ``dfs_months``, ``dfs_event``, ``fold``, ``measurements`` (``ct``, ``slide``)
and ``oracle`` (the latent traits and linear predictors: analysis only).

Usage::

    python -m sample_data.generate_opscc --out sample_data/opscc --num-cases 80 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import expit

from oncofusion.data.folds import assign_folds
from oncofusion.data.slide_regions import annotation_mask, read_geojson_polygons, tissue_mask
from oncofusion.io.slides import open_slide
from oncofusion.metrics.classification import auroc
from oncofusion.metrics.survival import concordance_index
from sample_data.common import (
    Grid,
    cox_oof_cindex,
    generator_parser,
    logistic_oof_auroc,
    render_in_processes,
    values_arg,
    write_nifti,
)
from sample_data.slides import fill_polygons, he_texture, tile_texture, write_pyramid

logger = logging.getLogger(__name__)

DEFAULT_CASES = 80
DEFAULT_CT_SHAPE = (96, 96, 48)
DEFAULT_CT_SPACING = (1.0, 1.0, 2.5)  # mm
MIN_CT_FIELD_MM = (90.0, 90.0, 60.0)  # the neck phantom and its nodes fit in a field this large
DEFAULT_SLIDE_SIZE = 2048  # level-0 pixels, square
DEFAULT_SLIDE_MPP = 0.5
MIN_SLIDE_SIZE = 256
SLIDE_LEVELS = 3
MEASURE_LEVEL = 2  # slide features are measured at this pyramid level
SMOOTHING_PX = 6.0  # level-0 pixels: the scale at which measure_slide tells epithelium from stroma
EPITHELIUM_MAX_EOSIN = 0.027  # smoothed eosin OD: the drawn stroma lies above, the epithelium below
NUCLEAR_MIN_HEMATOXYLIN = 0.04  # hematoxylin OD of a nuclear pixel
BUNDLE = "opscc_smurf"
GRADE_NAMES = {0: "low grade", 1: "high grade"}
GRADE_MEANING = "1 = high tumor grade, 0 = low grade"
LABEL_NAMES = {"tumor": 1, "lymph_node": 2}  # the final label map's values
LATENTS = ("size", "nodal", "necrosis", "nuclear", "stroma")
DESCRIPTION = (
    "SYNTHETIC oropharyngeal squamous cell carcinoma patients: neck CT with primary tumor and lymph-node "
    "masks, an H&E-like whole-slide image with a tumor annotation, tumor grade and disease-free survival "
    "(months, event); not patient data. Grade and survival come from explicit logistic and Weibull "
    "proportional-hazards models of latent traits that the images show (label_model), with independent "
    "censoring. Made by sample_data/generate_opscc.py."
)
SYNTHETIC_NOTE = "SYNTHETIC image made by sample_data/generate_opscc.py: not patient data"
CT_DESCRIPTION = "SYNTHETIC neck CT (sample_data/generate_opscc.py), not patient data"
CEILING_NOTES = {
    "latent_oracle": "C-index of the true log-hazard h and AUROC of the true grade logit g, unobserved terms u "
                     "included: an unreachable oracle, no model sees u",
    "generating_variables": "the same without u: every generating variable known exactly",
    "observable_oof": "the estimate of the best reachable from what a model observes: L2-penalised Cox model "
                      "(penalty 1, standardised) for the C-index and L2 logistic regression (C = 1, standardised) "
                      "for the grade AUROC, out of fold over these patient folds, on measure_ct of the CT and its "
                      "masks and measure_slide of the slide and its annotation; 'ct' and 'slide' use one modality",
}

# ----------------------------------------------------------------------------- label model

LABEL_MODEL: dict[str, dict[str, float]] = {
    "grade": {"b0": -0.2, "b_nuclear": 2.2, "b_necrosis": 0.8, "sigma_u": 0.6},
    "hazard": {"b_size": 0.7, "b_nodes": 0.5, "b_necrosis": 0.4, "b_nuclear": 0.45, "b_stroma": 0.6,
               "b_grade": 0.4, "sigma_u": 0.4},
    "baseline": {"weibull_shape": 1.3, "median_months": 40.0},
    "censoring": {"follow_up_min_months": 24.0, "follow_up_max_months": 84.0, "loss_per_month": 1.0 / 240.0},
}
MAX_NODES = 3


def grade_logit(latent: dict[str, np.ndarray], unobserved: np.ndarray | None = None) -> np.ndarray:
    """The grade model's ``g`` for arrays of the latent traits; ``unobserved`` is ``u_g`` (0 when None)."""
    m = LABEL_MODEL["grade"]
    g = m["b0"] + m["b_nuclear"] * np.asarray(latent["nuclear"]) + m["b_necrosis"] * np.asarray(latent["necrosis"])
    return g if unobserved is None else g + np.asarray(unobserved, float)


def log_hazard(latent: dict[str, np.ndarray], nodes: np.ndarray, grade: np.ndarray,
               unobserved: np.ndarray | None = None) -> np.ndarray:
    """The survival model's ``h`` (higher = shorter disease-free survival); ``unobserved`` is ``u_s``."""
    m = LABEL_MODEL["hazard"]
    h = (m["b_size"] * np.asarray(latent["size"]) + m["b_nodes"] * (np.asarray(nodes, float) - 1.0)
         + m["b_necrosis"] * np.asarray(latent["necrosis"]) + m["b_nuclear"] * np.asarray(latent["nuclear"])
         + m["b_stroma"] * np.asarray(latent["stroma"]) + m["b_grade"] * np.asarray(grade, float))
    return h if unobserved is None else h + np.asarray(unobserved, float)


def draw_survival(h: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Event times ``T`` (Weibull proportional hazards given ``h``), independent censoring times ``C``, and
    the observed ``dfs_months`` (0.1-month steps, at least 0.5) and ``dfs_event``."""
    base, cens = LABEL_MODEL["baseline"], LABEL_MODEL["censoring"]
    shape = base["weibull_shape"]
    scale = base["median_months"] / np.log(2.0) ** (1.0 / shape)
    n = len(h)
    t_event = scale * (-np.log(rng.random(n)) / np.exp(h)) ** (1.0 / shape)
    follow_up = rng.uniform(cens["follow_up_min_months"], cens["follow_up_max_months"], n)
    lost = rng.exponential(1.0 / cens["loss_per_month"], n)
    t_censor = np.minimum(follow_up, lost)
    observed = np.maximum(np.round(np.minimum(t_event, t_censor), 1), 0.5)
    return t_event, t_censor, observed, (t_event <= t_censor).astype(int)


# ----------------------------------------------------------------------------- appearance

#: CT numbers (HU) of the phantom; the tumor and nodes enhance after contrast
HU = {"air": -1000.0, "fat": -100.0, "muscle": 45.0, "cancellous": 280.0, "cortical": 800.0, "csf": 15.0,
      "carotid": 200.0, "jugular": 160.0, "mandible": 1000.0, "tumor": 75.0, "necrotic": 15.0,
      "node": 60.0, "node_rim": 115.0}
TUMOR_RADIUS_MM = (10.0, 0.25, (6.0, 20.0))  # median, log-sd per unit of 'size', clip
NODE_RADIUS_MM = (4.0, 2.5, 1.5)  # base + span * sigmoid(nodal) + uniform(0, extra)
NOISE_HU, BLUR_MM = 12.0, 0.7
#: slide appearance: hematoxylin depth and nuclear packing per unit of 'nuclear', stroma share range
SLIDE = {"h_per_nuclear": 0.3, "zoom_per_nuclear": -0.15, "stroma_share": (0.1, 0.85), "stroma_slope": 1.5,
         "h_jitter_sd": 0.06, "e_jitter_sd": 0.1, "tumor_scale": (0.45, 0.75), "p_tumor_fragment": 0.5}
FRAGMENTS_PROBABILITY = {1: 0.35, 2: 0.4, 3: 0.25}


@dataclass(frozen=True)
class CaseTask:
    """Everything one worker needs to render and measure one patient."""

    case_id: str
    seed: tuple[int, ...]
    ct_shape: tuple[int, int, int]
    ct_spacing: tuple[float, float, float]
    slide_size: int
    slide_mpp: float
    latent: tuple[float, ...]  # in the order of LATENTS
    nodes: int
    image_path: str
    final_path: str
    tumor_path: str
    node_path: str
    slide_path: str
    annotation_path: str

    def trait(self, name: str) -> float:
        return self.latent[LATENTS.index(name)]


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> Grid:
    """A grid centred on the world origin."""
    origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True))
    return Grid(tuple(int(n) for n in shape), tuple(float(s) for s in spacing), origin)


def _smooth_noise(shape: Sequence[int], sigma: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise smoothed by ``sigma`` voxels, rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _ellipsoid_distance(x, y, z, centre, semi) -> np.ndarray:
    return np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                   + ((z - centre[2]) / semi[2]) ** 2)


def _place_nodes(task: CaseTask, side: float, half_z: float, rng: np.random.Generator) -> list[dict]:
    """Lymph nodes in the lateral neck (levels II-III), mostly on the tumor's side, apart from each other."""
    nodal, necrosis = task.trait("nodal"), task.trait("necrosis")
    base, span, extra = NODE_RADIUS_MM
    nodes: list[dict] = []
    for _ in range(task.nodes):
        radius = base + span * float(expit(nodal)) + rng.uniform(0.0, extra)
        for _ in range(200):
            node_side = side if rng.random() < 0.8 else -side
            centre = (node_side * rng.uniform(30.0, 33.0), rng.uniform(-4.0, 10.0),
                      rng.uniform(-0.6, 0.6) * (half_z - 1.3 * radius))
            if all(np.linalg.norm(np.subtract(centre, n["centre"])) > radius + n["radius"] + 2.0 for n in nodes):
                break
        nodes.append({"centre": centre, "radius": radius, "cystic": bool(rng.random() < expit(1.2 * necrosis))})
    return nodes


def render_ct(task: CaseTask) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The CT in HU (int16), the tumor and node masks (uint8), and what was drawn (mm, world RAS)."""
    rng = np.random.default_rng([*task.seed, 0])
    grid = _grid(task.ct_shape, task.ct_spacing)
    x, y, z = grid.axes()
    half_z = (task.ct_shape[2] - 1) / 2.0 * task.ct_spacing[2]
    sigma_vox = [BLUR_MM / s for s in task.ct_spacing]
    texture = _smooth_noise(task.ct_shape, [1.5 / s for s in task.ct_spacing], rng)
    hu = np.full(task.ct_shape, HU["air"], np.float32)

    zn = z / half_z  # -1 (caudal) .. 1 (cranial)
    neck = ((x / (42.0 * rng.uniform(0.96, 1.02))) ** 2 + ((y + 2.0) / 38.0) ** 2) <= 1.0
    neck = np.broadcast_to(neck, task.ct_shape)
    hu[neck] = HU["fat"] + 8.0 * texture[neck]
    muscle = np.broadcast_to((x / 37.0) ** 2 + ((y + 2.0) / 33.0) ** 2 <= 1.0, task.ct_shape)
    hu[muscle] = HU["muscle"] + 6.0 * texture[muscle]
    airway = (x / (8.0 + 1.5 * zn)) ** 2 + ((y - 12.0) / (5.0 + 1.0 * zn)) ** 2 <= 1.0
    hu[np.broadcast_to(airway, task.ct_shape)] = HU["air"]
    body = (x / 8.5) ** 2 + ((y + 16.0) / 8.5) ** 2
    hu[np.broadcast_to(body <= 1.0, task.ct_shape)] = HU["cortical"]
    hu[np.broadcast_to(body <= 0.78, task.ct_shape)] = HU["cancellous"]
    arch = (x / 7.5) ** 2 + ((y + 29.0) / 7.0) ** 2
    hu[np.broadcast_to(arch <= 1.0, task.ct_shape)] = HU["cortical"]
    hu[np.broadcast_to(arch <= 0.4, task.ct_shape)] = HU["csf"]
    contrast = rng.uniform(0.85, 1.15)  # contrast timing: vessels vary, nothing else
    for side in (-1.0, 1.0):
        for name, (cx, cy, r) in (("carotid", (15.0, -2.0, 3.0)), ("jugular", (21.0, -5.0, 4.5))):
            vessel = (x - side * cx) ** 2 + (y - cy) ** 2 <= r**2
            hu[np.broadcast_to(vessel, task.ct_shape)] = HU[name] * contrast
    jaw = np.hypot(x, y + 6.0)
    mandible = (jaw >= 30.0) & (jaw <= 34.0) & (y > 8.0) & (zn > 0.45)
    hu[np.broadcast_to(mandible, task.ct_shape)] = HU["mandible"]

    # the primary tumor at the lateral oropharyngeal wall
    size, necrosis = task.trait("size"), task.trait("necrosis")
    median, log_sd, (low, high) = TUMOR_RADIUS_MM
    radius = float(np.clip(median * np.exp(log_sd * size), low, high))
    side = float(rng.choice([-1.0, 1.0]))
    semi = radius * rng.uniform(0.85, 1.15, 3) * np.array([1.0, 0.85, 1.2])
    centre = (side * (7.0 + 0.4 * radius), 12.0 + rng.uniform(-3.0, 3.0),
              rng.uniform(-0.25, 0.25) * max(half_z - semi[2], 0.0))
    lobes = _smooth_noise(task.ct_shape, [4.0 / s for s in task.ct_spacing], rng)
    d = _ellipsoid_distance(x, y, z, centre, semi) + 0.12 * lobes
    tumor = d <= 1.0
    core_fraction = 0.65 * float(expit(1.6 * (necrosis - 0.2)))
    heterogeneity = 8.0 + 14.0 * float(expit(necrosis))
    enhancement = HU["tumor"] + rng.uniform(-8.0, 8.0)
    hu[tumor] = enhancement + heterogeneity * texture[tumor]
    core = tumor & (d + 0.1 * texture <= core_fraction)
    hu[core] = HU["necrotic"] + 6.0 * texture[core]

    node_mask = np.zeros(task.ct_shape, bool)
    nodes = _place_nodes(task, side, half_z, rng)
    for node in nodes:
        r = node["radius"]
        dn = _ellipsoid_distance(x, y, z, node["centre"], (r, 0.85 * r, 1.3 * r)) + 0.05 * lobes
        inside = (dn <= 1.0) & ~tumor
        node_mask |= inside
        if node["cystic"]:
            hu[inside] = np.where(dn[inside] > 0.7, HU["node_rim"], HU["necrotic"]) + 6.0 * texture[inside]
        else:
            hu[inside] = HU["node"] + 6.0 * texture[inside]

    hu = ndimage.gaussian_filter(hu, sigma_vox) + rng.normal(0.0, NOISE_HU, task.ct_shape).astype(np.float32)
    ijk = np.argwhere(tumor).mean(axis=0)
    truth = {"side": "left" if side > 0 else "right", "tumor_radius_mm": round(radius, 3),
             "tumor_centre_mm": [round(float(c), 3) for c in centre], "necrotic_core_fraction": round(core_fraction, 4),
             "nodes": [{"centre_mm": [round(float(c), 3) for c in n["centre"]], "radius_mm": round(n["radius"], 3),
                        "cystic": n["cystic"]} for n in nodes],
             "center_ijk": [round(float(v), 2) for v in ijk],
             "center_mm": [round(float(v), 3) for v in grid.affine[:3, :3] @ ijk + grid.affine[:3, 3]]}
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), tumor.astype(np.uint8), node_mask.astype(np.uint8), truth


def _blob(centre: Sequence[float], radius: np.ndarray, count: int) -> np.ndarray:
    """``(count, 2)`` level-0 (x, y) vertices at ``radius`` (one per angle) around ``centre``."""
    angles = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)


def _wobble(count: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """1 + a few low harmonics of the angle, total amplitude at most ``amplitude``."""
    angles = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
    weights = rng.dirichlet(np.ones(4)) * amplitude * rng.uniform(0.5, 1.0)
    return 1.0 + sum(w * np.cos(k * angles + rng.uniform(0, 2 * np.pi)) for k, w in zip((2, 3, 4, 5), weights,
                                                                                         strict=True))


def slide_layout(size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Tissue fragments (polygons) and each one's tumor outline (None: a fragment without tumor), level-0
    (x, y) pixels. One fragment fills a central cell; two or three take cells of a 2x2 grid, kept apart."""
    count = int(rng.choice(list(FRAGMENTS_PROBABILITY), p=list(FRAGMENTS_PROBABILITY.values())))
    if count == 1:
        cells = [(size / 2.0, size / 2.0, 0.8 * size)]
    else:
        picks = rng.permutation(4)[:count]
        cells = [((0.25 + 0.5 * (p % 2)) * size, (0.25 + 0.5 * (p // 2)) * size, 0.5 * size) for p in picks]
    fragments, tumors = [], []
    low, high = SLIDE["tumor_scale"]
    for index, (cx, cy, cell) in enumerate(cells):
        centre = (cx + rng.uniform(-0.04, 0.04) * cell, cy + rng.uniform(-0.04, 0.04) * cell)
        radius = 0.38 * cell * rng.uniform(0.8, 1.0) * _wobble(96, 0.2, rng)
        fragments.append(_blob(centre, radius, 96))
        has_tumor = index == 0 or rng.random() < SLIDE["p_tumor_fragment"]
        tumor_radius = radius * rng.uniform(low, high) * _wobble(96, 0.15, rng)
        tumors.append(_blob(centre, tumor_radius, 96) if has_tumor else None)
    return fragments, tumors


def render_slide(task: CaseTask) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray | None], dict]:
    """The level-0 RGB slide (uint8), its fragments and tumor outlines, and what was drawn."""
    rng = np.random.default_rng([*task.seed, 1])
    size = task.slide_size
    fragments, tumors = slide_layout(size, rng)
    nuclear, stroma = task.trait("nuclear"), task.trait("stroma")
    h_jitter = float(np.exp(rng.normal(0.0, SLIDE["h_jitter_sd"])))
    e_jitter = float(np.exp(rng.normal(0.0, SLIDE["e_jitter_sd"])))
    h_scale = float(np.exp(SLIDE["h_per_nuclear"] * nuclear)) * h_jitter
    zoom = float(np.clip(np.exp(SLIDE["zoom_per_nuclear"] * nuclear), 0.7, 1.4))
    low, high = SLIDE["stroma_share"]
    stroma_share = low + (high - low) * float(expit(SLIDE["stroma_slope"] * stroma))
    epithelium = he_texture(hematoxylin=1.8 * h_scale, eosin=0.12 * e_jitter, eosin_floor=0.012 * e_jitter, zoom=zoom)
    fibres = he_texture(hematoxylin=0.6 * h_jitter, eosin=0.1 * e_jitter, eosin_floor=0.03 * e_jitter, stretch=3.0)
    if rng.random() < 0.5:
        fibres = np.ascontiguousarray(fibres.transpose(1, 0, 2))

    fragment_masks = [fill_polygons((size, size), [f]) for f in fragments]
    tumor_masks = [None if t is None else fill_polygons((size, size), [t]) for t in tumors]
    tissue = np.logical_or.reduce(fragment_masks)
    tumor = np.logical_or.reduce([m for m in tumor_masks if m is not None])
    coarse = max(size // 64, 4)
    mix = np.asarray(Image.fromarray(_smooth_noise((coarse, coarse), 1.2, rng)).resize((size, size), Image.BILINEAR))
    threshold = np.quantile(mix[tumor], stroma_share) if tumor.any() else np.inf
    epithelial = tumor & (mix > threshold)

    glass = np.array([244, 242, 246], np.int16) + rng.integers(-3, 4, 3)
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = np.clip(glass, 0, 255).astype(np.uint8)
    np.copyto(rgb, tile_texture(fibres, (size, size), rng), where=tissue[..., None])
    np.copyto(rgb, tile_texture(epithelium, (size, size), rng), where=epithelial[..., None])
    overlap = [0.0 if t is None else float((t & f).sum() / max(f.sum(), 1))
               for f, t in zip(fragment_masks, tumor_masks, strict=True)]
    truth = {"fragments": len(fragments), "fragment_tumor_overlap": [round(v, 4) for v in overlap],
             "hematoxylin_scale": round(h_scale, 4), "nuclear_zoom": round(zoom, 4),
             "stroma_share": round(stroma_share, 4), "stain_jitter": [round(h_jitter, 4), round(e_jitter, 4)]}
    return rgb, fragments, tumors, truth


def write_annotation(path: Path, tumors: Sequence[np.ndarray | None]) -> None:
    """The tumor outlines as a GeoJSON FeatureCollection (closed Polygon rings, level-0 (x, y) pixels)."""
    features = []
    for polygon in tumors:
        if polygon is None:
            continue
        ring = [[round(float(px), 1), round(float(py), 1)] for px, py in polygon]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}})
    path.write_text(json.dumps({"type": "FeatureCollection", "description": SYNTHETIC_NOTE, "features": features}))


# ----------------------------------------------------------------------------- what a model can measure


def measure_ct(image_path: str | Path, tumor_path: str | Path, node_path: str | Path) -> dict[str, float]:
    """Features of the written CT and masks: tumor volume and HU statistics, node count, volume and rim."""
    image = nib.load(str(image_path))
    hu = np.asarray(image.dataobj, np.float32)
    tumor = np.asarray(nib.load(str(tumor_path)).dataobj) > 0
    nodes = np.asarray(nib.load(str(node_path)).dataobj) > 0
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    _, count = ndimage.label(nodes, structure=np.ones((3, 3, 3)))
    rim = nodes & ~ndimage.binary_erosion(nodes)
    core = nodes & ~rim
    values = hu[tumor]
    return {
        "tumor_log_volume_ml": round(float(np.log(max(tumor.sum(), 1) * voxel_ml)), 4),
        "tumor_mean_hu": round(float(values.mean()), 3) if values.size else 0.0,
        "tumor_sd_hu": round(float(values.std()), 3) if values.size else 0.0,
        "tumor_low_fraction": round(float((values < 40.0).mean()), 4) if values.size else 0.0,
        "node_count": float(count),
        "node_log1p_volume_ml": round(float(np.log1p(nodes.sum() * voxel_ml)), 4),
        "node_rim_contrast_hu": round(float(hu[rim].mean() - hu[core].mean()), 3) if core.any() else 0.0,
    }


def measure_slide(slide_path: str | Path, annotation_path: str | Path, level: int = MEASURE_LEVEL) -> dict[str, float]:
    """Features of the written slide, read at pyramid ``level``: inside the tumor outline, epithelium is
    told from stroma by its weaker eosin (smoothed eosin optical density below
    :data:`EPITHELIUM_MAX_EOSIN`); then the epithelial share, the hematoxylin depth, nuclear share and fine
    texture of the epithelium, and the hematoxylin of the stroma (the slide's stain strength, to normalise
    by)."""
    from skimage.color import rgb2hed

    polygons = read_geojson_polygons(annotation_path)
    with open_slide(slide_path) as slide:
        level = min(level, slide.level_count - 1)
        width, height = slide.level_dimensions[level]
        rgb = slide.read_region((0, 0), level, (width, height))
        downsample = slide.level_downsamples[level]
    hed = rgb2hed(rgb).astype(np.float32)
    h, e = hed[..., 0], hed[..., 1]
    tissue = tissue_mask(rgb)
    inside = tissue & annotation_mask(tissue.shape, polygons, downsample)
    if not inside.any():
        inside = tissue
    sigma = SMOOTHING_PX / downsample
    epithelial = inside & (ndimage.gaussian_filter(e, sigma) < EPITHELIUM_MAX_EOSIN)
    stroma = tissue & ~epithelial
    fine = h - ndimage.gaussian_filter(h, sigma)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else 0.0

    return {
        "tumor_epithelial_fraction": round(float(epithelial.sum() / inside.sum()), 4),
        "epithelium_h_od": round(mean(h[epithelial]), 5),
        "epithelium_nuclear_fraction": round(mean(h[epithelial] > NUCLEAR_MIN_HEMATOXYLIN), 4),
        "epithelium_h_texture": round(float(fine[epithelial].std()) if epithelial.any() else 0.0, 5),
        "stroma_h_od": round(mean(h[stroma]), 5),
    }


def render_case(task: CaseTask) -> dict:
    """Render and write one patient's CT, masks, slide and annotation; measure them back from the files."""
    hu, tumor, nodes, ct_truth = render_ct(task)
    grid = _grid(task.ct_shape, task.ct_spacing)
    write_nifti(hu, grid.affine, Path(task.image_path), CT_DESCRIPTION)
    write_nifti(tumor, grid.affine, Path(task.tumor_path), "SYNTHETIC primary tumor mask")
    write_nifti(nodes, grid.affine, Path(task.node_path), "SYNTHETIC lymph node mask")
    final = np.where(tumor > 0, LABEL_NAMES["tumor"], np.where(nodes > 0, LABEL_NAMES["lymph_node"], 0))
    write_nifti(final.astype(np.uint8), grid.affine, Path(task.final_path), "SYNTHETIC 1 tumor, 2 lymph node")
    rgb, _, tumors, slide_truth = render_slide(task)
    write_pyramid(Path(task.slide_path), rgb, levels=SLIDE_LEVELS, mpp=task.slide_mpp, downsample="mean",
                  description=SYNTHETIC_NOTE)
    write_annotation(Path(task.annotation_path), tumors)
    return {"truth": {"ct": ct_truth, "slide": slide_truth},
            "measurements": {"ct": measure_ct(task.image_path, task.tumor_path, task.node_path),
                             "slide": measure_slide(task.slide_path, task.annotation_path)}}


# ----------------------------------------------------------------------------- ceilings


def ceilings(cases: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """:func:`cox_oof_cindex` and :func:`logistic_oof_auroc` on the measured features, all and per modality."""
    ct = np.array([list(c["measurements"]["ct"].values()) for c in cases], float)
    slide = np.array([list(c["measurements"]["slide"].values()) for c in cases], float)
    time_ = np.array([c["dfs_months"] for c in cases], float)
    event = np.array([c["dfs_event"] for c in cases], int)
    grade = np.array([c["grade"] for c in cases], int)
    folds = np.array([c["fold"] for c in cases])
    groups = {"all": np.hstack([ct, slide]), "ct": ct, "slide": slide}
    return {"cindex": {k: cox_oof_cindex(m, time_, event, folds) for k, m in groups.items()},
            "grade_auroc": {k: logistic_oof_auroc(m, grade, folds) for k, m in groups.items()}}


def _rounded(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


# ----------------------------------------------------------------------------- the data set


def _check_geometry(ct_shape: Sequence[int], ct_spacing: Sequence[float], slide_size: int, slide_mpp: float) -> None:
    field = [n * s for n, s in zip(ct_shape, ct_spacing, strict=True)]
    if any(f < m for f, m in zip(field, MIN_CT_FIELD_MM, strict=True)):
        raise ValueError(f"a {ct_shape} CT of {ct_spacing} mm voxels spans {[round(f) for f in field]} mm; the neck "
                         f"phantom needs at least {list(MIN_CT_FIELD_MM)} mm: raise --ct-shape or --ct-spacing")
    if slide_size < MIN_SLIDE_SIZE or slide_size % 2 ** SLIDE_LEVELS:
        raise ValueError(f"--slide-size must be a multiple of {2 ** SLIDE_LEVELS} and at least {MIN_SLIDE_SIZE}, "
                         f"got {slide_size}")
    if not slide_mpp > 0:
        raise ValueError(f"--slide-mpp must be positive, got {slide_mpp}")


def generate(out: str | Path, num_cases: int = DEFAULT_CASES, seed: int = 0, num_folds: int = 5,
             ct_shape: Sequence[int] = DEFAULT_CT_SHAPE, ct_spacing: Sequence[float] = DEFAULT_CT_SPACING,
             slide_size: int = DEFAULT_SLIDE_SIZE, slide_mpp: float = DEFAULT_SLIDE_MPP, workers: int = 1) -> dict:
    """Write ``num_cases`` synthetic patients under ``out`` and return the manifest (also written)."""
    if num_cases < 1:
        raise ValueError(f"--num-cases must be at least 1, got {num_cases}")
    _check_geometry(ct_shape, ct_spacing, slide_size, slide_mpp)
    out = Path(out)
    datastore = out / "datastore"
    for folder in ("sidecars", "annotations", "labels/final", "labels/tumor", "labels/node"):
        (datastore / folder).mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([seed, 1])
    latent = {name: rng.standard_normal(num_cases) for name in LATENTS}
    nodes = np.minimum(rng.poisson(np.exp(-0.1 + 0.6 * latent["nodal"])), MAX_NODES)
    u_grade = rng.normal(0.0, LABEL_MODEL["grade"]["sigma_u"], num_cases)
    u_surv = rng.normal(0.0, LABEL_MODEL["hazard"]["sigma_u"], num_cases)
    g = grade_logit(latent, u_grade)
    grade = (rng.random(num_cases) < expit(g)).astype(int)
    h = log_hazard(latent, nodes, grade, u_surv)
    t_event, t_censor, dfs_months, dfs_event = draw_survival(h, rng)

    ids = [f"opscc_{i:04d}" for i in range(num_cases)]
    patients = [f"SYN-OPSCC-{seed:02d}-{i:04d}" for i in range(num_cases)]
    tasks = [
        CaseTask(case_id=ids[i], seed=(seed, i, 2), ct_shape=tuple(int(v) for v in ct_shape),
                 ct_spacing=tuple(float(v) for v in ct_spacing), slide_size=int(slide_size),
                 slide_mpp=float(slide_mpp), latent=tuple(float(latent[k][i]) for k in LATENTS),
                 nodes=int(nodes[i]), image_path=str(datastore / f"{ids[i]}.nii.gz"),
                 final_path=str(datastore / "labels" / "final" / f"{ids[i]}.nii.gz"),
                 tumor_path=str(datastore / "labels" / "tumor" / f"{ids[i]}.nii.gz"),
                 node_path=str(datastore / "labels" / "node" / f"{ids[i]}.nii.gz"),
                 slide_path=str(datastore / f"{ids[i]}_he.tiff"),
                 annotation_path=str(datastore / "annotations" / f"{ids[i]}_he.geojson"))
        for i in range(num_cases)
    ]
    rendered = render_in_processes(render_case, tasks, workers)
    folds = assign_folds(patients, [f"grade{grade[i]}-event{dfs_event[i]}" for i in range(num_cases)], num_folds, seed)

    cases = []
    for i, result in enumerate(rendered):
        ct_truth = result["truth"]["ct"]
        relative = {"image": f"{ids[i]}.nii.gz", "tumor_mask": f"labels/tumor/{ids[i]}.nii.gz",
                    "node_mask": f"labels/node/{ids[i]}.nii.gz", "slide": f"{ids[i]}_he.tiff",
                    "slide_annotation": f"annotations/{ids[i]}_he.geojson"}
        targets = {"grade": int(grade[i]), "grade_name": GRADE_NAMES[int(grade[i])],
                   "dfs_months": float(dfs_months[i]), "dfs_event": int(dfs_event[i])}
        sidecar = {"case_id": ids[i], "patient_id": patients[i], "bundle": BUNDLE, **targets,
                   "grade_meaning": GRADE_MEANING, "images": {"slide": f"{ids[i]}_he"},
                   **{k: v for k, v in relative.items() if k != "image"}, "slide_mpp": float(slide_mpp),
                   "label_names": LABEL_NAMES, "center_ijk": ct_truth["center_ijk"],
                   "center_mm": ct_truth["center_mm"], "synthetic": True}
        (datastore / "sidecars" / f"{ids[i]}.json").write_text(json.dumps(sidecar, indent=2))
        cases.append({
            "case_id": ids[i], "patient_id": patients[i],
            **{k: f"datastore/{v}" for k, v in relative.items()},
            **targets, "fold": int(folds[i]),
            "center_ijk": ct_truth["center_ijk"], "center_mm": ct_truth["center_mm"],
            "measurements": result["measurements"],
            "oracle": {
                **{k: round(float(latent[k][i]), 4) for k in LATENTS}, "nodes": int(nodes[i]),
                "grade_logit": round(float(g[i]), 4), "grade_unobserved": round(float(u_grade[i]), 4),
                "log_hazard": round(float(h[i]), 4), "hazard_unobserved": round(float(u_surv[i]), 4),
                "event_months": round(float(t_event[i]), 2), "censor_months": round(float(t_censor[i]), 2),
                **result["truth"],
            },
        })

    two_grades = 0 < grade.sum() < num_cases
    reachable = ceilings(cases)
    manifest = {
        "description": DESCRIPTION, "synthetic": True, "seed": seed, "num_folds": num_folds,
        "ct_shape": [int(v) for v in ct_shape], "ct_spacing_mm": [float(v) for v in ct_spacing],
        "slide_size": int(slide_size), "slide_mpp": float(slide_mpp), "slide_levels": SLIDE_LEVELS,
        "label_names": LABEL_NAMES, "grade_names": {str(k): v for k, v in GRADE_NAMES.items()},
        "high_grade_prevalence": round(float(grade.mean()), 4),
        "censoring_rate": round(float(1.0 - dfs_event.mean()), 4),
        "latent_oracle_cindex": _rounded(concordance_index(dfs_months, h, dfs_event)) if dfs_event.any() else None,
        "generating_variables_cindex": (_rounded(concordance_index(dfs_months, h - u_surv, dfs_event))
                                        if dfs_event.any() else None),
        "observable_cox_oof_cindex": reachable["cindex"]["all"],
        "observable_cox_oof_cindex_by_modality": {k: v for k, v in reachable["cindex"].items() if k != "all"},
        "latent_oracle_grade_auroc": _rounded(auroc(grade, g)) if two_grades else None,
        "generating_variables_grade_auroc": _rounded(auroc(grade, g - u_grade)) if two_grades else None,
        "observable_logistic_oof_grade_auroc": reachable["grade_auroc"]["all"],
        "observable_logistic_oof_grade_auroc_by_modality": {k: v for k, v in reachable["grade_auroc"].items()
                                                             if k != "all"},
        "ceiling_notes": CEILING_NOTES,
        "label_model": {
            "formula": "g = b0 + b_nuclear*nuclear + b_necrosis*necrosis + u_g; grade ~ Bernoulli(sigmoid(g)); "
                       "h = b_size*size + b_nodes*(nodes - 1) + b_necrosis*necrosis + b_nuclear*nuclear "
                       "+ b_stroma*stroma + b_grade*grade + u_s; S(t | h) = exp(-(t/scale)^shape * exp(h)), "
                       "scale = median_months / ln(2)^(1/shape); C = min(Uniform(follow_up_min, follow_up_max), "
                       "Exponential(loss_per_month)); dfs_months = min(T, C), dfs_event = [T <= C]; latent traits "
                       "~ N(0, 1); nodes = min(Poisson(exp(-0.1 + 0.6*nodal)), 3)",
            **LABEL_MODEL,
            "appearance": {"hu": HU, "tumor_radius_mm": [*TUMOR_RADIUS_MM[:2], list(TUMOR_RADIUS_MM[2])],
                           "node_radius_mm": list(NODE_RADIUS_MM), "slide": SLIDE,
                           "fragments_probability": {str(k): v for k, v in FRAGMENTS_PROBABILITY.items()}},
        },
        "cases": cases,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = generator_parser(__doc__.split("\n\n")[0], "sample_data/opscc", DEFAULT_CASES)
    parser.add_argument("--ct-shape", type=values_arg(int, 3), default=DEFAULT_CT_SHAPE, help="CT voxels x,y,z")
    parser.add_argument("--ct-spacing", type=values_arg(float, 3), default=DEFAULT_CT_SPACING, help="CT voxel mm")
    parser.add_argument("--slide-size", type=int, default=DEFAULT_SLIDE_SIZE, help="slide level-0 side, pixels")
    parser.add_argument("--slide-mpp", type=float, default=DEFAULT_SLIDE_MPP, help="micrometres per level-0 pixel")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    m = generate(args.out, args.num_cases, args.seed, args.num_folds, args.ct_shape, args.ct_spacing,
                 args.slide_size, args.slide_mpp, args.workers)
    logger.info(
        "wrote %d SYNTHETIC OPSCC patients to %s in %.1fs (high grade %.2f, censored %.2f). DFS C-index: latent "
        "oracle %s (unreachable), generating variables %s, observable Cox out of fold %s (by modality %s). Grade "
        "AUROC: latent oracle %s, generating variables %s, observable logistic out of fold %s (by modality %s)",
        len(m["cases"]), args.out, time.perf_counter() - start, m["high_grade_prevalence"], m["censoring_rate"],
        m["latent_oracle_cindex"], m["generating_variables_cindex"], m["observable_cox_oof_cindex"],
        m["observable_cox_oof_cindex_by_modality"], m["latent_oracle_grade_auroc"],
        m["generating_variables_grade_auroc"], m["observable_logistic_oof_grade_auroc"],
        m["observable_logistic_oof_grade_auroc_by_modality"],
    )


if __name__ == "__main__":
    main()
