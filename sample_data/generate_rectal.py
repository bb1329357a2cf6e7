"""Generate SYNTHETIC endorectal ultrasound (ERUS) frames of rectal cancer, reports, and nCRT response labels.

Nothing here is patient data. Each frame is the radial ERUS view: the probe at the centre (black
transducer, a bright ring-down line, the anechoic water balloon), the rectal wall around it as five
concentric echo layers (hyperechoic balloon/mucosa interface, hypoechoic mucosa, hyperechoic submucosa,
hypoechoic muscularis propria, hyperechoic serosa/perirectal-fat interface), bright heterogeneous
perirectal fat, an adjacent organ at 12 o'clock (prostate or vagina), perirectal lymph nodes (round,
hypoechoic) and one hypoechoic tumor occupying an arc of the wall. The tumor's depth sets the uT stage:
uT1 ends in the submucosa, uT2 in the muscularis propria, uT3 breaks through into the fat, uT4 into
the adjacent organ. Echoes are Rayleigh speckle (complex Gaussian scatterers blurred by the point-spread
function, log-compressed to 8 bits) with depth attenuation away from the probe. RGB studies add
Doppler-like colour flow inside the tumor (as much as its flow grade). Clock positions: anterior is
12 o'clock at the image top, 3 o'clock is the image right.

Label 1 = good response to neoadjuvant chemoradiotherapy (tumor regression grade TRG 0), 0 = poor
response (TRG 1-3); good responders are the minority (about 30 %). Label model (explicit; coefficients in
:data:`LABEL_MODEL`, copied into the manifest)::

    z = b0 + b_uT1*[uT1] + b_uT2*[uT2] + b_uT4*[uT4]            uT3 is the reference stage
        + b_extent * (extent - 0.5)                          circumferential fraction of the wall
        + b_heterogeneity * (heterogeneity - 0.5)            tumor echotexture, 0 (homogeneous) .. 1
        + b_node * suspicious_nodes                          round nodes >= 5 mm (uN1: 1-3, uN2: >= 4)
        + b_distance_per_cm * (distance_cm - 7)              report only: lower edge to the anal verge
        + b_length_per_cm * (length_cm - 4.5)                report only: craniocaudal length
        + u,          u ~ N(0, sigma_u^2): what no input shows
    y ~ Bernoulli(sigmoid(z))

Smaller, shallower, homogeneous, node-negative, shorter and lower tumors respond better here. The
radial frame shows the stage, extent, echotexture and nodes; the distance from the anal verge and the
length are along the rectum, which one radial frame cannot show, so only the report states them. The
report repeats the image findings through a reader's errors (:data:`READER`). The flow grade and the
echo level are drawn and reported but carry no risk.

Recorded AUROCs, each named for what it is:

- ``latent_oracle_auroc``: of the latent score ``z`` itself (``u`` included): the Bayes bound given
  everything that made the labels; no model reaches it;
- ``generating_variables_auroc``: of ``z - u``, every generating variable known exactly;
- ``observable_logistic_oof_auroc``: the estimate of the best AUROC reachable from what a model sees:
  an L2 logistic regression (C = 1, standardised), out of fold over the manifest's patient-level folds, on
  features computed from the written files only (:func:`measure_frame` on the DICOM frames read back by
  ``read_frame`` with the tumor and anatomy masks, mean-pooled over a patient's frames, and
  :func:`report_features` of the report); also per group (``image``, ``report``).

Layout (axes as ``read_frame`` returns the frame: ``(C, W, H)``, pixel ``(i, j)`` = (column, row))::

    <out>/manifest.json                      description, synthetic, seed, num_folds, frames_per_patient,
                                             shape (W, H), spacing_mm, the AUROCs above, label_model, cases[]
    <out>/datastore/<frame_id>.dcm           one US Image Storage file per frame, 8-bit MONOCHROME2 or RGB,
                                             SequenceOfUltrasoundRegions in cm, SYNTHETIC in SeriesDescription
                                             and ImageComments; <frame_id> is <case_id> with one frame per
                                             patient, else <case_id>_f<k> (k = 0, 1, ...)
    <out>/datastore/sidecars/<frame_id>.json case_id, patient_id, bundle, label, label_name, label_meaning,
                                             report, sex, roi [[i0, j0], [i1, j1]], center_ijk, center_mm,
                                             frame (k), frames (the patient's frame ids), synthetic: true
    <out>/masks/<frame_id>_tumor.png         tumor mask, (rows, columns) PNG of 0/1
    <out>/masks/<frame_id>_anatomy.png       normal anatomy as :data:`ANATOMY` labels (the tumor overlies it)

One manifest row per patient (case): ``image``/``tumor_mask``/``anatomy_mask`` are frame 0's, ``images``/
``tumor_masks``/``anatomy_masks`` list every frame (all in the patient's fold), ``measurements`` are
:func:`measure_frame` averaged over the frames, ``oracle`` holds the generating variables (analysis only).
Frames after the first of a patient turn the probe (+-0.2 rad), shift it (+-0.8 mm), scale the wall
(+-3 %) and draw new speckle and texture; the anatomy, tumor and nodes are the patient's. A sidecar lists
the patient's frames under ``frames`` (``images`` in a sidecar names other image inputs to the server).

Usage::

    python -m sample_data.generate_rectal --out sample_data/rectal --num-cases 200 --seed 0
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

from oncofusion.data.folds import assign_folds
from oncofusion.io.frames import read_frame
from oncofusion.metrics.classification import auroc
from sample_data.common import generator_parser, logistic_oof_auroc, render_in_processes, values_arg
from sample_data.ultrasound import UltrasoundFile, psf, smooth_noise, write_us_dicom

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (320, 320)  # (W, H) = (columns, rows)
DEFAULT_SPACING = (0.18, 0.18)  # (x, y) mm
MIN_FIELD_MM = 56.0  # the wall, the fat and the largest nodes fit in a field this wide
LABEL_NAMES = {0: "poor response", 1: "good response"}
LABEL_MEANING = "1 = good response to nCRT (tumor regression grade TRG 0), 0 = poor response (TRG 1-3)"
BUNDLE = "rectal_erus_clip"
PHOTOMETRICS = ("MONOCHROME2", "RGB")
DESCRIPTION = (
    "SYNTHETIC endorectal ultrasound (radial ERUS) frames of rectal cancer with synthetic reports and "
    "response-to-nCRT labels (1 = good response, TRG 0); not patient data. Labels come from an explicit "
    "logistic model of the uT stage, circumferential extent, echotexture, suspicious nodes, report-only "
    "distance from the anal verge and length, and an unobserved term (label_model). Made by "
    "sample_data/generate_rectal.py."
)
SYNTHETIC_NOTE = "SYNTHETIC image made by sample_data/generate_rectal.py: not patient data"
AUROC_NOTES = {
    "latent_oracle_auroc": "AUROC of the latent score z (unobserved term included) on these cases: the Bayes bound "
                           "of the labels given everything that made them; no model sees u",
    "generating_variables_auroc": "AUROC of z - u: every generating variable known exactly",
    "observable_logistic_oof_auroc": "the estimate of the best AUROC reachable from what a model observes: L2 "
                                     "logistic regression (C = 1, standardised), out of fold over these patient-level "
                                     "folds, on measure_frame of the written frames and masks (mean over a patient's "
                                     "frames) and report_features of the report",
}
#: labels of the anatomy mask (normal anatomy; the tumor mask overlies it)
ANATOMY = {"background": 0, "probe": 1, "interface": 2, "mucosa": 3, "submucosa": 4,
           "muscularis_propria": 5, "serosa": 6, "organ": 7, "node": 8}
LAYERS = ("interface", "mucosa", "submucosa", "muscularis_propria", "serosa")

# ----------------------------------------------------------------------------- label model

LABEL_MODEL: dict[str, float] = {
    "b0": -1.2,
    "b_uT1": 1.4, "b_uT2": 0.8, "b_uT4": -1.2,
    "b_extent": -3.0,
    "b_heterogeneity": -2.0,
    "b_node": -0.45,
    "b_distance_per_cm": -0.12,
    "b_length_per_cm": -0.6,
    "sigma_u": 0.8,
}
STAGE_PROBABILITY = {1: 0.08, 2: 0.22, 3: 0.55, 4: 0.15}
NODE_PROBABILITY = {0: 0.45, 1: 0.2, 2: 0.14, 3: 0.09, 4: 0.07, 5: 0.05}  # suspicious nodes
FLOW_PROBABILITY = {0: 0.2, 1: 0.35, 2: 0.3, 3: 0.15}  # Adler-like colour Doppler grade
EXTENT_RANGE, DISTANCE_CM_RANGE = (0.15, 0.8), (2.0, 14.0)
LENGTH_CM_MEAN_SD_RANGE = (4.5, 1.3, (1.5, 9.0))
P_MALE = 0.65
#: the report's writer: stage off by one, node count off by one (probabilities); heterogeneity judged with noise
READER = {"stage_error": 0.12, "node_count_error": 0.12, "heterogeneity_sd": 0.15}


def latent_score(variables: dict[str, np.ndarray], unobserved: np.ndarray | None = None) -> np.ndarray:
    """The label model's ``z`` (log-odds of good response) for arrays of ``stage`` (1-4), ``extent``,
    ``heterogeneity``, ``nodes``, ``distance_cm``, ``length_cm``; ``unobserved`` is ``u`` (0 when None)."""
    m = LABEL_MODEL
    stage = np.asarray(variables["stage"], int)
    z = (
        m["b0"] + m["b_uT1"] * (stage == 1) + m["b_uT2"] * (stage == 2) + m["b_uT4"] * (stage == 4)
        + m["b_extent"] * (np.asarray(variables["extent"], float) - 0.5)
        + m["b_heterogeneity"] * (np.asarray(variables["heterogeneity"], float) - 0.5)
        + m["b_node"] * np.asarray(variables["nodes"], float)
        + m["b_distance_per_cm"] * (np.asarray(variables["distance_cm"], float) - 7.0)
        + m["b_length_per_cm"] * (np.asarray(variables["length_cm"], float) - 4.5)
    )
    return z if unobserved is None else z + np.asarray(unobserved, float)


# ----------------------------------------------------------------------------- appearance (mm, amplitudes)

#: echo amplitudes (1.0 = the grey level REFERENCE_GREY); five layers bright/dark/bright/dark/bright
ECHO = {"probe": 0.0, "ring_down": 1.4, "water": 0.02, "interface": 1.9, "mucosa": 0.3, "submucosa": 1.7,
        "muscularis_propria": 0.28, "serosa": 1.6, "fat": 0.85, "organ": 0.55, "node": 0.3}
LAYER_MM = {"interface": (0.5, 0.7), "mucosa": (0.6, 0.9), "submucosa": (0.9, 1.2),
            "muscularis_propria": (1.1, 1.5), "serosa": (0.5, 0.7)}
PROBE_MM, BALLOON_MM = (3.5, 4.5), (7.5, 9.5)  # radii
TUMOR_ECHO, TUMOR_MIN_MM = (0.2, 0.45), 0.5
STAGE_DEPTH = {1: (0.35, 0.7), 2: (0.35, 0.75)}  # share of the submucosa / muscularis reached
EXTRAMURAL_MM = (1.0, 4.0)  # uT3 beyond the wall
INTO_ORGAN_MM = (1.5, 3.0)  # uT4 past the organ's near edge
BORDER_MM = 0.3  # how far an extramural (uT3-4) border wanders
ORGAN_GAP_MM, ORGAN_SEMI_MM = (3.0, 6.0), ((4.0, 6.0), (7.0, 10.0))  # gap to the wall; radial, tangential
NODE_DIAMETER_MM = {"suspicious": (5.2, 7.5), "benign": (2.5, 3.8)}
SUSPICIOUS_NODE_MM = 4.5  # equivalent diameter above which a measured node counts as suspicious
BENIGN_NODES = (0, 2)
REFERENCE_GREY, DYNAMIC_RANGE_DB = (115.0, 135.0), (50.0, 60.0)
ATTENUATION_DB_PER_MM, PSF_SIGMA_MM = (0.1, 0.3), (0.1, 0.2)
FRAME_JITTER = {"rotation_rad": 0.2, "shift_mm": 0.8, "scale": 0.03}  # frames after the first


@dataclass(frozen=True)
class FrameTask:
    """Everything one worker needs to render one frame: the patient's design and the frame's seed."""

    case_id: str
    patient_id: str
    frame: int
    seed: tuple[int, ...]  # the patient's geometry; the frame adds (3, frame)
    shape: tuple[int, int]  # (W, H)
    spacing: tuple[float, float]  # (x, y) mm
    photometric: str
    stage: int
    extent: float
    heterogeneity: float
    nodes: int
    flow_grade: int
    male: bool
    image_path: str
    tumor_path: str
    anatomy_path: str


def _wrap(angle: np.ndarray | float) -> np.ndarray | float:
    return np.mod(np.asarray(angle) + np.pi, 2.0 * np.pi) - np.pi


def _layout(task: FrameTask, rng: np.random.Generator) -> dict:
    """The patient's geometry in polar mm around the probe (angle 0 = 3 o'clock, pi/2 = 6 o'clock)."""
    thickness = np.array([rng.uniform(*LAYER_MM[k]) for k in LAYERS])
    balloon = rng.uniform(*BALLOON_MM)
    wall_outer = balloon + thickness.sum()
    organ_angle = -np.pi / 2 + rng.uniform(-0.35, 0.35)
    gap = rng.uniform(*ORGAN_GAP_MM)
    semi = (rng.uniform(*ORGAN_SEMI_MM[0]), rng.uniform(*ORGAN_SEMI_MM[1]))
    organ_r = wall_outer + gap + semi[0]
    half_arc = np.pi * task.extent
    if task.stage == 4:
        centre = organ_angle + rng.uniform(-0.25, 0.25) * half_arc
    else:
        centre = rng.uniform(-np.pi, np.pi)
    organ_half_angle = np.arctan2(semi[1], organ_r) + 0.1
    facing_organ = abs(_wrap(centre - organ_angle)) < half_arc + organ_half_angle
    extramural = 0.0
    if task.stage == 3:
        high = min(EXTRAMURAL_MM[1], gap - 1.5) if facing_organ else EXTRAMURAL_MM[1]
        extramural = rng.uniform(EXTRAMURAL_MM[0], high)
    elif task.stage == 4:
        extramural = gap + rng.uniform(*INTO_ORGAN_MM)
    tumor = {"centre": centre, "half_arc": half_arc, "flat": rng.uniform(1.6, 3.0),
             "share": rng.uniform(*STAGE_DEPTH.get(task.stage, (0.0, 0.0))), "extramural": extramural,
             "echo": rng.uniform(*TUMOR_ECHO),
             "border": [(k, rng.uniform(0.0, BORDER_MM / 3), rng.uniform(0, 2 * np.pi)) for k in (5, 9, 14)]}
    layout = {"probe": rng.uniform(*PROBE_MM), "balloon": balloon, "thickness": thickness,
              "wall_outer": wall_outer,
              "wobble": [(k, rng.uniform(-0.03, 0.03), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)],
              "organ": (organ_angle, organ_r, semi), "tumor": tumor}
    layout["nodes"] = _place_nodes(task, layout, rng)
    return layout


