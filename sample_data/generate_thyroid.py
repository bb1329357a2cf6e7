"""Generate SYNTHETIC thyroid B-mode ultrasound frames with one nodule each, a report, and LLNM labels.

Nothing here is patient data. Each case is a longitudinal (sagittal) view of one thyroid lobe, the
cranial pole on the image left and the skin at the top (row 0): skin, subcutaneous fat, strap muscles
with fascia lines, the lobe (homogeneous, brighter than muscle) outlined by a bright capsule line, deep
muscle and the prevertebral fascia. In the lobe lies one hypoechoic nodule, its margin smooth or
irregular (spiculated), optionally with microcalcifications (bright punctate echoes) that cast
posterior acoustic shadows. Echoes are Rayleigh speckle (a complex Gaussian scatterer field blurred by
the point-spread function, its envelope log-compressed to 8 bits) with coherent specular reflectors
(capsule, fascia, calcifications). Each study is a single-frame DICOM ultrasound file calibrated by
SequenceOfUltrasoundRegions; the nodule and lobe masks are PNGs next to the manifest; the report is a
few sentences of sonographer findings. Label 1 = lateral lymph-node metastasis (LLNM), 0 = none.

Label model (explicit; coefficients in :data:`LABEL_MODEL`, copied into the manifest)::

    z = b0 + b_capsule * sigmoid((2.5 mm - d) / 0.5 mm)      d: nodule-to-capsule distance (mm) measured
        + b_irregular * irregular_margin                       by ``capsule_distance_mm`` on the true masks
        + b_microcalcification * microcalcifications
        + b_upper * [third = upper] + b_middle * [third = middle]   third: ``lobe_third`` on the true masks
        + b_central_node * central_node                        report only: suspicious level VI node
        + b_vascularity * vascularity                          report only: intranodular Doppler flow
        + b_age * (age - 45) / 10 + b_male * male
        + u,          u ~ N(0, sigma_u^2): what no input shows
    y ~ Bernoulli(sigmoid(z))

The capsule term is the paper's finding (nodules within 0.25 cm of the capsule carry > 72 % risk);
the lobe-third terms its upper/middle-lobe risk. Younger patients and men carry more risk.

What a model can observe: the frame (margin, calcifications, echogenicity, size and position are
drawn into it), the nodule and lobe masks (the capsule distance and third are measured on them), the
report (which repeats the sonographer's image findings with reader errors, see :data:`READER`, and is the
only source of the central-node and vascularity findings) and age and sex. ``u`` is seen by nothing.
Taller-than-wide shape and echogenicity are drawn and reported but carry no risk here.

Recorded AUROCs, each named for what it is:

- ``latent_oracle_auroc``: of the latent score ``z`` itself (``u`` included). The Bayes-optimal
  AUROC of the labels given everything that made them; no model can reach it;
- ``generating_variables_auroc``: of ``z - u``, the Bayes-optimal AUROC given every generating variable
  except ``u`` *exactly* (``E[sigmoid(z) | z - u]`` is monotone in ``z - u``): an upper bound for a model
  that reads margins and calcifications from the pixels without error;
- ``observable_logistic_oof_auroc``: the estimate of the best AUROC reachable from what a model
  observes: an L2 logistic regression (C = 1, standardised inputs), out of fold over the manifest's
  patient-level folds, on features computed from the written files only: the scalars
  :mod:`oncofusion.models.thyroid_llnm.morphology` measures on the DICOM frame read back by
  ``read_frame`` with the nodule mask and the lobe mask, keyword features of the report text, age and
  sex; also per group (morphology, report, demographics). On a few hundred cases it carries a sampling
  error of a few hundredths.

Layout (axes as ``read_frame`` returns the frame: ``(C, W, H)``, pixel ``(i, j)`` = (column, row))::

    <out>/manifest.json                       description, synthetic, seed, num_folds, shape (W, H),
                                              spacing_mm (x, y), the AUROCs above, label_model, cases[]
    <out>/datastore/<case_id>.dcm             the study: US Image Storage, 8-bit MONOCHROME2 (or RGB),
                                              SequenceOfUltrasoundRegions in cm, SYNTHETIC in
                                              SeriesDescription and ImageComments
    <out>/datastore/sidecars/<case_id>.json   case_id, patient_id, bundle, label, label_name, label_meaning,
                                              report, age, sex, roi [[i0, j0], [i1, j1]] (inclusive box),
                                              center_ijk [i, j], center_mm, synthetic: true
    <out>/masks/<case_id>_nodule.png          nodule mask, (rows, columns) PNG of 0/1: read_frame puts it
    <out>/masks/<case_id>_lobe.png            on the frame's (W, H) grid; the lobe outline includes the nodule

Manifest case rows add ``image``, ``nodule_mask``, ``lobe_mask`` (relative to the manifest), ``fold``,
``morphology`` (measured on the written files) and ``oracle`` (the generating variables, ``u``, ``z``;
for analysis only, never a model input). The default 200 cases take about 20 s on two cores, 17 MB.

Usage::

    python -m sample_data.generate_thyroid --out sample_data/thyroid --num-cases 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import expit

from oncofusion.contract import Roi
from oncofusion.data.folds import assign_folds
from oncofusion.io.frames import read_frame
from oncofusion.metrics.classification import auroc
from oncofusion.models.thyroid_llnm.morphology import (
    CAPSULE_RISK_MM,
    capsule_distance_mm,
    lobe_third,
    morphology_scalars,
)
from sample_data.common import generator_parser, logistic_oof_auroc, render_in_processes, values_arg
from sample_data.ultrasound import UltrasoundFile, psf, smooth_noise, write_us_dicom

logger = logging.getLogger(__name__)

#: frame size (W, H) = (columns, rows) and pixel size (x, y) in mm, as ``read_frame`` reports them
DEFAULT_SHAPE = (256, 256)
DEFAULT_SPACING = (0.2, 0.2)
LABEL_NAMES = {0: "no LLNM", 1: "LLNM"}
LABEL_MEANING = "1 = lateral lymph-node metastasis (LLNM), 0 = none"
#: the bundle these studies are for: their sidecars say so, for a datastore shared with other bundles
BUNDLE = "thyroid_llnm"
PHOTOMETRICS = ("MONOCHROME2", "RGB")
DESCRIPTION = (
    "SYNTHETIC thyroid B-mode ultrasound frames (longitudinal view, cranial on the left), one nodule each, "
    "with synthetic reports, demographics and lateral lymph-node metastasis (LLNM) labels; not patient "
    "data. Labels come from an explicit logistic model of the capsule distance, margin, microcalcifications, "
    "lobe third, report-only findings, age, sex and an unobserved term (label_model). Made by "
    "sample_data/generate_thyroid.py."
)
SYNTHETIC_NOTE = "SYNTHETIC image made by sample_data/generate_thyroid.py: not patient data"

# ----------------------------------------------------------------------------- label model

LABEL_MODEL: dict[str, float] = {
    "b0": -5.8,
    "b_capsule": 3.0,
    "capsule_mm": CAPSULE_RISK_MM,
    "capsule_softness_mm": 0.5,
    "b_irregular": 1.6,
    "b_microcalcification": 1.9,
    "b_upper": 1.0,
    "b_middle": 0.7,
    "b_central_node": 2.2,
    "b_vascularity": 1.0,
    "b_age_per_10y": -0.6,
    "age_centre": 45.0,
    "b_male": 0.8,
    "sigma_u": 0.8,
}
#: prevalence of each generating finding (drawn independently of each other)
FINDINGS = {
    "irregular_margin": 0.45,
    "microcalcifications": 0.40,
    "central_node": 0.25,
    "vascularity": 0.35,
    "taller_than_wide": 0.30,
    "capsule_contact": 0.2,
}
THIRD_PROBABILITY = {"upper": 0.3, "middle": 0.4, "lower": 0.3}
AGE_MEAN_SD_RANGE = (45.0, 13.0, (18, 85))
P_MALE = 0.25
#: how the report's writer errs on the image findings: margin flipped, calcifications missed or invented,
#: distance to the capsule judged with an error (mm), sizes measured with an error (mm)
READER = {"margin_flip": 0.12, "calcification_sensitivity": 0.85, "calcification_false_positive": 0.05,
          "capsule_sd_mm": 0.4, "size_sd_mm": 0.3}


def latent_score(variables: dict[str, np.ndarray], unobserved: np.ndarray | None = None) -> np.ndarray:
    """The label model's ``z`` (log-odds of LLNM) for arrays of generating variables (module docstring);
    ``unobserved`` is ``u`` (0 when None). ``variables``: ``capsule_distance_mm``, ``irregular_margin``,
    ``microcalcifications``, ``third`` (strings), ``central_node``, ``vascularity``, ``age``, ``male``."""
    m = LABEL_MODEL
    distance = np.asarray(variables["capsule_distance_mm"], float)
    third = np.asarray(variables["third"])
    z = (
        m["b0"]
        + m["b_capsule"] * expit((m["capsule_mm"] - distance) / m["capsule_softness_mm"])
        + m["b_irregular"] * np.asarray(variables["irregular_margin"], float)
        + m["b_microcalcification"] * np.asarray(variables["microcalcifications"], float)
        + m["b_upper"] * (third == "upper")
        + m["b_middle"] * (third == "middle")
        + m["b_central_node"] * np.asarray(variables["central_node"], float)
        + m["b_vascularity"] * np.asarray(variables["vascularity"], float)
        + m["b_age_per_10y"] * (np.asarray(variables["age"], float) - m["age_centre"]) / 10.0
        + m["b_male"] * np.asarray(variables["male"], float)
    )
    return z if unobserved is None else z + np.asarray(unobserved, float)


# ----------------------------------------------------------------------------- appearance (mm, amplitudes)

#: echo amplitudes relative to the thyroid parenchyma (1.0); grey = THYROID_GREY + dB * 255 / DYNAMIC_RANGE_DB
ECHO = {"skin": 1.8, "fat": 0.7, "muscle": 0.45, "deep_muscle": 0.5, "deep": 0.25, "thyroid": 1.0}
NODULE_ECHO = (0.18, 0.6)  # hypoechoic; below ECHO["muscle"] the report says "markedly hypoechoic"
SPECULAR = {"capsule": (3.0, 4.5), "fascia": (1.2, 2.0), "calcification": (4.0, 7.0)}
SHADOW_DEPTH = (0.35, 0.6)  # fraction of the amplitude a calcification removes below it
THYROID_GREY = (115.0, 145.0)
DYNAMIC_RANGE_DB = (50.0, 60.0)
ATTENUATION_DB_PER_MM = (0.0, 0.25)  # what time-gain compensation leaves
PSF_SIGMA_MM = (0.12, 0.25)  # axial (y), lateral (x)
SKIN_MM, FAT_MM, STRAP_MM = (1.2, 1.8), (1.5, 3.0), (3.5, 6.0)
LOBE_SEMI_MM = ((19.0, 23.0), (7.5, 10.0))  # half length, half thickness
LOBE_TILT_RAD = 0.12
NODULE_HALF_WIDTH_MM = (2.0, 4.5)
NODULE_MAX_DEPTH_SHARE = 0.4  # of the lobe's half thickness where the nodule lies
GAP_MIN_MM, GAP_SKEW = 0.3, 0.5  # a nodule not in contact keeps at least this gap; < 1 favours larger gaps
ASPECT = {"taller": (1.08, 1.4), "wider": (0.6, 0.92)}
CALCIFICATIONS = (4, 12)
CALCIFICATION_RADIUS_MM = (0.15, 0.3)


@dataclass(frozen=True)
class CaseTask:
    """Everything one worker needs to render one case: the design drawn in the main process."""

    case_id: str
    patient_id: str
    seed: tuple[int, ...]
    shape: tuple[int, int]  # (W, H)
    spacing: tuple[float, float]  # (x, y) mm
    photometric: str
    third: str
    irregular_margin: bool
    microcalcifications: bool
    taller_than_wide: bool
    capsule_contact: bool
    age: int
    male: bool
    side: str
    image_path: str
    nodule_path: str
    lobe_path: str


def _blob(x: np.ndarray, y: np.ndarray, centre: Sequence[float], semi: Sequence[float], tilt: float,
          harmonics: Sequence[tuple[int, float, float]] = (),
          spikes: Sequence[tuple[float, float, float]] = ()) -> np.ndarray:
    """Normalised radius of a perturbed, tilted ellipse (< 1 inside): the point's distance from the centre
    over the boundary's at that angle. ``harmonics``: (order, amplitude, phase) of the radius;
    ``spikes``: (angle, angular width, height) of narrow radial spicules."""
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = -dx * np.sin(tilt) + dy * np.cos(tilt)
    theta = np.arctan2(v, u)
    rho = np.hypot(u, v)
    a, b = semi
    radius = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
    scale = np.ones_like(theta)
    for order, amplitude, phase in harmonics:
        scale = scale + amplitude * np.cos(order * theta + phase)
    for angle, width, height in spikes:
        delta = np.mod(theta - angle + np.pi, 2.0 * np.pi) - np.pi
        scale = scale + height * np.exp(-0.5 * (delta / width) ** 2)
    return rho / (radius * scale)


def _layout(task: CaseTask, rng: np.random.Generator) -> dict:
    """The geometry in mm: tissue depths, the lobe, and the nodule's shape and where along the lobe it lies
    (its depth is set by :func:`_place_nodule`)."""
    width_mm = task.shape[0] * task.spacing[0]
    skin = rng.uniform(*SKIN_MM)
    fat = skin + rng.uniform(*FAT_MM)
    lobe_top = fat + rng.uniform(*STRAP_MM)
    half_length = min(rng.uniform(*LOBE_SEMI_MM[0]), 0.45 * width_mm)
    half_thickness = rng.uniform(*LOBE_SEMI_MM[1])
    lobe_centre = (width_mm / 2.0 + rng.uniform(-0.04, 0.04) * width_mm, lobe_top + half_thickness)
    lobe_tilt = rng.uniform(-LOBE_TILT_RAD, LOBE_TILT_RAD)
    lobe_harmonics = [(2, rng.uniform(-0.03, 0.03), rng.uniform(0, 2 * np.pi)),
                      (3, rng.uniform(-0.02, 0.02), rng.uniform(0, 2 * np.pi))]

    # along the lobe (u, cranial pole at -half_length), inside the chosen third
    third = ("upper", "middle", "lower").index(task.third)
    fraction = float(np.clip(rng.uniform(third / 3.0 + 0.07, (third + 1) / 3.0 - 0.07), 0.2, 0.8))
    u = (2.0 * fraction - 1.0) * half_length
    local_half = half_thickness * np.sqrt(max(1.0 - (u / half_length) ** 2, 0.05))
    half_width = rng.uniform(*NODULE_HALF_WIDTH_MM)
    aspect = rng.uniform(*ASPECT["taller" if task.taller_than_wide else "wider"])
    half_depth = min(half_width * aspect, NODULE_MAX_DEPTH_SHARE * local_half)
    if task.irregular_margin:
        harmonics = [(k, rng.uniform(0.03, 0.09), rng.uniform(0, 2 * np.pi)) for k in range(3, 8)]
        spikes = [(rng.uniform(-np.pi, np.pi), rng.uniform(0.05, 0.11), rng.uniform(0.15, 0.4))
                  for _ in range(rng.integers(5, 11))]
    else:
        harmonics = [(k, rng.uniform(0.0, 0.04), rng.uniform(0, 2 * np.pi)) for k in (2, 3)]
        spikes = []
    return {
        "skin": skin, "fat": fat, "lobe_top": lobe_top,
        "lobe": (lobe_centre, (half_length, half_thickness), lobe_tilt, lobe_harmonics),
        "nodule_u": u,
        "nodule_side": -1.0 if rng.random() < 0.5 else 1.0,  # towards the anterior (-) or posterior capsule
        "nodule_shape": ((half_width, half_depth), rng.uniform(-0.1, 0.1), harmonics, spikes),
        "capsule_share": rng.random(),  # where between contact and the farthest fit the gap lies
        "bulge_mm": rng.uniform(0.0, 1.0),  # how far a nodule in contact pushes through the capsule
        "prevertebral": 2.0 * half_thickness + lobe_top + rng.uniform(4.0, 8.0),
        "fascia": sorted(rng.uniform(fat + 0.5, lobe_top - 0.5, size=2)),
    }


def _place_nodule(layout: dict, contact: bool, in_lobe: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The nodule's centre pixel (row, column): on the lobe's short axis through ``nodule_u``, between the
    lobe's centre line and (past) the capsule, where its gap to the capsule is closest to its target.

    The gap of each candidate is the distance-transform estimate (lobe depth of the nodule's shallowest
    pixel less a pixel); the target is 0 pushed ``bulge_mm`` further out for a nodule in contact, else
    ``GAP_MIN_MM`` + (largest gap - ``GAP_MIN_MM``) * ``capsule_share ** GAP_SKEW``, the largest gap being the
    one on the lobe's centre line.
    """
    sx, sy = spacing
    (lobe_centre, _, lobe_tilt, _), u = layout["lobe"], layout["nodule_u"]
    semi, tilt, harmonics, spikes = layout["nodule_shape"]
    reach = 1.7 * max(semi) + 1.0
    lr, lc = np.meshgrid(np.arange(-int(reach / sy), int(reach / sy) + 1),
                         np.arange(-int(reach / sx), int(reach / sx) + 1), indexing="ij")
    inside = _blob(lc * sx, lr * sy, (0.0, 0.0), semi, tilt, harmonics, spikes) < 1.0
    offsets = np.argwhere(inside) + np.array([lr.min(), lc.min()])
    depth = ndimage.distance_transform_edt(in_lobe, sampling=(sy, sx))
    cos, sin = np.cos(lobe_tilt), np.sin(lobe_tilt)
    step = 0.5 * min(sx, sy)
    candidates, gaps = [], []
    for v in np.arange(0.0, 2.0 * LOBE_SEMI_MM[1][1], step) * layout["nodule_side"]:
        centre = np.rint(np.array([(lobe_centre[1] + u * sin + v * cos) / sy,
                                   (lobe_centre[0] + u * cos - v * sin) / sx])).astype(int)
        pixels = offsets + centre
        if np.any(pixels < 0) or np.any(pixels >= np.asarray(in_lobe.shape)):
            break
        candidates.append(centre)
        gaps.append(max(float(depth[pixels[:, 0], pixels[:, 1]].min()) - min(sx, sy), 0.0))
    gaps_arr = np.asarray(gaps)
    if contact or gaps_arr[0] <= GAP_MIN_MM:
        first = int(np.argmax(gaps_arr <= 0.0))  # the first candidate touching the capsule, then beyond
        travelled = np.arange(len(gaps_arr)) * step
        index = int(np.argmin(np.abs(travelled - travelled[first] - layout["bulge_mm"])))
    else:
        target = GAP_MIN_MM + (gaps_arr[0] - GAP_MIN_MM) * layout["capsule_share"] ** GAP_SKEW
        index = int(np.argmin(np.abs(gaps_arr - target)))
    return candidates[index]


