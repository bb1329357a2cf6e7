"""Inference for SMuRF: a head-and-neck CT, its tumor and node masks and, when there is one, the H&E slide ->
the disease-free-survival risk (log-hazard), its risk group, the probability of high grade, and integrated-
gradients explanations.

The hooks of :class:`~oncofusion.predictor.PredictorTemplate`:

- locate: the CT (primary image), the regions and the slide. The regions come from the first of
  (1) a label mask sent with the request (value 1 primary tumor, 2 lymph nodes), (2) the ``region_label``
  image (the same two-valued label, e.g. the segmentation saved on the study: segment 1 the tumor,
  segment 2 the nodes), (3) the ``tumor_mask`` and ``node_mask`` images (any value > 0 inside; no node
  mask = no nodes, N0), (4) the label saved on the study (tag ``final``: the two segments a user drew in
  3D Slicer and saved with "Submit Label", in the same two values). An image not sent is read from the
  path its name gives in the study's sidecar (``"tumor_mask": "labels/tumor/<case>.nii.gz"``, under
  ``mask_dir``): the masks live beside the studies, not among them. The slide is a path in the ``slide`` field (the study's sidecar, or the request, under
  ``slide_dir``), checked to exist and to open with OpenSlide; its tumour outline is the ``slide_annotation``
  GeoJSON, or the slide's sibling ``<name>.geojson``.
- model inputs: the config's ``preprocessing`` (the inference sub-volume transforms, which must keep their
  inputs for the overlay) gives ``ct_tumor`` and ``ct_nodes``; the slide becomes its fragment grids of
  region embeddings (:func:`~oncofusion.data.slide_grids.slide_fragment_grids`, cached on disk).
- forward: with a slide the fusion ensemble (CT tumor + CT nodes + slide); **without a slide the
  radiology-only ensemble** (CT tumor + CT nodes), and the answer says so (``variant``, summary).
- result: ``risk_score`` (mean over fold models of the log-hazard), ``risk_group`` (low / intermediate /
  high at the variant's tertile cut-offs of the training cohort's risks; "no cut-offs" without them),
  ``grade_probability`` (mean of ``sigmoid(grade logit)``), the one-line ``summary``, and integrated
  gradients of the log-hazard (:mod:`~oncofusion.models.opscc_smurf.explain`): each input's share, a PNG
  heatmap of the slide's regions over its thumbnail.
- draw: the most attributed CT voxels inside the regions' boxes as label value 1 on the CT grid (3D
  Slicer imports value 1 only), named after the summary; with explanations off, the regions themselves.

Two models, not one with a "missing slide" input: SMuRF's fusion model never saw a patient without a
slide, so zeros in place of the slide grid would be a made-up input; the bi-modal radiology model of
the paper is trained for exactly that case.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from oncofusion.contract import ImageInput, InputSpec, InvalidRequest, Roi
from oncofusion.data.slide_grids import plan_fragment_grids, slide_fragment_grids
from oncofusion.ensemble import Ensemble
from oncofusion.io.readers import read_volume
from oncofusion.io.slides import open_slide
from oncofusion.models.opscc_smurf.explain import (
    DEFAULT_STEPS,
    DEFAULT_TOP_FRACTION,
    ct_overlay,
    grid_heatmap_png,
    integrated_gradients,
    log_hazard_function,
    region_scores,
    slide_heatmap_png,
)
from oncofusion.models.opscc_smurf.network import CT_MODALITIES, GRADE_LOGIT, LOG_HAZARD, SmurfNet
from oncofusion.models.opscc_smurf.subvolumes import subvolume_transforms
from oncofusion.predictor import WARM_UP_SHAPE, Context, PredictorTemplate, run_preprocessing, safe_file_name

logger = logging.getLogger(__name__)

#: the request / sidecar fields naming the slide and its tumour outline (paths on the server)
SLIDE_FIELD = "slide"
ANNOTATION_FIELD = "slide_annotation"
#: the optional image inputs holding the regions; a sidecar field of the same name gives the image's path
REGION_LABEL_INPUT, TUMOR_INPUT, NODES_INPUT = "region_label", "tumor_mask", "node_mask"
#: the study's saved label (the datastore tag MONAI Label's clients save under), read when nothing else is
SAVED_LABEL_INPUT, SAVED_LABEL_TAG = "saved_label", "final"
REGION_INPUTS = (REGION_LABEL_INPUT, TUMOR_INPUT, NODES_INPUT)
#: values of the two-valued region label
TUMOR_VALUE, NODES_VALUE = 1, 2
FUSION, RADIOLOGY = "fusion", "radiology-only"
RISK_GROUPS = ("low", "intermediate", "high")
NO_CUTOFFS = "no cut-offs"
#: the keys the sub-volume transforms read and write (their defaults)
IMAGE_KEY, TUMOR_KEY, NODES_KEY = "image", "tumor_mask", "node_mask"
BOX_SUFFIX = "_box"
#: slide_fragment_grids' planning arguments (the heatmap re-plans with the same ones)
PLANNING_KEYS = ("region_size", "target_mpp", "grid_size", "min_tissue", "min_tumor_overlap", "thumbnail_size")
GRID_KEYS = (*PLANNING_KEYS, "batch_size", "num_workers")


def default_inputs() -> InputSpec:
    """The CT, the optional region images, and the slide fields (free text, so that no viewer form keeps a
    previous patient's slide: a slide comes from the study's sidecar or an explicit request)."""
    return InputSpec(
        images=(
            ImageInput("image", reader="volume", description="head-and-neck CT in HU"),
            ImageInput(REGION_LABEL_INPUT, reader="volume", required=False,
                       description="region label on the CT grid: 1 primary tumor, 2 metastatic lymph nodes"),
            ImageInput(TUMOR_INPUT, reader="volume", required=False,
                       description="primary tumor mask on the CT grid (any value > 0)"),
            ImageInput(NODES_INPUT, reader="volume", required=False,
                       description="metastatic lymph-node mask on the CT grid (any value > 0); none: N0"),
            ImageInput(SAVED_LABEL_INPUT, reader="volume", required=False, saved_label=SAVED_LABEL_TAG,
                       description="the study's saved label (1 primary tumor, 2 metastatic lymph nodes), "
                                   "read when no other region input is given"),
        ),
        prompt=(),
        texts=(SLIDE_FIELD, ANNOTATION_FIELD),
    )


# -- risk groups ----------------------------------------------------------------------------------------
def _cutoff_pair(value: Any, where: str) -> tuple[float, float]:
    if isinstance(value, Mapping):
        value = value.get("thresholds", value.get("cutoffs"))
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"risk cut-offs {where} must be two numbers [low/intermediate, intermediate/high], "
                         f"got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"risk cut-offs {where} must be finite and ascending, got {[low, high]}")
    return low, high


def load_risk_cutoffs(source: str | os.PathLike | Mapping | Sequence[float] | None) -> dict[str, tuple[float, float]]:
    """Tertile cut-offs of the log-hazard per variant: ``{"fusion": (t1, t2), "radiology-only": (t1, t2)}``.

    ``source``: None (none); a JSON file (absent: none, logged); a mapping of variant -> ``[t1, t2]`` or
    ``{"thresholds": [t1, t2]}`` (the survival report's ``risk_groups`` entry; ``"radiology"`` is read as
    ``radiology-only``); or one ``[t1, t2]`` / ``{"thresholds": ...}``, which is the fusion model's. Each
    variant has its own: the two models' log-hazards are on different scales.
    """
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            logger.warning("no risk-group cut-offs at %s: answers give no risk group", path.name)
            return {}
        source = json.loads(path.read_text())
    if isinstance(source, Mapping) and not ({"thresholds", "cutoffs"} & set(source)):
        aliases = {"radiology": RADIOLOGY, "radiology_only": RADIOLOGY}
        cutoffs = {aliases.get(str(k), str(k)): _cutoff_pair(v, f"of '{k}'") for k, v in source.items()}
        unknown = sorted(set(cutoffs) - {FUSION, RADIOLOGY})
        if unknown:
            raise ValueError(f"risk cut-offs for unknown variant(s) {unknown}: use '{FUSION}' and '{RADIOLOGY}'")
        return cutoffs
    return {FUSION: _cutoff_pair(source, "")}


def cutoffs_of_model_dirs(model_dirs: Mapping[str, str | os.PathLike]) -> dict[str, tuple[float, float]]:
    """Each variant's cut-offs from the ``risk_groups.json`` its evaluation wrote beside its fold weights
    (``variant -> model folder``); a folder without one gives that variant no risk group (logged)."""
    found = {}
    for variant, folder in model_dirs.items():
        path = Path(folder) / "risk_groups.json"
        if path.is_file():
            found[variant] = json.loads(path.read_text())
        else:
            logger.warning("no risk-group cut-offs for %s (%s absent): run evaluate.json", variant, path.name)
    return load_risk_cutoffs(found) if found else {}


def risk_group(risk: float, cutoffs: tuple[float, float] | None) -> str:
    """low / intermediate / high; a risk equal to a cut-off joins the lower group (as the evaluation's
    :func:`~oncofusion.evaluation.survival.risk_groups`); "no cut-offs" without them."""
    if cutoffs is None:
        return NO_CUTOFFS
    return RISK_GROUPS[int(np.searchsorted(np.asarray(cutoffs), risk, side="left"))]


# -- regions --------------------------------------------------------------------------------------------
def _affine_of(image: Any) -> torch.Tensor:
    affine = getattr(image, "affine", None)
    return torch.eye(4, dtype=torch.float64) if affine is None else torch.as_tensor(affine, dtype=torch.float64)


def split_region_label(label: Any, affine: Any, what: str) -> tuple[MetaTensor, MetaTensor | None]:
    """A two-valued label (``(1, X, Y, Z)`` or ``(X, Y, Z)``) -> (tumor mask, node mask or None when it holds
    no value 2), on the label's grid (``affine``)."""
    array = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label)
    array = array[None] if array.ndim == 3 else array
    values = {int(v) for v in np.unique(array) if v != 0}
    unknown = sorted(values - {TUMOR_VALUE, NODES_VALUE})
    if unknown or not np.allclose(array, np.rint(array)):
        raise InvalidRequest(
            f"{what} holds values {unknown or 'that are not whole numbers'}: give the primary tumor as "
            f"{TUMOR_VALUE} and the lymph nodes as {NODES_VALUE} (two segments, in this order), 0 elsewhere")
    affine = _affine_of(affine) if not torch.is_tensor(affine) else affine.double()

    def mask(value: int) -> MetaTensor:
        return MetaTensor(torch.as_tensor(array == value, dtype=torch.uint8), affine=affine)

    return mask(TUMOR_VALUE), mask(NODES_VALUE) if NODES_VALUE in values else None