def _place_nodes(task: FrameTask, layout: dict, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(angle, radius, node radius) of each node in the perirectal fat, clear of the wall, the organ, the
    tumor's extramural part, each other and the field's edge (whatever rotation or shift a frame adds)."""
    r_max = min(task.shape[0] * task.spacing[0], task.shape[1] * task.spacing[1]) / 2.0 - 1.5
    inner = layout["wall_outer"] + 0.8
    organ_angle, organ_r, semi = layout["organ"]
    tumor = layout["tumor"]
    tumor_reach = layout["wall_outer"] + tumor["extramural"] + 1.5
    sizes = [rng.uniform(*NODE_DIAMETER_MM["suspicious"]) / 2 for _ in range(task.nodes)]
    sizes += [rng.uniform(*NODE_DIAMETER_MM["benign"]) / 2 for _ in range(rng.integers(BENIGN_NODES[0],
                                                                                          BENIGN_NODES[1] + 1))]
    placed: list[tuple[float, float, float]] = []
    for size in sizes:
        for _ in range(2000):
            angle, r = rng.uniform(-np.pi, np.pi), rng.uniform(inner + size, r_max - size)
            xy = r * np.array([np.cos(angle), np.sin(angle)])
            organ_xy = organ_r * np.array([np.cos(organ_angle), np.sin(organ_angle)])
            in_arc = abs(_wrap(angle - tumor["centre"])) < tumor["half_arc"] + size / r + 0.1
            if (np.linalg.norm(xy - organ_xy) < max(semi) + size + 0.5 or (in_arc and r - size < tumor_reach)
                    or any(np.linalg.norm(xy - q * np.array([np.cos(a), np.sin(a)])) < size + s + 0.5
                           for a, q, s in placed)):
                continue
            placed.append((angle, r, size))
            break
        else:
            raise ValueError(f"{task.case_id}: no room for a {2 * size:.1f} mm node in a "
                             f"{task.shape[0] * task.spacing[0]:.0f} mm field; use a larger --shape or --spacing")
    return placed


def render(task: FrameTask) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The 8-bit frame (rows, columns[, 3]), the tumor mask and the anatomy label map (rows, columns),
    and the frame's truth (probe centre, radii)."""
    rng = np.random.default_rng(list(task.seed))
    layout = _layout(task, rng)
    frng = np.random.default_rng([*task.seed, 3, task.frame])
    jitter = task.frame > 0
    rotation = frng.uniform(-1, 1) * FRAME_JITTER["rotation_rad"] * jitter
    shift = frng.uniform(-1, 1, 2) * FRAME_JITTER["shift_mm"] * jitter
    scale = 1.0 + frng.uniform(-1, 1) * FRAME_JITTER["scale"] * jitter
    width, height = task.shape
    sx, sy = task.spacing
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    centre = (width * sx / 2.0 + shift[0], height * sy / 2.0 + shift[1])
    dx, dy = cols * sx - centre[0], rows * sy - centre[1]
    r, theta = np.hypot(dx, dy), _wrap(np.arctan2(dy, dx) - rotation)  # theta in the patient's frame

    # the wall: five layers whose boundaries wobble slightly around the balloon
    wobble = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in layout["wobble"])
    bounds = [layout["balloon"] + b * scale * wobble for b in np.concatenate([[0.0], np.cumsum(layout["thickness"])])]
    anatomy = np.zeros(r.shape, np.uint8)
    organ_angle, organ_r, semi = layout["organ"]
    ou = r * np.cos(theta - organ_angle) - organ_r
    ov = r * np.sin(theta - organ_angle)
    in_organ = (ou / semi[0]) ** 2 + (ov / semi[1]) ** 2 < 1.0
    anatomy[in_organ] = ANATOMY["organ"]
    node_weight = np.zeros(r.shape)
    for angle, radius, size in layout["nodes"]:
        distance = np.hypot(dx - radius * np.cos(angle + rotation), dy - radius * np.sin(angle + rotation))
        anatomy[distance < size] = ANATOMY["node"]
        np.maximum(node_weight, np.clip((size - distance) / 0.3 + 0.5, 0.0, 1.0), out=node_weight)
    for k, name in enumerate(LAYERS):
        anatomy[(r >= bounds[k]) & (r < bounds[k + 1])] = ANATOMY[name]
    anatomy[r < bounds[0]] = ANATOMY["probe"]

    # the tumor: from under the interface outwards, a flat-topped arc, its depth set by the stage
    tumor = layout["tumor"]
    d = _wrap(theta - tumor["centre"])
    in_arc = np.abs(d) < tumor["half_arc"]
    profile = np.clip((1.0 - (d / tumor["half_arc"]) ** 2) * tumor["flat"], 0.0, 1.0)
    start = bounds[1]
    if task.stage in (1, 2):
        k = 3 if task.stage == 1 else 4  # the submucosa's or the muscularis propria's index in bounds - 1
        peak = bounds[k - 1] + tumor["share"] * (bounds[k] - bounds[k - 1])
    else:
        border = sum(a * np.cos(k * theta + p) for k, a, p in tumor["border"])  # within +-BORDER_MM
        peak = bounds[5] + tumor["extramural"] + border
    outer = start + TUMOR_MIN_MM + (peak - start - TUMOR_MIN_MM) * profile
    in_tumor = in_arc & (r >= start) & (r < outer)

    # echo amplitudes, tissue by tissue, then the tumor over them
    amp = ECHO["fat"] * np.exp(0.3 * smooth_noise(r.shape, (0.8 / sy, 0.8 / sx), frng))
    amp = np.where(in_organ, ECHO["organ"] * np.exp(0.15 * smooth_noise(r.shape, 1.5, frng)), amp)
    amp = node_weight * ECHO["node"] + (1.0 - node_weight) * amp
    for k, name in enumerate(LAYERS):
        amp[(r >= bounds[k]) & (r < bounds[k + 1])] = ECHO[name]
    amp[r < bounds[0]] = ECHO["water"]
    amp[np.abs(r - layout["probe"]) < 0.25] = ECHO["ring_down"]
    amp[r < layout["probe"] - 0.25] = ECHO["probe"]
    spread = 0.15 + 0.6 * task.heterogeneity
    texture = np.exp(spread * smooth_noise(r.shape, (0.5 / sy, 0.5 / sx), frng))
    amp = np.where(in_tumor, tumor["echo"] * texture, amp)

    # Rayleigh speckle blurred by the point-spread function, attenuated away from the balloon
    sigma_px = (rng.uniform(*PSF_SIGMA_MM) / sy, rng.uniform(*PSF_SIGMA_MM) / sx)
    impulse = np.zeros((33, 33))
    impulse[16, 16] = 1.0
    norm = np.sqrt((psf(impulse, sigma_px) ** 2).sum())
    scatter = amp * (frng.standard_normal(r.shape) + 1j * frng.standard_normal(r.shape)) / np.sqrt(2.0)
    field = (psf(scatter.real, sigma_px) + 1j * psf(scatter.imag, sigma_px)) / norm
    field *= 10.0 ** (-rng.uniform(*ATTENUATION_DB_PER_MM) * np.maximum(r - bounds[0], 0.0) / 20.0)
    db = 20.0 * np.log10(np.maximum(np.abs(field), 1e-6) / (np.sqrt(np.pi) / 2.0))
    grey = rng.uniform(*REFERENCE_GREY) + db * 255.0 / rng.uniform(*DYNAMIC_RANGE_DB)
    pixels = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    if task.photometric == "RGB":
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
        _colour_flow(pixels, in_tumor, task.flow_grade, dx, dy, frng)
    truth = {"probe_centre_mm": [round(float(c), 3) for c in centre], "rotation_rad": round(float(rotation), 4),
             "wall_inner_mm": round(float(np.mean(bounds[0])), 3), "wall_outer_mm": round(float(np.mean(bounds[5])), 3),
             "tumor_echo": round(float(tumor["echo"]), 4)}
    return pixels, in_tumor, anatomy, truth