def render(task: CaseTask) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The 8-bit frame, the nodule mask and the lobe mask, all (rows, columns), and the design's extras."""
    rng = np.random.default_rng(list(task.seed))
    width, height = task.shape
    sx, sy = task.spacing
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    x, y = cols * sx, rows * sy
    layout = _layout(task, rng)
    lobe_centre, lobe_semi, lobe_tilt, lobe_harmonics = layout["lobe"]
    lobe_rho = _blob(x, y, lobe_centre, lobe_semi, lobe_tilt, lobe_harmonics)
    in_lobe = lobe_rho < 1.0
    centre = _place_nodule(layout, task.capsule_contact, in_lobe, task.spacing)
    nodule_centre = (centre[1] * sx, centre[0] * sy)
    nodule_rho = _blob(x, y, nodule_centre, *layout["nodule_shape"])
    in_nodule = nodule_rho < 1.0
    layout["nodule"] = (nodule_centre, *layout["nodule_shape"])

    # echo amplitude of each tissue
    amp = np.full(x.shape, ECHO["muscle"])
    amp[y < layout["fat"]] = ECHO["fat"]
    amp[y < layout["skin"]] = ECHO["skin"]
    amp *= 1.0 + 0.25 * (np.sin(2 * np.pi * (y + 0.3 * smooth_noise(x.shape, 6, rng)) / 1.1) > 0.7)
    deep = y > layout["lobe_top"]
    amp[deep & ~in_lobe] = ECHO["deep_muscle"]
    amp[y > layout["prevertebral"] + 1.0] = ECHO["deep"]
    texture = 1.0 + 0.12 * smooth_noise(x.shape, (1.0 / sy, 1.0 / sx), rng)
    amp = np.where(in_lobe, ECHO["thyroid"] * texture, amp)
    echo = rng.uniform(*NODULE_ECHO)
    edge_mm = 0.5 if task.irregular_margin else 0.25
    mean_radius = float(np.mean(layout["nodule"][1]))
    weight = np.clip((1.0 - nodule_rho) * mean_radius / edge_mm + 0.5, 0.0, 1.0)
    nodule_amp = echo * (1.0 + 0.1 * smooth_noise(x.shape, (0.6 / sy, 0.6 / sx), rng))
    amp = weight * nodule_amp + (1.0 - weight) * amp

    # Rayleigh speckle: complex scatterers weighted by the amplitude, blurred by the point-spread function
    sigma_px = (PSF_SIGMA_MM[0] / sy, PSF_SIGMA_MM[1] / sx)
    impulse = np.zeros((33, 33))
    impulse[16, 16] = 1.0
    norm = np.sqrt((psf(impulse, sigma_px) ** 2).sum())
    scatter = amp * (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape)) / np.sqrt(2.0)
    field = (psf(scatter.real, sigma_px) + 1j * psf(scatter.imag, sigma_px)) / norm

    # specular reflectors: the capsule (brightest where it faces the beam), fascia lines, calcifications
    outside = ndimage.distance_transform_edt(~in_lobe, sampling=(sy, sx))
    inside = ndimage.distance_transform_edt(in_lobe, sampling=(sy, sx))
    to_boundary = np.where(in_lobe, inside, outside)  # mm from the lobe's edge, either side
    capsule = np.clip(1.0 - to_boundary / 0.3, 0.0, 1.0) * (weight < 0.5)
    gy, gx = np.gradient(ndimage.gaussian_filter(in_lobe.astype(float), 2.0))
    facing = np.abs(gy) / np.maximum(np.hypot(gx, gy), 1e-9)
    specular = rng.uniform(*SPECULAR["capsule"]) * capsule * (0.3 + 0.7 * facing)
    for depth in layout["fascia"]:
        wavy = depth + 0.4 * np.sin(2 * np.pi * x / rng.uniform(15, 30) + rng.uniform(0, 2 * np.pi))
        line = np.clip(1.0 - np.abs(y - wavy) / 0.2, 0.0, 1.0) * (y < layout["lobe_top"])
        specular = specular + rng.uniform(*SPECULAR["fascia"]) * line
    wavy = layout["prevertebral"] + 0.5 * np.sin(2 * np.pi * x / rng.uniform(20, 40))
    specular = specular + rng.uniform(*SPECULAR["fascia"]) * np.clip(1.0 - np.abs(y - wavy) / 0.3, 0.0, 1.0)
    shadow = np.zeros(x.shape)  # the largest share of the amplitude any calcification removes
    dots = []
    if task.microcalcifications:
        candidates = np.argwhere(nodule_rho < 0.75)
        for _ in range(rng.integers(CALCIFICATIONS[0], CALCIFICATIONS[1] + 1)):
            r, c = candidates[rng.integers(len(candidates))]
            radius = rng.uniform(*CALCIFICATION_RADIUS_MM)
            cx, cy = c * sx, r * sy
            dot = np.clip(1.0 - (np.hypot(x - cx, y - cy) - radius) / 0.1, 0.0, 1.0)
            specular = specular + rng.uniform(*SPECULAR["calcification"]) * dot
            beam = np.exp(-0.5 * ((x - cx) / (radius + 0.15)) ** 2) * (y > cy + radius)
            np.maximum(shadow, rng.uniform(*SHADOW_DEPTH) * beam, out=shadow)
            dots.append([round(float(cx), 2), round(float(cy), 2)])
    field = field + psf(specular, sigma_px) * np.exp(1j * 0.3 * rng.standard_normal(x.shape))
    field *= (1.0 - shadow) * 10.0 ** (-rng.uniform(*ATTENUATION_DB_PER_MM) * y / 20.0)

    # envelope, log compression to 8 bits: the parenchyma's mean envelope sits at THYROID_GREY
    envelope = np.abs(field)
    db = 20.0 * np.log10(np.maximum(envelope, 1e-6) / (np.sqrt(np.pi) / 2.0))
    grey = rng.uniform(*THYROID_GREY) + db * 255.0 / rng.uniform(*DYNAMIC_RANGE_DB)
    pixels = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    lobe_mask = in_lobe | in_nodule  # the gland as a sonographer outlines it, the nodule included
    return pixels, in_nodule, lobe_mask, {"nodule_echo": round(float(echo), 4), "calcification_mm": dots}