class SmurfPredictor(PredictorTemplate):
    """CT + tumor/node masks (+ slide) -> DFS risk, risk group, grade probability, explanations, overlay.

    Args:
        ensemble: the fusion fold models (:class:`SmurfNet` reading ``ct_tumor``, ``ct_nodes``, ``wsi``),
            aggregation ``"mean"`` (raw ``[grade logit, log-hazard]``).
        radiology_ensemble: the radiology-only fold models (``ct_tumor``, ``ct_nodes``), the same aggregation.
        preprocessing: record ``{image, tumor_mask, node_mask}`` -> ``ct_tumor``, ``ct_nodes`` plus the 1 mm
            ``image`` and the boxes (inference :func:`subvolume_transforms` with ``keep_inputs=True``, the
            default).
        region_encoder: the slide regions' encoder (the one the training grids were made with).
        slide_grid: :func:`slide_fragment_grids` arguments (``region_size``, ``target_mpp``, ``grid_size``,
            ``min_tissue``, ``min_tumor_overlap``, ``thumbnail_size``, ``batch_size``, ``num_workers``).
        grid_cache_dir: where the slides' grids are cached (None: recomputed per request).
        risk_cutoffs: tertile cut-offs per variant (see :func:`load_risk_cutoffs`), or a JSON file of them.
        slide_dir: the folder a relative ``slide`` (and ``slide_annotation``) path is read from; a path that
            leaves it (``..``, absolute) is refused. Links inside it are followed: the studies folder may link
            to where the files are kept. None: paths are taken as given.
        mask_dir: the same for the region images named by path in the study's sidecar (``region_label``,
            ``tumor_mask``, ``node_mask`` fields), e.g. the studies folder.
        explain: compute integrated gradients (the overlay and the heatmap); off: the regions are drawn.
        integration_steps: integrated-gradients steps (small on CPU; completeness improves with more).
        top_fraction: share of the in-box voxels (1 mm grid) the overlay marks.
        explanations_dir: where slide heatmap PNGs go (their paths are in the answer); None writes none.
    """

    def __init__(
        self,
        ensemble: Ensemble,
        radiology_ensemble: Ensemble,
        preprocessing: Callable[[dict], dict] | None = None,
        region_encoder: nn.Module | str = "cnn",
        slide_grid: Mapping[str, Any] | None = None,
        grid_cache_dir: str | os.PathLike | None = None,
        risk_cutoffs: str | os.PathLike | Mapping | Sequence[float] | None = None,
        inputs: InputSpec | None = None,
        slide_dir: str | os.PathLike | None = None,
        mask_dir: str | os.PathLike | None = None,
        explain: bool = True,
        integration_steps: int = DEFAULT_STEPS,
        top_fraction: float = DEFAULT_TOP_FRACTION,
        explanations_dir: str | os.PathLike | None = None,
        model_version: str = "",
        device: torch.device | str = "cpu",
    ):
        self._check_ensemble(ensemble, FUSION, ("ct_tumor", "ct_nodes", "wsi"))
        self._check_ensemble(radiology_ensemble, RADIOLOGY, CT_MODALITIES)
        super().__init__(ensemble, inputs or default_inputs(), score_key="risk_score", model_version=model_version,
                         device=device)
        self.ensembles = {FUSION: ensemble, RADIOLOGY: radiology_ensemble}
        self.preprocessing = preprocessing or subvolume_transforms(False, keep_inputs=True)
        if isinstance(region_encoder, str):
            from oncofusion.networks.region_encoders import region_encoder as build_encoder

            region_encoder = build_encoder(region_encoder)
        self.region_encoder = region_encoder
        grid = dict(slide_grid or {})
        unknown = sorted(set(grid) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"slide_grid has unknown argument(s) {unknown}: use {list(GRID_KEYS)}")
        self.slide_grid = grid
        self.grid_cache_dir = grid_cache_dir
        self.risk_cutoffs = load_risk_cutoffs(risk_cutoffs)
        self.slide_dir = Path(slide_dir).resolve() if slide_dir else None
        self.mask_dir = Path(mask_dir).resolve() if mask_dir else None
        self.explain = bool(explain)
        self.integration_steps = int(integration_steps)
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
        self.top_fraction = float(top_fraction)
        self.explanations_dir = Path(explanations_dir) if explanations_dir else None
        self.config_options: dict[str, Any] = {}

    @staticmethod
    def _check_ensemble(ensemble: Ensemble, variant: str, modalities: Sequence[str]) -> None:
        network = ensemble.models[0] if len(ensemble.models) else None
        if not isinstance(network, SmurfNet) or tuple(network.modalities) != tuple(modalities):
            found = getattr(network, "modalities", type(network).__name__)
            raise ValueError(f"the {variant} ensemble must hold SmurfNet({list(modalities)}) models, got {found}")
        if ensemble.aggregation == "mean_probability":
            raise ValueError(f"the {variant} ensemble must keep the raw outputs (aggregation 'mean'), not softmax "
                             "them: column 0 is a grade logit, column 1 a log-hazard")

    # -- locate ---------------------------------------------------------------------------------------
    def locate(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
               fold: int | None) -> Context:
        """The CT, the two regions (from a label or two masks) and the checked slide path (or None)."""
        primary = self.inputs.primary.name
        ct = images.get(primary)
        if ct is None:
            raise InvalidRequest(f"missing image input {primary}: send the CT", 400)
        images = self.recorded_regions(images, fields)
        context = Context(images=images, roi=roi, fields=fields, fold=fold)
        tumor, nodes, source, warnings = self.region_masks(images, roi, ct)
        slide = self.slide_path(fields)
        annotation = self.annotation_path(fields, slide) if slide is not None else None
        context.extras.update(tumor=tumor, nodes=nodes, regions_from=source, slide=slide, annotation=annotation,
                              variant=FUSION if slide is not None else RADIOLOGY, warnings=warnings)
        return context

    def recorded_regions(self, images: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
        """``images`` plus each region image not sent that the study's sidecar names by path (a field named
        after the input, relative to ``mask_dir``)."""
        found = dict(images)
        for name in REGION_INPUTS:
            if found.get(name) is None:
                path = self._path_field(fields, name, self.mask_dir, "mask folder")
                if path is not None:
                    found[name] = read_volume(path, what=name)
        return found

    def region_masks(self, images: Mapping[str, Any], roi: Roi | None, ct: Any
                     ) -> tuple[Any, Any, str, list[str]]:
        """(tumor mask, node mask or None, where they came from, warnings): the request's label, else the
        ``region_label`` image, else the ``tumor_mask`` and ``node_mask`` images, else the study's saved
        label."""
        given = {"request label": roi is not None and roi.mask is not None,
                 f"{REGION_LABEL_INPUT} image": images.get(REGION_LABEL_INPUT) is not None,
                 f"{TUMOR_INPUT} image": images.get(TUMOR_INPUT) is not None,
                 f"{NODES_INPUT} image": images.get(NODES_INPUT) is not None}
        saved = f"saved '{SAVED_LABEL_TAG}' label"
        labels = {"request label": None, f"{REGION_LABEL_INPUT} image": images.get(REGION_LABEL_INPUT),
                  saved: images.get(SAVED_LABEL_INPUT)}
        warnings: list[str] = []
        source = next((name for name in ("request label", f"{REGION_LABEL_INPUT} image") if given[name]), None)
        if source is None and not given[f"{TUMOR_INPUT} image"] and labels[saved] is not None:
            source = saved
        if source is not None:
            label, affine = (roi.mask, _affine_of(ct)) if source == "request label" else (
                labels[source], _affine_of(labels[source]))
            tumor, nodes = split_region_label(label, affine, f"the regions' label ({source})")
            ignored = [name for name, present in given.items() if present and name != source]
            if ignored:
                warnings.append(f"regions read from the {source}; {', '.join(ignored)} not used")
            if nodes is None:
                warnings.append(f"the {source} holds no value {NODES_VALUE}: read as a patient without "
                                "metastatic lymph nodes (N0)")
            return tumor, nodes, source, warnings
        if not given[f"{TUMOR_INPUT} image"]:
            raise InvalidRequest(
                f"no tumor mask: draw the regions on the CT as two segments ({TUMOR_VALUE} primary tumor, {NODES_VALUE} "
                f"lymph nodes) and save them on the study (Submit Label), or give a '{REGION_LABEL_INPUT}' image, or "
                f"'{TUMOR_INPUT}' (and '{NODES_INPUT}') images, or name their files in the study's sidecar", 400)
        return images[TUMOR_INPUT], images.get(NODES_INPUT), f"{TUMOR_INPUT} + {NODES_INPUT} images", warnings

    def _path_field(self, fields: Mapping[str, Any], name: str, folder: Path | None,
                    folder_name: str) -> Path | None:
        """The field ``name`` as an existing path under ``folder`` (None: as given); None when blank."""
        value = fields.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a path, got {type(value).__name__} {str(value)[:40]!r}")
        if not value.strip():
            return None
        path = Path(value.strip()).expanduser()
        if folder is not None:
            # normalised, not resolved: links inside the folder are the operator's to place, and the
            # path checked is the path opened
            path = Path(os.path.normpath(folder / path))
            if not path.is_relative_to(folder):
                raise InvalidRequest(f"{name} '{value}' lies outside the {folder_name}: give a path inside it")
        if not path.is_file() and not path.is_dir():
            raise InvalidRequest(f"{name} '{value}' not found: check the path in the study's sidecar or the request",
                                 404)
        return path

    def slide_path(self, fields: Mapping[str, Any]) -> Path | None:
        """The ``slide`` field as a checked path (exists, opens with OpenSlide), None when there is none."""
        path = self._path_field(fields, SLIDE_FIELD, self.slide_dir, "slide folder")
        if path is None:
            return None
        try:
            with open_slide(path):
                pass
        except InvalidRequest as error:
            raise InvalidRequest(f"slide '{fields[SLIDE_FIELD]}' cannot be read: {error}", error.status_code) from None
        return path

    def annotation_path(self, fields: Mapping[str, Any], slide: Path) -> Path | None:
        """The tumour outline: the ``slide_annotation`` field, else ``<slide>.geojson`` beside the slide."""
        given = self._path_field(fields, ANNOTATION_FIELD, self.slide_dir, "slide folder")
        if given is not None:
            return given
        sibling = slide.with_suffix(".geojson")
        return sibling if sibling.is_file() else None

    # -- inputs and forward ---------------------------------------------------------------------------
    def model_inputs(self, context: Context) -> tuple[Any, ...]:
        """``(ct_tumor, ct_nodes[, wsi])``, each with a batch axis; ``wsi`` ``(1, n, 192, S, S)``."""
        ct = context.images[self.inputs.primary.name]
        data = {IMAGE_KEY: ct, TUMOR_KEY: context.extras["tumor"], NODES_KEY: context.extras["nodes"]}
        out = run_preprocessing(self.preprocessing, data)
        context.extras["preprocessed"] = out
        tensors = [torch.as_tensor(out[key]).float()[None].to(self.device) for key in CT_MODALITIES]
        if context.extras["slide"] is None:
            return tuple(tensors)
        grids = self.slide_grids(context.extras["slide"], context.extras["annotation"], context.fields)
        context.extras["slide_grids"] = grids
        wsi = torch.from_numpy(np.ascontiguousarray(grids)).permute(0, 3, 1, 2)[None].float().to(self.device)
        return (*tensors, wsi)

    def slide_grids(self, slide: Path, annotation: Path | None, fields: Mapping[str, Any]) -> np.ndarray:
        """The slide's ``(n, S, S, 192)`` fragment grids (cached); no fragment left is the user's to fix."""
        try:
            return slide_fragment_grids(slide, self.region_encoder, annotation=annotation, cache_dir=self.grid_cache_dir,
                                        progress=False, **self.slide_grid)
        except ValueError as error:
            if isinstance(error, InvalidRequest):
                raise
            raise InvalidRequest(f"slide '{fields[SLIDE_FIELD]}': {error}", 422) from None

    def forward(self, model_inputs: Sequence[Any], context: Context) -> torch.Tensor:
        """``(M, 1, 2)``: each fold model's [grade logit, log-hazard] of the variant the inputs allow."""
        return self.ensembles[context.extras["variant"]].member_outputs(*model_inputs, fold=context.fold)

    # -- result ---------------------------------------------------------------------------------------
    def result(self, output: torch.Tensor, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        variant = context.extras["variant"]
        members = output[:, 0].float().cpu()
        log_hazards = members[:, LOG_HAZARD].numpy()
        grades = torch.sigmoid(members[:, GRADE_LOGIT]).numpy()
        risk = float(log_hazards.mean())
        cutoffs = self.risk_cutoffs.get(variant)
        out = context.extras["preprocessed"]
        result: dict[str, Any] = {
            "risk_score": round(risk, 4),
            "risk_group": risk_group(risk, cutoffs),
            "risk_cutoffs": None if cutoffs is None else [round(c, 4) for c in cutoffs],
            "grade_probability": round(float(grades.mean()), 4),
            "variant": variant,
            "fold_risk_scores": [round(float(v), 4) for v in log_hazards],
            "fold_grade_probabilities": [round(float(v), 4) for v in grades],
            "regions": {
                "from": context.extras["regions_from"],
                "tumor_box_1mm": _box(out.get(f"{TUMOR_KEY}{BOX_SUFFIX}")),
                "nodes_box_1mm": _box(out.get(f"{NODES_KEY}{BOX_SUFFIX}")),
                "nodes_present": context.extras["nodes"] is not None
                and out.get(f"{NODES_KEY}{BOX_SUFFIX}") is not None,
            },
            "slide": None if context.extras["slide"] is None else {
                "name": context.extras["slide"].name,
                "annotation": None if context.extras["annotation"] is None else context.extras["annotation"].name,
                "fragments": int(context.extras["slide_grids"].shape[0]),
                "grid_size": int(context.extras["slide_grids"].shape[1]),
            },
        }
        warnings = list(context.extras["warnings"])
        if variant == RADIOLOGY:
            warnings.append("no slide: the radiology-only model answered (give the study's slide as 'slide' in "
                            "its sidecar for the fusion model)")
        elif context.extras["annotation"] is None:
            warnings.append("the slide has no tumour outline: every tissue fragment was used")
        if self.explain:
            result["explanation"] = self.explanation(model_inputs, context)
        if warnings:
            result["warnings"] = warnings
        result["summary"] = self.summarize(result)
        return result

    def explanation(self, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        """Integrated gradients of the members' mean log-hazard from all-zero inputs: each input's sum, the
        CT overlay (kept for :meth:`draw`) and the slide heatmap PNG."""
        variant = context.extras["variant"]
        start = time.perf_counter()
        members = self.ensembles[variant].members(context.fold)
        attributions, delta, output, baseline = integrated_gradients(
            log_hazard_function(members), model_inputs, self.integration_steps)
        names = (*CT_MODALITIES, "wsi")[: len(model_inputs)]
        answer: dict[str, Any] = {
            "method": f"integrated gradients (captum, {self.integration_steps} steps) of the mean log-hazard of "
                      f"{len(members)} fold model(s), from all-zero inputs (air CT, empty slide grid)",
            "log_hazard": round(output, 4),
            "baseline_log_hazard": round(baseline, 4),
            "convergence_delta": round(delta, 4),
            "contributions": {name: round(float(a.sum()), 4) for name, a in zip(names, attributions, strict=True)},
        }
        context.extras["overlay"], answer["ct_overlay"] = self._overlay(attributions, context)
        if variant == FUSION:
            answer["slide_heatmap_png"] = self._heatmap(attributions[2], context)
        answer["seconds"] = round(time.perf_counter() - start, 2)
        return answer

    def _overlay(self, attributions: Sequence[torch.Tensor], context: Context) -> tuple[np.ndarray, dict]:
        out = context.extras["preprocessed"]
        resampled = out.get(IMAGE_KEY)
        if resampled is None or f"{TUMOR_KEY}{BOX_SUFFIX}" not in out:
            raise ValueError("the preprocessing dropped the resampled CT and the boxes the overlay needs: build it "
                             "with subvolume_transforms(train=False, keep_inputs=True)")
        ct = context.images[self.inputs.primary.name]
        boxes = {"ct_tumor": out[f"{TUMOR_KEY}{BOX_SUFFIX}"], "ct_nodes": out.get(f"{NODES_KEY}{BOX_SUFFIX}")}
        values = {name: a[0].cpu().numpy() for name, a in zip(CT_MODALITIES, attributions, strict=False)}
        label, info = ct_overlay(values, boxes, tuple(resampled.shape[1:]), _affine_of(resampled).numpy(),
                                 tuple(ct.shape[1:]), _affine_of(ct).numpy(), self.top_fraction)
        return label, {**info, "label_value": 1,
                       "what": "CT voxels whose |attribution| is in the top fraction inside the regions' boxes"}

    def _heatmap(self, attribution: torch.Tensor, context: Context) -> str | None:
        if self.explanations_dir is None:
            return None
        scores = region_scores(attribution)
        case = context.fields.get("case_id") or uuid.uuid4().hex
        path = self.explanations_dir / safe_file_name(f"{case}_slide_integrated_gradients.png")
        planning = {k: v for k, v in self.slide_grid.items() if k in PLANNING_KEYS}
        with open_slide(context.extras["slide"]) as slide:
            plan = plan_fragment_grids(slide, annotation=context.extras["annotation"], **planning)
            if plan.n_fragments == scores.shape[0] and plan.grid_size == scores.shape[1]:
                return str(slide_heatmap_png(scores, slide, plan, path,
                                             planning.get("thumbnail_size", 1024)))
        logger.warning("slide plan does not match its grids: drawing the grids themselves")
        return str(grid_heatmap_png(scores, path))

    # -- draw and summary -----------------------------------------------------------------------------
    def draw(self, result: dict[str, Any], output: Any, model_inputs: Sequence[Any],
             context: Context) -> tuple[np.ndarray | None, dict[str, int]]:
        """The overlay (value 1) on the CT grid; without explanations the two regions (value 1)."""
        label = context.extras.get("overlay")
        if label is None:
            regions = [context.extras["tumor"], context.extras["nodes"]]
            label = np.any([np.asarray(m.detach().cpu() if hasattr(m, "detach") else m)[0] > 0
                            for m in regions if m is not None], axis=0).astype(np.uint8)
        return label, {result["summary"]: 1}

    def summarize(self, result: Mapping[str, Any]) -> str:
        """E.g. ``DFS risk high (0.83), high grade p=0.71`` (+ ``, radiology only: no slide``)."""
        risk = float(result["risk_score"])
        group = result["risk_group"]
        text = f"DFS risk {group} ({risk:.2f})" if group != NO_CUTOFFS else f"DFS log-hazard {risk:.2f} ({NO_CUTOFFS})"
        text += f", high grade p={float(result['grade_probability']):.2f}"
        return text + (", radiology only: no slide" if result["variant"] == RADIOLOGY else "")

    # -- warm-up --------------------------------------------------------------------------------------
    def warm_up_request(self) -> tuple[dict[str, Any], Roi | None, dict[str, Any]]:
        """A blank CT with a small tumor cube and no slide: a radiology-only prediction (the slide path has
        no neutral stand-in)."""
        affine = torch.eye(4, dtype=torch.float64)
        mask = torch.zeros(1, *WARM_UP_SHAPE, dtype=torch.uint8)
        centre = tuple(slice(s // 2 - 2, s // 2 + 2) for s in WARM_UP_SHAPE)
        mask[(slice(None), *centre)] = 1
        images = {self.inputs.primary.name: MetaTensor(torch.zeros(1, *WARM_UP_SHAPE), affine=affine),
                  TUMOR_INPUT: MetaTensor(mask, affine=affine)}
        return images, None, {}


def _box(box: Any) -> list[list[int]] | None:
    return None if box is None else np.asarray(box).astype(int).tolist()