def _colour_flow(pixels: np.ndarray, in_tumor: np.ndarray, grade: int, dx: np.ndarray, dy: np.ndarray,
                 rng: np.random.Generator) -> None:
    """Paint ``4 * grade`` short vessel-like colour segments (red towards, blue away) inside the tumor."""
    core = ndimage.binary_erosion(in_tumor, iterations=1)
    candidates = np.argwhere(core)
    if grade == 0 or not len(candidates):
        return
    for _ in range(4 * grade):
        row, col = candidates[rng.integers(len(candidates))]
        angle, length, width = rng.uniform(0, np.pi), rng.uniform(0.6, 1.4), rng.uniform(0.25, 0.45)
        u = (dx - dx[row, col]) * np.cos(angle) + (dy - dy[row, col]) * np.sin(angle)
        v = -(dx - dx[row, col]) * np.sin(angle) + (dy - dy[row, col]) * np.cos(angle)
        vessel = ((u / length) ** 2 + (v / width) ** 2 < 1.0) & in_tumor
        colour = (int(rng.integers(190, 256)), int(rng.integers(20, 70)), int(rng.integers(20, 70)))
        pixels[vessel] = colour if rng.random() < 0.5 else colour[::-1]


# ----------------------------------------------------------------------------- files


def measure_frame(image: np.ndarray, tumor: np.ndarray, anatomy: np.ndarray,
                  spacing: Sequence[float]) -> dict[str, float]:
    """What a model can measure on one frame: ``image`` (C, W, H) as ``read_frame`` gives it, ``tumor``
    (W, H) bool, ``anatomy`` (W, H) :data:`ANATOMY` labels, ``spacing`` (x, y) mm.

    Radii are from the probe's centroid; the wall's inner and outer radii are those of discs with the
    probe's and the probe-plus-wall's areas; nodes are the node label's connected components. Grey
    statistics skip colour-flow pixels."""
    sx, sy = spacing
    probe = anatomy == ANATOMY["probe"]
    ci, cj = np.argwhere(probe).mean(axis=0)
    ii, jj = np.indices(tumor.shape)
    dx, dy = (ii - ci) * sx, (jj - cj) * sy
    r = np.hypot(dx, dy)
    inner = np.sqrt(probe.sum() * sx * sy / np.pi)
    outer = np.sqrt(((anatomy >= ANATOMY["probe"]) & (anatomy <= ANATOMY["serosa"])).sum() * sx * sy / np.pi)
    reach = float(r[tumor].max())
    bins = np.unique(((np.arctan2(dy[tumor], dx[tumor]) + np.pi) / (2 * np.pi) * 72).astype(int) % 72)
    colour = (image.max(axis=0) - image.min(axis=0)) > 0
    grey = image.mean(axis=0)
    plain = tumor & ~colour
    wall = (anatomy >= ANATOMY["interface"]) & (anatomy <= ANATOMY["serosa"]) & ~tumor & ~colour
    labels, count = ndimage.label(anatomy == ANATOMY["node"])
    diameters = 2.0 * np.sqrt(np.bincount(labels.ravel())[1:] * sx * sy / np.pi)
    return {
        "depth_mm": reach - inner,
        "relative_depth": (reach - inner) / (outer - inner),
        "beyond_wall_mm": max(reach - outer, 0.0),
        "organ_overlap": float((tumor & (anatomy == ANATOMY["organ"])).sum() > 0),
        "extent": len(bins) / 72.0,
        "echo_contrast": float(grey[wall].mean() - grey[plain].mean()),
        "grey_sd": float(grey[plain].std()),
        "suspicious_nodes": float((diameters >= SUSPICIOUS_NODE_MM).sum()),
        "largest_node_mm": float(diameters.max()) if count else 0.0,
        "colour_fraction": float(colour[tumor].mean()),
    }