# ----------------------------------------------------------------------------- files


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    """A (rows, columns) mask as an 8-bit PNG of 0/1 (label value 1 = the region)."""
    Image.fromarray(mask.astype(np.uint8)).save(path)


def render_case(task: CaseTask) -> dict:
    """Render and write one case, read the frame back as a model would, and measure it.

    Returns the truth on the masks (``capsule_distance_mm``, ``third``), the box and centre in the
    reader's pixel indices ``(i, j)`` = (column, row), and the morphology measured on the written frame.
    """
    pixels, nodule, lobe, extras = render(task)
    grey_or_rgb = np.repeat(pixels[..., None], 3, axis=-1) if task.photometric == "RGB" else pixels
    write_us_dicom(Path(task.image_path), grey_or_rgb, task.spacing, UltrasoundFile(
        uid_source=("oncofusion-synthetic-thyroid", task.case_id, repr(task.seed)), patient_id=task.patient_id,
        male=task.male, age=task.age, study_id=task.case_id[-8:], study_description="SYNTHETIC thyroid ultrasound",
        series_description="SYNTHETIC thyroid B-mode, not patient data", body_part="THYROID", comments=SYNTHETIC_NOTE,
        laterality="R" if task.side == "right" else "L"))
    write_mask_png(Path(task.nodule_path), nodule)
    write_mask_png(Path(task.lobe_path), lobe)
    nodule_wh, lobe_wh = nodule.T, lobe.T  # (W, H): the reader's axes
    truth_distance = capsule_distance_mm(nodule_wh, lobe_wh, task.spacing)
    truth_third = lobe_third(nodule_wh, lobe_wh, task.spacing)
    frame = read_frame(task.image_path)
    spacing = tuple(float(v) for v in np.diag(frame.affine.numpy())[:2])
    read_nodule = read_frame(task.nodule_path, what="nodule mask")[0].numpy() > 0
    read_lobe = read_frame(task.lobe_path, what="lobe mask")[0].numpy() > 0
    morphology = morphology_scalars(frame, Roi(mask=read_nodule), spacing, read_lobe)
    idx = np.argwhere(nodule_wh)
    centre = np.rint(idx.mean(axis=0)).astype(int)
    return {
        "capsule_distance_mm": round(truth_distance, 4),
        "third": truth_third,
        "roi": [[int(v) for v in idx.min(axis=0)], [int(v) for v in idx.max(axis=0)]],
        "center_ijk": [int(v) for v in centre],
        "center_mm": [round(float(c * s), 3) for c, s in zip(centre, task.spacing, strict=True)],
        "morphology": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in morphology.items()},
        **extras,
    }