def render_frame(task: FrameTask) -> dict:
    """Render and write one frame, read it back as a model would, and measure it."""
    pixels, tumor, anatomy, truth = render(task)
    write_us_dicom(Path(task.image_path), pixels, task.spacing, UltrasoundFile(
        uid_source=("oncofusion-synthetic-rectal", task.case_id, repr(task.seed)), patient_id=task.patient_id,
        male=task.male, study_id=task.case_id[-8:], study_description="SYNTHETIC endorectal ultrasound",
        series_description="SYNTHETIC radial ERUS B-mode, not patient data", body_part="RECTUM",
        comments=SYNTHETIC_NOTE, instance_number=task.frame + 1, instance_key=f"instance-{task.frame}"))
    Image.fromarray(tumor.astype(np.uint8)).save(task.tumor_path)
    Image.fromarray(anatomy).save(task.anatomy_path)
    frame = read_frame(task.image_path)
    spacing = tuple(float(v) for v in np.diag(frame.affine.numpy())[:2])
    read_tumor = read_frame(task.tumor_path, what="tumor mask")[0].numpy() > 0
    read_anatomy = np.rint(read_frame(task.anatomy_path, what="anatomy mask")[0].numpy()).astype(int)
    measured = measure_frame(frame.numpy(), read_tumor, read_anatomy, spacing)
    idx = np.argwhere(tumor.T)  # (W, H): the reader's axes
    centre = np.rint(idx.mean(axis=0)).astype(int)
    if not tumor.T[tuple(centre)]:  # an arc's centroid can fall off it: take the nearest tumor pixel
        centre = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
    return {
        "roi": [[int(v) for v in idx.min(axis=0)], [int(v) for v in idx.max(axis=0)]],
        "center_ijk": [int(v) for v in centre],
        "center_mm": [round(float(c * s), 3) for c, s in zip(centre, task.spacing, strict=True)],
        "measurements": {k: round(v, 4) for k, v in measured.items()},
        "truth": truth,
    }


# ----------------------------------------------------------------------------- the report

EXTENT_WORDS = (("one fifth", 0.2), ("one quarter", 0.25), ("one third", 1 / 3), ("half", 0.5),
                ("two thirds", 2 / 3), ("three quarters", 0.75))
STAGE_PHRASES = {
    1: ("uT1: the lesion is confined to the mucosa and submucosa; the muscularis propria is intact.",
        "Depth of invasion uT1 (submucosa), with preserved muscularis propria."),
    2: ("uT2: the tumour invades but does not breach the muscularis propria.",
        "Depth of invasion uT2: into the muscularis propria, the outer hyperechoic layer intact."),
    3: ("uT3: the tumour breaks through the muscularis propria into the perirectal fat.",
        "Depth of invasion uT3, with extension into the mesorectal fat."),
    4: ("uT4: the tumour invades the adjacent {organ}.", "Depth of invasion uT4, with invasion of the {organ}."),
}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven")
FLOW_WORDS = ("no", "minimal", "moderate", "abundant")


def _clock(angle: float) -> int:
    hour = int(round((angle + np.pi / 2) / (2 * np.pi) * 12)) % 12
    return 12 if hour == 0 else hour


def build_report(findings: dict, rng: np.random.Generator) -> str:
    """ERUS findings as English sentences in random phrasing and order after the location. ``findings``:
    distance_cm, length_cm, extent, centre/half_arc (rad), stage, organ, heterogeneous, nodes, largest_node_mm,
    flow_grade (as reported)."""
    distance, length = findings["distance_cm"], findings["length_cm"]
    level = "lower" if distance < 5 else "mid" if distance < 10 else "upper"
    word = min(EXTENT_WORDS, key=lambda w: abs(w[1] - findings["extent"]))[0]
    clock = f"from {_clock(findings['centre'] - findings['half_arc'])} to {_clock(findings['centre'] + findings['half_arc'])} o'clock"
    first = (f"Endorectal ultrasound: a mass in the {level} rectum, its lower edge {distance:.1f} cm from the anal "
             f"verge, {length:.1f} cm long.", f"A {level} rectal tumour {distance:.1f} cm from the anal verge; "
             f"craniocaudal length {length:.1f} cm.")[rng.integers(2)]
    extent = (f"It involves about {word} of the circumference ({clock}).",
              f"Circumferential extent: approximately {word} of the rectal wall, {clock}.")[rng.integers(2)]
    stage = STAGE_PHRASES[findings["stage"]][rng.integers(2)].format(organ=findings["organ"])
    texture = "heterogeneous" if findings["heterogeneous"] else "homogeneous"
    echo = (f"The lesion is hypoechoic with a {texture} echotexture.", f"Echogenicity: hypoechoic, {texture}.")[
        rng.integers(2)]
    n = findings["nodes"]
    u_n = 0 if n == 0 else 1 if n <= 3 else 2
    if n == 0:
        nodes = ("No suspicious perirectal lymph nodes (uN0).", "Perirectal nodes: none suspicious, uN0.")[rng.integers(2)]
    else:
        plural = "node" if n == 1 else "nodes"
        nodes = (f"{NUMBER_WORDS[n].capitalize()} suspicious round hypoechoic perirectal lymph {plural}, the largest "
                 f"{findings['largest_node_mm']:.1f} mm (uN{u_n}).",
                 f"Perirectal nodes: {NUMBER_WORDS[n]} suspicious, up to {findings['largest_node_mm']:.1f} mm; "
                 f"uN{u_n}.")[rng.integers(2)]
    grade = findings["flow_grade"]
    flow = (f"Colour Doppler shows {FLOW_WORDS[grade]} intratumoral flow (grade {grade}).",
            f"Doppler: {FLOW_WORDS[grade]} internal vascularity, grade {grade}.")[rng.integers(2)]
    rest = [extent, stage, echo, nodes, flow]
    return " ".join([first, *(rest[i] for i in rng.permutation(len(rest)))])