# ----------------------------------------------------------------------------- the report

_ECHO_WORDS = {True: "markedly hypoechoic", False: "hypoechoic"}
_PHRASES = {
    "margin": {True: ("The margin is irregular and spiculated.", "Margins are ill-defined with spiculation."),
               False: ("The margin is smooth and well defined.", "Margins are smooth and circumscribed.")},
    "calcification": {True: ("Punctate echogenic foci consistent with microcalcifications are present.",
                             "Microcalcifications are seen within the nodule."),
                      False: ("No microcalcifications.", "No echogenic foci are seen.")},
    "shape": {True: ("The nodule is taller-than-wide.", "Taller-than-wide shape."),
              False: ("The nodule is not taller-than-wide.", "Wider-than-tall shape.")},
    "capsule": {True: ("The nodule abuts the thyroid capsule.", "The nodule lies within 2.5 mm of the capsule."),
                False: ("A rim of normal thyroid tissue separates the nodule from the capsule.",
                        "No capsular contact.")},
    "vascularity": {True: ("Colour Doppler shows increased intranodular vascularity.",
                           "Internal vascularity is increased on Doppler."),
                    False: ("No internal vascularity on colour Doppler.", "Doppler shows peripheral flow only.")},
    "central_node": {True: ("A suspicious lymph node is seen in the central compartment (level VI).",
                            "Suspicious central compartment lymph node noted."),
                     False: ("No suspicious central compartment lymph nodes.",
                             "Central compartment: no suspicious nodes.")},
}
#: report keyword features: the phrases whose presence sets each feature (what a text model could read)
REPORT_KEYWORDS = {
    "irregular_margin": ("irregular", "spiculat"),
    "microcalcifications": ("consistent with microcalcifications", "microcalcifications are seen"),
    "taller_than_wide": ("is taller-than-wide", "taller-than-wide shape"),
    "capsule_contact": ("abuts the thyroid capsule", "within 2.5 mm of the capsule"),
    "vascularity": ("increased intranodular", "vascularity is increased"),
    "central_node": ("suspicious lymph node is seen", "suspicious central compartment lymph node noted"),
    "markedly_hypoechoic": ("markedly hypoechoic",),
    "upper_third": ("upper third",),
    "middle_third": ("middle third",),
}