def report_features(report: str) -> dict[str, float]:
    """What a text model could read: uT, uN, suspicious node count, extent (fraction), heterogeneity,
    distance from the anal verge and length (cm), Doppler grade."""
    text = report.lower()
    extent = next((v for w, v in sorted(EXTENT_WORDS, key=lambda w: -len(w[0])) if f"{w} of the" in text), 0.0)
    count = re.search(r"(\w+) suspicious", text)
    return {
        "uT": float(re.search(r"ut(\d)", text).group(1)),
        "uN": float(re.search(r"un(\d)", text).group(1)),
        "suspicious_nodes": float(NUMBER_WORDS.index(count.group(1))) if count and count.group(1) in NUMBER_WORDS else 0.0,
        "extent": extent,
        "heterogeneous": float("heterogeneous" in text),
        "distance_cm": float(re.search(r"(\d+(?:\.\d+)?) cm from the anal verge", text).group(1)),
        "length_cm": float(next(g for g in re.search(r"length (\d+\.\d) cm|(\d+\.\d) cm long", text).groups() if g)),
        "flow_grade": float(re.search(r"grade (\d)", text).group(1)),
    }


# ----------------------------------------------------------------------------- the observable ceiling


def observable_aurocs(cases: Sequence[dict]) -> dict[str, float | None]:
    """:func:`logistic_oof_auroc` on the image measurements and report features together and apart."""
    image = np.array([list(c["measurements"].values()) for c in cases], float)
    report = np.array([list(report_features(c["report"]).values()) for c in cases], float)
    labels = np.array([c["label"] for c in cases])
    folds = np.array([c["fold"] for c in cases])
    return {name: logistic_oof_auroc(matrix, labels, folds)
            for name, matrix in (("all", np.hstack([image, report])), ("image", image), ("report", report))}


# ----------------------------------------------------------------------------- the data set


def _design(rng: np.random.Generator, num: int) -> dict[str, np.ndarray]:
    def table(p: dict) -> np.ndarray:
        return rng.choice(list(p), size=num, p=list(p.values()))

    mean, sd, (low, high) = LENGTH_CM_MEAN_SD_RANGE
    return {"stage": table(STAGE_PROBABILITY), "nodes": table(NODE_PROBABILITY),
            "flow_grade": table(FLOW_PROBABILITY), "extent": rng.uniform(*EXTENT_RANGE, num),
            "heterogeneity": rng.random(num), "distance_cm": rng.uniform(*DISTANCE_CM_RANGE, num),
            "length_cm": np.clip(rng.normal(mean, sd, num), low, high), "male": rng.random(num) < P_MALE}


def _reported(design: dict, i: int, layout: dict, largest_mm: float, rng: np.random.Generator) -> dict:
    """What the report says about case ``i``: the image findings through the reader's errors."""
    stage = int(design["stage"][i])
    if rng.random() < READER["stage_error"]:
        stage = int(np.clip(stage + (1 if stage == 1 else -1 if stage == 4 else rng.choice([-1, 1])), 1, 4))
    nodes = int(design["nodes"][i])
    if rng.random() < READER["node_count_error"]:
        nodes = nodes + 1 if nodes == 0 else nodes - 1
        largest_mm = largest_mm or rng.uniform(5.0, 6.0)
    heterogeneous = design["heterogeneity"][i] + rng.normal(0.0, READER["heterogeneity_sd"]) > 0.5
    return {"distance_cm": float(design["distance_cm"][i]), "length_cm": float(design["length_cm"][i]),
            "extent": float(design["extent"][i]), "centre": layout["tumor"]["centre"],
            "half_arc": layout["tumor"]["half_arc"], "stage": stage, "heterogeneous": bool(heterogeneous),
            "organ": "prostate" if design["male"][i] else "vagina", "nodes": nodes,
            "largest_node_mm": largest_mm if nodes else 0.0, "flow_grade": int(design["flow_grade"][i])}