def build_report(findings: dict, rng: np.random.Generator) -> str:
    """Sonographer findings as a few sentences: location first, the other findings in random order and
    phrasing. ``findings``: side, third, width_mm, depth_mm, markedly_hypoechoic, irregular_margin,
    microcalcifications, taller_than_wide, capsule_contact, vascularity, central_node (as reported)."""
    size = f"{findings['width_mm']:.1f} x {findings['depth_mm']:.1f} mm"
    echo = _ECHO_WORDS[bool(findings["markedly_hypoechoic"])]
    if rng.random() < 0.5:
        location = (f"{findings['side'].capitalize()} thyroid lobe, {findings['third']} third: a solid {echo} "
                    f"nodule measuring {size} (width x depth).")
    else:
        location = (f"A solid {echo} nodule of {size} (width x depth) in the {findings['third']} third of the "
                    f"{findings['side']} lobe.")
    keys = {"margin": "irregular_margin", "calcification": "microcalcifications", "shape": "taller_than_wide",
            "capsule": "capsule_contact", "vascularity": "vascularity", "central_node": "central_node"}
    sentences = [_PHRASES[p][bool(findings[k])][rng.integers(2)] for p, k in keys.items()]
    order = rng.permutation(len(sentences))
    return " ".join([location, *(sentences[i] for i in order)])