def generate(out: str | Path, num_cases: int = 200, seed: int = 0, num_folds: int = 5,
             shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING,
             photometric: str = "MONOCHROME2", workers: int = 1, frames_per_patient: int = 1) -> dict:
    """Write ``num_cases`` synthetic patients (``frames_per_patient`` frames each) under ``out`` and return
    the manifest (also written). ``shape`` is (W, H) and ``spacing`` (x, y) mm, as ``read_frame`` reports."""
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    if frames_per_patient < 1:
        raise ValueError(f"frames_per_patient must be at least 1, got {frames_per_patient}")
    field = min(shape[0] * spacing[0], shape[1] * spacing[1])
    if field < MIN_FIELD_MM:
        raise ValueError(f"a {shape[0]}x{shape[1]} frame of {spacing[0]}x{spacing[1]} mm pixels spans {field:.1f} mm; "
                         f"the radial view needs {MIN_FIELD_MM:.0f} mm: raise --shape or --spacing")
    out = Path(out)
    datastore, masks = out / "datastore", out / "masks"
    (datastore / "sidecars").mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    design = _design(rng, num_cases)
    unobserved = rng.normal(0.0, LABEL_MODEL["sigma_u"], num_cases)
    label_draws = rng.random(num_cases)
    ids = [f"rectal_{i:04d}" for i in range(num_cases)]
    patients = [f"SYN-REC-{seed:02d}-{i:04d}" for i in range(num_cases)]
    frame_ids = [[ids[i]] if frames_per_patient == 1 else [f"{ids[i]}_f{k}" for k in range(frames_per_patient)]
                 for i in range(num_cases)]
    tasks = [
        FrameTask(case_id=ids[i], patient_id=patients[i], frame=k, seed=(seed, i, 2),
                  shape=(int(shape[0]), int(shape[1])), spacing=(float(spacing[0]), float(spacing[1])),
                  photometric=photometric, stage=int(design["stage"][i]), extent=float(design["extent"][i]),
                  heterogeneity=float(design["heterogeneity"][i]), nodes=int(design["nodes"][i]),
                  flow_grade=int(design["flow_grade"][i]), male=bool(design["male"][i]),
                  image_path=str(datastore / f"{fid}.dcm"), tumor_path=str(masks / f"{fid}_tumor.png"),
                  anatomy_path=str(masks / f"{fid}_anatomy.png"))
        for i in range(num_cases) for k, fid in enumerate(frame_ids[i])
    ]
    rendered = render_in_processes(render_frame, tasks, workers)
    per_case = [rendered[i * frames_per_patient:(i + 1) * frames_per_patient] for i in range(num_cases)]

    observable_part = latent_score(design)
    z = observable_part + unobserved
    labels = (label_draws < expit(z)).astype(int)
    folds = assign_folds(patients, [int(v) for v in labels], num_folds, seed)

    report_rng = np.random.default_rng([seed, 3])
    cases = []
    for i, frames in enumerate(per_case):
        layout = _layout(tasks[i * frames_per_patient], np.random.default_rng([seed, i, 2]))
        largest = 2.0 * max((s for _, _, s in layout["nodes"][: int(design["nodes"][i])]), default=0.0)
        reported = _reported(design, i, layout, largest, report_rng)
        report = build_report(reported, report_rng)
        label = int(labels[i])
        base = {"case_id": ids[i], "patient_id": patients[i], "bundle": BUNDLE, "label": label,
                "label_name": LABEL_NAMES[label], "label_meaning": LABEL_MEANING, "report": report,
                "sex": "male" if design["male"][i] else "female"}
        for k, (fid, frame) in enumerate(zip(frame_ids[i], frames, strict=True)):
            sidecar = {**base, "roi": frame["roi"], "center_ijk": frame["center_ijk"], "center_mm": frame["center_mm"],
                       "frame": k, "frames": frame_ids[i], "synthetic": True}
            (datastore / "sidecars" / f"{fid}.json").write_text(json.dumps(sidecar, indent=2))
        row = {k: v for k, v in base.items() if k not in ("label_meaning", "bundle")}
        row.update({
            "roi": frames[0]["roi"], "center_ijk": frames[0]["center_ijk"], "center_mm": frames[0]["center_mm"],
            "image": f"datastore/{frame_ids[i][0]}.dcm", "tumor_mask": f"masks/{frame_ids[i][0]}_tumor.png",
            "anatomy_mask": f"masks/{frame_ids[i][0]}_anatomy.png",
            "images": [f"datastore/{f}.dcm" for f in frame_ids[i]],
            "tumor_masks": [f"masks/{f}_tumor.png" for f in frame_ids[i]],
            "anatomy_masks": [f"masks/{f}_anatomy.png" for f in frame_ids[i]],
            "fold": int(folds[i]),
            "measurements": {k: round(float(np.mean([f["measurements"][k] for f in frames])), 4)
                             for k in frames[0]["measurements"]},
            "oracle": {
                "latent_score": round(float(z[i]), 4), "probability": round(float(expit(z[i])), 4),
                "unobserved": round(float(unobserved[i]), 4),
                **{k: (round(float(design[k][i]), 4) if design[k].dtype.kind == "f" else int(design[k][i]))
                   for k in ("stage", "extent", "heterogeneity", "nodes", "distance_cm", "length_cm", "flow_grade")},
                "reported": {k: reported[k] for k in ("stage", "nodes", "heterogeneous")},
                "frames": [f["truth"] for f in frames],
            },
        })
        cases.append(row)

    two_classes = 0 < labels.sum() < labels.size
    observable = observable_aurocs(cases) if two_classes else {"all": None, "image": None, "report": None}
    manifest = {
        "description": DESCRIPTION, "synthetic": True, "seed": seed, "num_folds": num_folds,
        "frames_per_patient": frames_per_patient, "shape": [int(v) for v in shape],
        "shape_axes": "(W, H) = (columns, rows), as read_frame returns the frame", "spacing_mm": [float(v) for v in spacing],
        "view": "radial ERUS, probe at the centre, anterior (12 o'clock) at the top, 3 o'clock on the right",
        "photometric": photometric, "anatomy_labels": ANATOMY,
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        "prevalence": round(float(labels.mean()), 4),
        "latent_oracle_auroc": round(auroc(labels, z), 4) if two_classes else None,
        "generating_variables_auroc": round(auroc(labels, observable_part), 4) if two_classes else None,
        "observable_logistic_oof_auroc": observable["all"],
        "observable_logistic_oof_auroc_by_group": {k: v for k, v in observable.items() if k != "all"},
        "auroc_notes": AUROC_NOTES,
        "label_model": {
            "formula": "z = b0 + b_uT1*[uT1] + b_uT2*[uT2] + b_uT4*[uT4] + b_extent*(extent - 0.5) "
                       "+ b_heterogeneity*(heterogeneity - 0.5) + b_node*suspicious_nodes "
                       "+ b_distance_per_cm*(distance_cm - 7) + b_length_per_cm*(length_cm - 4.5) + u, "
                       "u ~ N(0, sigma_u^2); y ~ Bernoulli(sigmoid(z)), y = 1 good response (TRG 0)",
            "coefficients": LABEL_MODEL,
            **{f"{name}_probability": {str(k): v for k, v in table.items()} for name, table in
               (("stage", STAGE_PROBABILITY), ("node", NODE_PROBABILITY), ("flow", FLOW_PROBABILITY))},
            "extent_range": list(EXTENT_RANGE), "distance_cm_range": list(DISTANCE_CM_RANGE),
            "length_cm_mean_sd_range": [*LENGTH_CM_MEAN_SD_RANGE[:2], list(LENGTH_CM_MEAN_SD_RANGE[2])],
            "reader": READER,
        },
        "cases": cases,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = generator_parser(__doc__.split("\n\n")[0], "sample_data/rectal", 200)
    parser.add_argument("--shape", type=values_arg(int, 2), default=DEFAULT_SHAPE, help="frame size W,H")
    parser.add_argument("--spacing", type=values_arg(float, 2), default=DEFAULT_SPACING, help="pixel size x,y mm")
    parser.add_argument("--photometric", choices=PHOTOMETRICS, default="MONOCHROME2",
                        help="RGB adds colour Doppler flow inside the tumor")
    parser.add_argument("--frames-per-patient", type=int, default=1, help="DICOM frames per patient")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = generate(args.out, args.num_cases, args.seed, args.num_folds, args.shape, args.spacing,
                        args.photometric, args.workers, args.frames_per_patient)
    logger.info(
        "wrote %d SYNTHETIC rectal ERUS patients to %s in %.1fs (good-response prevalence %.2f); latent oracle "
        "AUROC %s, generating-variables AUROC %s, observable logistic out-of-fold AUROC %s (by group %s)",
        len(manifest["cases"]), args.out, time.perf_counter() - start, manifest["prevalence"],
        manifest["latent_oracle_auroc"], manifest["generating_variables_auroc"],
        manifest["observable_logistic_oof_auroc"], manifest["observable_logistic_oof_auroc_by_group"],
    )


if __name__ == "__main__":
    main()