def report_features(report: str) -> dict[str, float]:
    """Keyword features of a report: one 0/1 per :data:`REPORT_KEYWORDS` entry and the largest size in mm."""
    text = report.lower()
    features = {name: float(any(k in text for k in keys)) for name, keys in REPORT_KEYWORDS.items()}
    size = re.search(r"(\d+(?:\.\d+)?) x (\d+(?:\.\d+)?) mm", text)
    features["size_mm"] = max(float(size.group(1)), float(size.group(2))) if size else 0.0
    return features


# ----------------------------------------------------------------------------- the observable ceiling

MORPHOLOGY_FEATURES = ("width_mm", "depth_mm", "aspect_ratio", "echogenicity_contrast", "capsule_distance_mm",
                       "capsule_within_2_5_mm", "lobe_position", "upper_third", "middle_third")
DEMOGRAPHIC_FEATURES = ("age", "male")


def observable_features(case: dict) -> dict[str, dict[str, float]]:
    """The features a model can compute from one case's files, by group: ``morphology`` (measured on the
    frame read back with the nodule and lobe masks), ``report`` (keywords), ``demographics``."""
    m = case["morphology"]
    morphology = {k: float(m[k]) for k in MORPHOLOGY_FEATURES if k not in ("upper_third", "middle_third")}
    morphology["upper_third"] = float(m["lobe_third"] == "upper")
    morphology["middle_third"] = float(m["lobe_third"] == "middle")
    return {
        "morphology": morphology,
        "report": report_features(case["report"]),
        "demographics": {"age": float(case["age"]), "male": float(case["sex"] == "male")},
    }


def observable_aurocs(cases: Sequence[dict]) -> dict[str, float | None]:
    """:func:`logistic_oof_auroc` on every observable feature and on each group alone."""
    per_case = [observable_features(c) for c in cases]
    labels = np.array([c["label"] for c in cases])
    folds = np.array([c["fold"] for c in cases])
    groups = {"all": ("morphology", "report", "demographics"), "morphology": ("morphology",),
              "report": ("report",), "demographics": ("demographics",)}
    out = {}
    for name, members in groups.items():
        matrix = np.array([[v for g in members for v in f[g].values()] for f in per_case], dtype=float)
        out[name] = logistic_oof_auroc(matrix, labels, folds)
    return out


# ----------------------------------------------------------------------------- the data set


def _design(rng: np.random.Generator, num: int) -> dict[str, np.ndarray]:
    """The per-case design drawn before rendering: findings, third, demographics, lobe side."""
    design = {name: rng.random(num) < p for name, p in FINDINGS.items()}
    design["third"] = rng.choice(list(THIRD_PROBABILITY), size=num, p=list(THIRD_PROBABILITY.values()))
    mean, sd, (low, high) = AGE_MEAN_SD_RANGE
    design["age"] = np.clip(np.rint(rng.normal(mean, sd, num)), low, high).astype(int)
    design["male"] = rng.random(num) < P_MALE
    design["side"] = rng.choice(["right", "left"], size=num)
    return design


def _reported(design: dict, index: int, geometry: dict, rng: np.random.Generator) -> dict:
    """What the report says about case ``index``: the image findings through the reader's errors."""
    irregular = bool(design["irregular_margin"][index]) ^ bool(rng.random() < READER["margin_flip"])
    calcified = bool(design["microcalcifications"][index])
    seen = rng.random() < (READER["calcification_sensitivity"] if calcified else READER["calcification_false_positive"])
    judged = geometry["capsule_distance_mm"] + rng.normal(0.0, READER["capsule_sd_mm"])
    morphology = geometry["morphology"]
    return {
        "side": str(design["side"][index]),
        "third": geometry["third"],
        "width_mm": max(morphology["width_mm"] + rng.normal(0.0, READER["size_sd_mm"]), 1.0),
        "depth_mm": max(morphology["depth_mm"] + rng.normal(0.0, READER["size_sd_mm"]), 1.0),
        "markedly_hypoechoic": geometry["nodule_echo"] < ECHO["muscle"],
        "irregular_margin": irregular,
        "microcalcifications": bool(seen),
        "taller_than_wide": bool(morphology["taller_than_wide"]),
        "capsule_contact": bool(judged <= CAPSULE_RISK_MM),
        "vascularity": bool(design["vascularity"][index]),
        "central_node": bool(design["central_node"][index]),
    }


def generate(
    out: str | Path,
    num_cases: int = 200,
    seed: int = 0,
    num_folds: int = 5,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    photometric: str = "MONOCHROME2",
    workers: int = 1,
) -> dict:
    """Write ``num_cases`` synthetic cases under ``out`` and return the manifest (also written).

    ``shape`` is (W, H) = (columns, rows) and ``spacing`` (x, y) mm, as ``read_frame`` reports them.
    """
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    out = Path(out)
    datastore, masks = out / "datastore", out / "masks"
    (datastore / "sidecars").mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    design = _design(rng, num_cases)
    unobserved = rng.normal(0.0, LABEL_MODEL["sigma_u"], num_cases)
    label_draws = rng.random(num_cases)
    ids = [f"thyroid_{i:04d}" for i in range(num_cases)]
    patients = [f"SYN-THY-{seed:02d}-{i:04d}" for i in range(num_cases)]
    tasks = [
        CaseTask(
            case_id=ids[i], patient_id=patients[i], seed=(seed, i, 2), shape=(int(shape[0]), int(shape[1])),
            spacing=(float(spacing[0]), float(spacing[1])), photometric=photometric,
            third=str(design["third"][i]), irregular_margin=bool(design["irregular_margin"][i]),
            microcalcifications=bool(design["microcalcifications"][i]),
            taller_than_wide=bool(design["taller_than_wide"][i]),
            capsule_contact=bool(design["capsule_contact"][i]), age=int(design["age"][i]),
            male=bool(design["male"][i]), side=str(design["side"][i]),
            image_path=str(datastore / f"{ids[i]}.dcm"), nodule_path=str(masks / f"{ids[i]}_nodule.png"),
            lobe_path=str(masks / f"{ids[i]}_lobe.png"),
        )
        for i in range(num_cases)
    ]
    geometries = render_in_processes(render_case, tasks, workers)

    # the label, from the geometry measured on the true masks
    variables = {
        "capsule_distance_mm": np.array([g["capsule_distance_mm"] for g in geometries]),
        "third": np.array([g["third"] for g in geometries]),
        **{k: design[k] for k in ("irregular_margin", "microcalcifications", "central_node", "vascularity",
                                  "age", "male")},
    }
    observable_part = latent_score(variables)
    z = observable_part + unobserved
    labels = (label_draws < expit(z)).astype(int)
    folds = assign_folds(patients, [int(v) for v in labels], num_folds, seed)

    report_rng = np.random.default_rng([seed, 3])
    cases = []
    for i, (task, geometry) in enumerate(zip(tasks, geometries, strict=True)):
        label = int(labels[i])
        report = build_report(_reported(design, i, geometry, report_rng), report_rng)
        sidecar = {
            "case_id": task.case_id,
            "patient_id": task.patient_id,
            "bundle": BUNDLE,  # this bundle's study in a datastore shared with other bundles' (make demo)
            "label": label,
            "label_name": LABEL_NAMES[label],
            "label_meaning": LABEL_MEANING,
            "report": report,
            "age": task.age,
            "sex": "male" if task.male else "female",
            "roi": geometry["roi"],
            "center_ijk": geometry["center_ijk"],
            "center_mm": geometry["center_mm"],
            "synthetic": True,
        }
        (datastore / "sidecars" / f"{task.case_id}.json").write_text(json.dumps(sidecar, indent=2))
        row = {k: v for k, v in sidecar.items() if k not in ("label_meaning", "synthetic", "bundle")}
        row.update({
            "image": f"datastore/{task.case_id}.dcm",
            "nodule_mask": f"masks/{task.case_id}_nodule.png",
            "lobe_mask": f"masks/{task.case_id}_lobe.png",
            "fold": int(folds[i]),
            "morphology": geometry["morphology"],
            "oracle": {
                "latent_score": round(float(z[i]), 4),
                "probability": round(float(expit(z[i])), 4),
                "unobserved": round(float(unobserved[i]), 4),
                "capsule_distance_mm": geometry["capsule_distance_mm"],
                "third": geometry["third"],
                "irregular_margin": bool(design["irregular_margin"][i]),
                "microcalcifications": bool(design["microcalcifications"][i]),
                "central_node": bool(design["central_node"][i]),
                "vascularity": bool(design["vascularity"][i]),
                "nodule_echo": geometry["nodule_echo"],
                "calcification_mm": geometry["calcification_mm"],
            },
        })
        cases.append(row)

    two_classes = 0 < labels.sum() < labels.size
    observable = observable_aurocs(cases)
    manifest = {
        "description": DESCRIPTION,
        "synthetic": True,
        "seed": seed,
        "num_folds": num_folds,
        "shape": [int(v) for v in shape],
        "shape_axes": "(W, H) = (columns, rows), as read_frame returns the frame",
        "spacing_mm": [float(v) for v in spacing],
        "view": "longitudinal thyroid lobe, cranial pole on the image left, skin at the top",
        "photometric": photometric,
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        "prevalence": round(float(labels.mean()), 4),
        "latent_oracle_auroc": round(auroc(labels, z), 4) if two_classes else None,
        "generating_variables_auroc": round(auroc(labels, observable_part), 4) if two_classes else None,
        "observable_logistic_oof_auroc": observable["all"],
        "observable_logistic_oof_auroc_by_group": {k: v for k, v in observable.items() if k != "all"},
        "auroc_notes": {
            "latent_oracle_auroc": "AUROC of the latent score z (unobserved term included) on these cases: the "
                                   "Bayes bound of the labels given everything that made them; no model sees u",
            "generating_variables_auroc": "AUROC of z - u: every generating variable known exactly, as a model "
                                          "reading margins and calcifications from the pixels without error could",
            "observable_logistic_oof_auroc": "the estimate of the best AUROC reachable from what a model observes: "
                                             "L2 logistic regression (C = 1, standardised), out of fold over these "
                                             "folds, on the morphology scalars measured on the written frame with "
                                             "the nodule and lobe masks, report keywords, age and sex",
        },
        "label_model": {
            "formula": "z = b0 + b_capsule*sigmoid((capsule_mm - d)/capsule_softness_mm) + b_irregular*irregular "
                       "+ b_microcalcification*microcalcifications + b_upper*[upper] + b_middle*[middle] "
                       "+ b_central_node*central_node + b_vascularity*vascularity "
                       "+ b_age_per_10y*(age - age_centre)/10 + b_male*male + u, u ~ N(0, sigma_u^2); "
                       "y ~ Bernoulli(sigmoid(z))",
            "coefficients": LABEL_MODEL,
            "finding_prevalence": FINDINGS,
            "third_probability": THIRD_PROBABILITY,
            "age_mean_sd_range": [AGE_MEAN_SD_RANGE[0], AGE_MEAN_SD_RANGE[1], list(AGE_MEAN_SD_RANGE[2])],
            "p_male": P_MALE,
            "reader": READER,
        },
        "cases": cases,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = generator_parser(__doc__.split("\n\n")[0], "sample_data/thyroid", 200)
    parser.add_argument("--shape", type=values_arg(int, 2), default=DEFAULT_SHAPE,
                        help="frame size W,H (columns, rows), e.g. 256,256")
    parser.add_argument("--spacing", type=values_arg(float, 2), default=DEFAULT_SPACING,
                        help="pixel size x,y in mm, e.g. 0.2,0.2")
    parser.add_argument("--photometric", choices=PHOTOMETRICS, default="MONOCHROME2")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = generate(args.out, args.num_cases, args.seed, args.num_folds, args.shape, args.spacing,
                        args.photometric, args.workers)
    logger.info(
        "wrote %d SYNTHETIC thyroid cases to %s in %.1fs (LLNM prevalence %.2f); latent oracle AUROC %s, "
        "generating-variables AUROC %s, observable logistic out-of-fold AUROC %s (by group %s)",
        len(manifest["cases"]), args.out, time.perf_counter() - start, manifest["prevalence"],
        manifest["latent_oracle_auroc"], manifest["generating_variables_auroc"],
        manifest["observable_logistic_oof_auroc"], manifest["observable_logistic_oof_auroc_by_group"],
    )


if __name__ == "__main__":
    main()
