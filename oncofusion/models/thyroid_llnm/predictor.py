"""Inference for LLNM-Net: a thyroid ultrasound frame, the nodule prompt, the report and demographics ->
the probability of lateral lymph-node metastasis (LLNM), with explanations.

The hooks of :class:`~oncofusion.predictor.PredictorTemplate`:

- locate: the nodule as a mask on the frame (box, mask, or a disc of ``click_radius_mm`` at the last
  click) and the pixel size (the frame's ultrasound-region calibration, else a ``pixel_size_mm`` option);
- model inputs: the config's ``preprocessing`` (the transforms training uses) gives the square nodule
  crop and the scalar values (aspect ratio, echogenicity contrast, age, sex; NaN = missing); the report
  is tokenised by the network's own tokenizer;
- result: the LLNM probability (mean over fold models of ``sigmoid(logit)``), the class, each fold's
  probability, the measured morphology, the frame and its calibration source;
- draw: per-scalar contributions and per-token report attributions (integrated gradients of the LLNM
  log-odds), attention rollout and Grad-CAM++ over the image patches, and a label on the frame grid
  whose value 1 is the part of the nodule where the ``overlay_method`` map is high, named after the
  one-line summary.

Also here: the ablation variants of the network (:func:`build_network`) and prediction over a manifest
with each case's box (:func:`predict_records`); the ablation report is
:func:`oncofusion.evaluation.comparison.write_ablation_report`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from oncofusion.contract import ImageInput, InputSpec, InvalidRequest, Prediction, Roi
from oncofusion.data.clinical import ClinicalSchema
from oncofusion.ensemble import Ensemble
from oncofusion.evaluation.predict import record_box, record_images
from oncofusion.models.thyroid_llnm.explain import (
    attention_rollout,
    grad_cam_pp,
    patch_relevance,
    scalar_contributions,
    sentence_attributions,
    token_contributions,
    word_attributions,
)
from oncofusion.models.thyroid_llnm.morphology import (
    CAPSULE_RISK_MM,
    DEFAULT_CLICK_RADIUS_MM,
    frame_spacing_mm,
    roi_mask,
    third_of,
)
from oncofusion.models.thyroid_llnm.network import LLNMNet
from oncofusion.models.thyroid_llnm.transforms import SPACING_KEY, uncalibrated
from oncofusion.predictor import (
    Context,
    PredictorTemplate,
    last_click,
    radius_option,
    run_preprocessing,
    text_option,
)

logger = logging.getLogger(__name__)

CLICK_RADIUS_OPTION = "click_radius_mm"
PIXEL_SIZE_OPTION = "pixel_size_mm"
#: the input streams each ablation keeps
VARIANTS: dict[str, tuple[str, ...]] = {
    "fusion": ("image", "text", "scalars"),
    "image_only": ("image",),
    "text_only": ("text",),
    "scalars_only": ("scalars",),
}
#: how reports and the model card name each variant
VARIANT_NAMES: dict[str, str] = {
    "fusion": "LLNM-Net (image + report + scalars)",
    "image_only": "image only",
    "text_only": "report only",
    "scalars_only": "scalars only (morphology + age, sex)",
}
#: how a scalar is named in the one-line summary
SCALAR_LABELS = {"aspect_ratio": "aspect ratio", "echogenicity_contrast": "echo contrast", "width_mm": "width",
                 "depth_mm": "depth", "capsule_distance_mm": "capsule distance", "lobe_position": "lobe position"}
#: the optional image input holding the thyroid lobe mask
LOBE_INPUT = "lobe_mask"
#: words that turn the next one into its absence ("no microcalcifications"), for the summary
NEGATIONS = frozenset({"no", "not", "without", "absent", "neither", "nor"})
#: words too common to name a finding in the summary
STOPWORDS = frozenset({"a", "an", "the", "of", "in", "on", "at", "is", "are", "and", "or", "with", "to", "by", "x",
                       "mm", "this", "that", "there", "it", "its", "be", "as", "for", "from"})
#: the image maps an overlay can show, their result keys, and how each is computed
OVERLAY_KEYS = {"attention_rollout": "attention", "grad_cam_pp": "grad_cam_pp"}
OVERLAY_METHODS = {
    "attention_rollout": "attention rollout (residual-mixed, head-averaged, through every fusion and joint layer) "
                         "of the mean-pooled output over the image patches",
    "grad_cam_pp": "Grad-CAM++ of the LLNM log-odds over the image patch tokens of the final joint tokens",
}
FRAME_KEYS = ("frame_index", "frame_choice", "num_frames", "spacing_source", "spacing_unit",
              "photometric_interpretation", "modality", "ultrasound_region", "image_mode")


def build_network(network_args: Mapping[str, Any], variant: str = "fusion") -> LLNMNet:
    """LLNM-Net with the hyper-parameters ``network_args`` (the config's), restricted to one of
    :data:`VARIANTS`: ``image_only`` drops the report and the scalars, ``text_only`` the image and the
    scalars, ``scalars_only`` the image and the report."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {list(VARIANTS)}")
    streams = VARIANTS[variant]
    kwargs = dict(network_args)
    kwargs["use_image"] = "image" in streams
    if "text" not in streams:
        kwargs["text_encoder"] = None
    if "scalars" not in streams:
        kwargs.update(scalar_names=(), scalar_center=None, scalar_scale=None)
    return LLNMNet(**kwargs)


def share_frozen_text_encoder(models: Sequence[torch.nn.Module]) -> None:
    """Let fold models hold one frozen report encoder between them instead of one copy each.

    A frozen encoder is the same pretrained weights in every fold model (training does not change it and
    fold checkpoints do not hold it), so five copies in memory would be four too many (~90 MB each for
    MiniLM). An encoder that trained (LoRA, full) is left alone.
    """
    towers = [getattr(m, "text_tower", None) for m in models]
    if not towers or towers[0] is None:
        return
    for model, tower in zip(models[1:], towers[1:], strict=True):
        if tower is not None and not any(p.requires_grad for p in (*tower.parameters(), *towers[0].parameters())):
            model.text_tower = towers[0]


def batch_keys(variant: str, report_key: str = "report", scalars_key: str = "scalars") -> dict[str, str]:
    """The network's keyword inputs in a training batch of ``variant``: keyword -> batch key (the image is
    the batch's ``image``, passed first)."""
    streams = VARIANTS[variant]
    return {**({"input_ids": report_key} if "text" in streams else {}),
            **({"scalars": scalars_key} if "scalars" in streams else {})}


def _number_pair(value: Any, name: str) -> tuple[float, float] | None:
    """``"0.1"``, ``"0.1,0.12"``, ``0.1`` or ``[0.1, 0.12]`` -> (x, y) in mm; blank -> None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.replace(";", ",").split(",") if isinstance(value, str) else (
        list(value) if isinstance(value, list | tuple) else [value])
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} {value!r} is not a number of mm (or two, x,y)") from None
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or not all(math.isfinite(n) and 0 < n <= 10 for n in numbers):
        raise InvalidRequest(f"{name} {value!r} must be one or two pixel sizes in mm, each in (0, 10]")
    return numbers[0], numbers[1]


class ThyroidLLNMPredictor(PredictorTemplate):
    """Frame + nodule prompt + report + age/sex -> LLNM probability, explanations and an overlay label.

    ``preprocessing``: the config's transforms from ``{"image": frame, "roi_mask", "spacing_mm", fields...}``
    to the crop (``image``), the scalar values (``scalars``), the measurements (``nodule_morphology``) and
    the crop side (``crop_side_mm``). ``schema``: the clinical fields (validated, offered in ``/info``).
    The network's variant (which of image, report, scalars it reads) is read from the fold models.
    """

    def __init__(
        self,
        ensemble: Ensemble,
        preprocessing: Callable[[dict], dict],
        schema: ClinicalSchema,
        inputs: InputSpec | None = None,
        class_names: Sequence[str] = ("no LLNM", "LLNM"),
        positive_class: int = 1,
        score_key: str = "llnm_probability",
        report_key: str = "report",
        variant_name: str | None = None,
        click_radius_mm: float = DEFAULT_CLICK_RADIUS_MM,
        max_click_radius_mm: float = 30.0,
        integration_steps: int = 32,
        top_tokens: int = 8,
        attention_threshold: float = 0.6,
        overlay_within: str = "roi",
        overlay_method: str = "attention_rollout",
        summary_items: int = 3,
        explain: bool = True,
        model_version: str = "",
        device: torch.device | str = "cpu",
    ):
        network = ensemble.models[0]
        if not isinstance(network, LLNMNet) or network.num_classes != 1:
            raise ValueError("the LLNM predictor reads one LLNM logit: build LLNMNet with num_classes=1")
        if overlay_within not in ("roi", "crop"):
            raise ValueError(f"overlay_within must be 'roi' or 'crop', got {overlay_within!r}")
        if overlay_method not in OVERLAY_METHODS:
            raise ValueError(f"overlay_method must be one of {sorted(OVERLAY_METHODS)}, got {overlay_method!r}")
        share_frozen_text_encoder(ensemble.models)
        self.network = network
        self.uses_image = network.patch_embedding is not None
        self.uses_text = network.text_tower is not None
        self.scalar_names = tuple(network.scalar_names)
        clinical = [n for n in self.scalar_names if n in schema.names]
        default_inputs = InputSpec(
            images=(ImageInput("image", reader="frame", description="thyroid ultrasound frame (B-mode)"),
                    ImageInput(LOBE_INPUT, reader="frame", required=False,
                               description="thyroid lobe mask on the frame (capsule distance, lobe position)")),
            prompt=("points", "box", "mask"),
            texts=(report_key,) if self.uses_text else (),
            fields=schema if clinical else None,
        )
        super().__init__(ensemble, inputs or default_inputs, class_names, positive_class, score_key,
                         model_version, device)
        self.preprocessing = preprocessing
        self.schema = schema
        self.report_key = report_key
        self.variant_name = variant_name or ", ".join(
            s for s, used in (("image", self.uses_image), ("report", self.uses_text), ("scalars", bool(self.scalar_names)))
            if used)
        self.click_radius_mm = float(click_radius_mm)
        self.max_click_radius_mm = float(max_click_radius_mm)
        self.integration_steps = int(integration_steps)
        self.top_tokens = int(top_tokens)
        self.attention_threshold = float(attention_threshold)
        self.overlay_within = overlay_within
        self.overlay_method = overlay_method
        # the explanations shadow the fold networks' embedding methods for the length of one call
        self._one_at_a_time = threading.Lock()
        self.summary_items = int(summary_items)
        self.explain = bool(explain)
        self._settings = {
            "class_names": class_names, "positive_class": positive_class, "score_key": score_key,
            "report_key": report_key, "click_radius_mm": click_radius_mm, "max_click_radius_mm": max_click_radius_mm,
            "integration_steps": integration_steps, "top_tokens": top_tokens,
            "attention_threshold": attention_threshold, "overlay_within": overlay_within,
            "overlay_method": overlay_method,
            "summary_items": summary_items, "explain": explain, "model_version": model_version, "device": device,
        }
        options: dict[str, Any] = {}
        if self.uses_text:
            options[report_key] = ""
        if clinical:
            options.update({name: option for name, option in schema.config_options().items() if name in clinical})
        options.update({CLICK_RADIUS_OPTION: self.click_radius_mm, PIXEL_SIZE_OPTION: ""})
        self.config_options: dict[str, Any] = options

    def predict(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
                fold: int | None = None) -> Prediction:
        """One request at a time: a request's explanations swap in an embedding on the shared fold networks
        (see :mod:`~oncofusion.models.thyroid_llnm.explain`), which another request's forward would use."""
        with self._one_at_a_time:
            return super().predict(images, roi, fields, fold)

    def variant(self, ensemble: Ensemble, variant_name: str | None = None, **changes: Any) -> ThyroidLLNMPredictor:
        """The same predictor around another ensemble (an ablation's fold models), e.g. for evaluation."""
        return type(self)(ensemble, self.preprocessing, self.schema, variant_name=variant_name,
                          **{**self._settings, **changes})

    # -- options --------------------------------------------------------------------------------------
    def click_radius(self, fields: Mapping[str, Any]) -> float:
        return radius_option(fields, CLICK_RADIUS_OPTION, self.click_radius_mm, self.max_click_radius_mm)

    def pixel_size(self, frame: Any, fields: Mapping[str, Any]) -> tuple[tuple[float, float] | None, str, list[str]]:
        """The ``(x, y)`` pixel size in mm, where it came from, and warnings.

        The frame's calibration wins; ``pixel_size_mm`` serves frames that have none (PNG/JPEG exports).
        """
        given = _number_pair(fields.get(PIXEL_SIZE_OPTION), PIXEL_SIZE_OPTION)
        calibrated = frame_spacing_mm(frame)
        source = str((getattr(frame, "meta", {}) or {}).get("spacing_source", "none"))
        if calibrated is not None:
            warnings = []
            if given is not None and not np.allclose(given, calibrated, rtol=1e-3):
                warnings.append(f"{PIXEL_SIZE_OPTION} {given} ignored: the frame is calibrated ({source}: "
                                f"{calibrated[0]:.4g} x {calibrated[1]:.4g} mm)")
            return calibrated, source, warnings
        if given is not None:
            return given, PIXEL_SIZE_OPTION, []
        return None, "none", []

    def report_text(self, fields: Mapping[str, Any]) -> str:
        return text_option(fields, self.report_key, "radiology report text")

    # -- hooks ----------------------------------------------------------------------------------------
    def locate(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
               fold: int | None) -> Context:
        """The nodule as a mask on the frame, and the pixel size the crop margin and the ring need."""
        roi = last_click(roi)
        context = super().locate(images, roi, fields, fold)
        self.schema.validate(fields)  # a bad clinical value is answered before any work
        frame = images[self.inputs.primary.name]
        shape = tuple(int(s) for s in frame.shape[1:])
        spacing, source, warnings = self.pixel_size(frame, fields)
        radius = self.click_radius(fields)
        region = roi_mask(roi, shape, spacing, radius)
        if spacing is None:
            raise uncalibrated("the nodule crop margin and the echogenicity ring")
        prompt = "mask" if roi.mask is not None else "box" if roi.box is not None else "click"
        context.extras.update(region=region, spacing=spacing, spacing_source=source, warnings=warnings,
                              prompt=prompt, click_radius_mm=radius if prompt == "click" else None)
        return context

    def model_inputs(self, context: Context) -> tuple[Any, ...]:
        """``(image (1, 3, S, S) | None, input_ids (1, L) | None, attention_mask (1, L) | None, scalars (1, K) | None)``."""
        frame = context.images[self.inputs.primary.name]
        data = {**context.fields, "image": frame, "roi_mask": context.extras["region"],
                LOBE_INPUT: context.images.get(LOBE_INPUT),
                SPACING_KEY: context.extras["spacing"]}
        prepared = run_preprocessing(self.preprocessing, data)
        context.extras.update(crop=prepared["image"], morphology=prepared.get("nodule_morphology", {}),
                              crop_side_mm=float(prepared.get("crop_side_mm", float("nan"))),
                              scalar_values=np.asarray(prepared["scalars"], np.float64))
        image = torch.as_tensor(prepared["image"], dtype=torch.float32)[None].to(self.device) if self.uses_image else None
        input_ids = attention_mask = None
        if self.uses_text:
            report = self.report_text(context.fields)
            tokens = self.network.tokenize([report])
            input_ids, attention_mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            full = len(self.network.tokenizer(report, truncation=False, verbose=False)["input_ids"])
            context.extras["report_tokens"] = {"count": full, "limit": self.network.max_text_tokens,
                                               "truncated": bool(tokens["truncated"][0])}
        scalars = None
        if self.scalar_names:
            values = np.asarray(prepared["scalars"], np.float32)
            if values.shape != (len(self.scalar_names),):
                raise ValueError(f"preprocessing gives {values.size} scalars, the network reads "
                                 f"{list(self.scalar_names)}: the config's scalar_names differ")
            scalars = torch.from_numpy(values)[None].to(self.device)
        return image, input_ids, attention_mask, scalars

    def forward(self, model_inputs: Sequence[Any], context: Context) -> torch.Tensor:
        """Each member's ``(no LLNM, LLNM)`` probabilities ``(M, 1, 2)`` from its one logit."""
        logits = self.ensemble.member_outputs(*model_inputs, fold=context.fold)  # aggregation "mean": raw
        positive = torch.sigmoid(logits.reshape(logits.shape[0], 1))
        pair = [1.0 - positive, positive] if self.positive_class == 1 else [positive, 1.0 - positive]
        return torch.stack(pair, dim=-1)

    def result(self, output: torch.Tensor, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        frame = context.images[self.inputs.primary.name]
        meta = getattr(frame, "meta", {}) or {}
        region = context.extras["region"]
        points = np.argwhere(region)
        spacing = context.extras["spacing"]
        result = self.class_result(output)
        validated = self.schema.validate(context.fields)
        result.update({
            "model_variant": self.variant_name,
            "frame": {
                **{k: _plain(meta[k]) for k in FRAME_KEYS if k in meta},
                "shape": [int(s) for s in frame.shape[1:]],
                "channels": int(frame.shape[0]),
                "spacing_mm": [round(float(s), 6) for s in spacing],
                "spacing_used": context.extras["spacing_source"],
            },
            "roi": {
                "prompt": context.extras["prompt"],
                "center_ijk": [round(float(c), 2) for c in context.center_index],
                "bbox_ijk": [points.min(axis=0).tolist(), points.max(axis=0).tolist()],
                "area_mm2": round(float(region.sum() * spacing[0] * spacing[1]), 2),
                **({"click_radius_mm": context.extras["click_radius_mm"]} if context.extras["prompt"] == "click" else {}),
            },
            "morphology": morphology_result(context.extras["morphology"]),
            "scalars": {n: _finite(v) for n, v in zip(self.scalar_names, context.extras["scalar_values"], strict=False)},
            "clinical_fields": {k: v for k, v in validated.items()},
            "crop": {"side_mm": round(context.extras["crop_side_mm"], 3),
                     "size_px": [int(s) for s in context.extras["crop"].shape[1:]]},
        })
        warnings = list(context.extras["warnings"])
        if self.uses_text:
            tokens = context.extras["report_tokens"]
            result["report_tokens"] = tokens
            if tokens["truncated"]:
                warnings.append(f"{self.report_key} has {tokens['count']} tokens; the model reads the first "
                                f"{tokens['limit']} (special tokens included): the rest was not used")
        if warnings:
            result["warnings"] = warnings
        return result

    def draw(self, result: dict[str, Any], output: torch.Tensor, model_inputs: Sequence[Any],
             context: Context) -> tuple[np.ndarray | None, dict[str, int]]:
        """Explanations in the JSON and the overlay label (value 1 = the region shown)."""
        region = context.extras["region"]
        if not self.explain:
            return region.astype(np.uint8), {self.summarize(result): 1}
        members = self.ensemble.members(context.fold)
        steps = self.integration_steps
        method = f"integrated gradients ({steps} steps) of the LLNM log-odds, mean over {len(members)} fold model(s)"
        if self.scalar_names:
            values = np.mean([scalar_contributions(m, model_inputs, steps) for m in members], axis=0)
            result["scalar_contributions"] = {
                name: {"value": self._display(name, result["clinical_fields"].get(name, result["scalars"].get(name))),
                       "log_odds": round(float(v), 4)}
                for name, v in zip(self.scalar_names, values, strict=True)}
            result["scalar_contribution_method"] = method + ", from the scalars' learned 'missing' embeddings"
        if self.uses_text:
            values = np.mean([token_contributions(m, model_inputs, steps) for m in members], axis=0)
            tokenizer = self.network.tokenizer
            tokens = tokenizer.convert_ids_to_tokens(model_inputs[1][0].tolist())
            words = word_attributions(tokens, values, skip=tokenizer.all_special_tokens)
            special = float(sum(v for t, v in zip(tokens, values, strict=True) if t in tokenizer.all_special_tokens))
            for index, word in enumerate(words):
                word["phrase"] = _negated(words, index)
            sentences = sentence_attributions(words)
            result["report_attributions"] = {
                "method": method + ", from the tokens' position embeddings alone (content removed); word pieces "
                          "summed into words, words into sentences",
                "total_log_odds": round(float(values.sum()), 4),
                "special_tokens_log_odds": round(special, 4),
                "top_tokens": [{**w, "log_odds": round(w["log_odds"], 4)}
                               for w in sorted(words, key=lambda w: -abs(w["log_odds"]))
                               if any(ch.isalnum() for ch in w["token"])][: self.top_tokens],
                "sentences": [{**t, "log_odds": round(t["log_odds"], 4)}
                              for t in sorted(sentences, key=lambda t: -abs(t["log_odds"]))],
            }
        if not self.uses_image:
            return region.astype(np.uint8), {self.summarize(result): 1}
        frame = context.images[self.inputs.primary.name]
        maps = {"attention_rollout": self.rollout(members, model_inputs),
                "grad_cam_pp": self.grad_cam_pp(members, model_inputs)}
        on_frame = {}
        for name, heat in maps.items():
            on_frame[name], peak = self.heat_on_frame(heat, context.extras["crop"], frame)
            result[OVERLAY_KEYS[name]] = {
                "method": OVERLAY_METHODS[name] + f", mean over {len(members)} fold model(s), rescaled to [0, 1] "
                                                  "over the crop",
                "grid": list(heat.shape),
                "patch_size_mm": round(context.extras["crop_side_mm"] / heat.shape[0], 3),
                "peak_ijk": [round(float(v), 1) for v in peak],
            }
        shown_map = on_frame[self.overlay_method]
        within = region if self.overlay_within == "roi" else shown_map >= 0
        shown = within & (shown_map >= self.attention_threshold)
        result["overlay"] = {
            "method": self.overlay_method,
            "threshold": self.attention_threshold,
            "label_meaning": (f"1 = the {'nodule ROI' if self.overlay_within == 'roi' else 'crop'} where the "
                              f"{self.overlay_method} map >= {self.attention_threshold:g} (the region shown, named "
                              "after the summary); 2 = the rest of the nodule ROI; when no pixel reaches the "
                              "threshold the ROI is 1"),
        }
        if not shown.any():
            return region.astype(np.uint8), {self.summarize(result): 1}
        label = np.where(shown, 1, np.where(region, 2, 0)).astype(np.uint8)
        names = {self.summarize(result): 1}
        if (label == 2).any():
            names["nodule ROI (less attended)"] = 2
        return label, names

    # -- explanation pieces ---------------------------------------------------------------------------
    def rollout(self, members: Sequence[torch.nn.Module], model_inputs: Sequence[Any]) -> np.ndarray:
        """Mean over ``members`` of each one's patch relevance map ``(g0, g1)``, rescaled to [0, 1]."""
        input_ids, attention_mask = model_inputs[1], model_inputs[2]
        length = 0 if input_ids is None else input_ids.shape[1]
        maps = []
        for member in members:
            with torch.no_grad():
                _, attentions = member(*model_inputs, return_attention=True)
            slices = member.token_slices(length)
            valid = torch.ones(1, attentions[0].shape[-1], dtype=torch.bool, device=attentions[0].device)
            if attention_mask is not None:
                valid[:, slices["text"]] = attention_mask.bool()
            grid = [i // p for i, p in zip(member.image_size, member.patch_size, strict=True)]
            maps.append(patch_relevance(attention_rollout(attentions, valid)[0], slices, grid))
        heat = np.mean(maps, axis=0)
        span = float(heat.max() - heat.min())
        return (heat - heat.min()) / span if span > 1e-12 else np.zeros_like(heat)

    def grad_cam_pp(self, members: Sequence[torch.nn.Module], model_inputs: Sequence[Any]) -> np.ndarray:
        """Mean over ``members`` of each one's Grad-CAM++ patch map ``(g0, g1)``, rescaled to [0, 1]."""
        maps = []
        for member in members:
            grid = [i // p for i, p in zip(member.image_size, member.patch_size, strict=True)]
            maps.append(grad_cam_pp(member, model_inputs).cpu().numpy().reshape(grid))
        heat = np.mean(maps, axis=0)
        span = float(heat.max() - heat.min())
        return (heat - heat.min()) / span if span > 1e-12 else np.zeros_like(heat)

    @staticmethod
    def heat_on_frame(heat: np.ndarray, crop: Any, frame: Any) -> tuple[np.ndarray, np.ndarray]:
        """The patch map ``(g0, g1)`` on the frame grid ``(W, H)`` (bilinear between patch centres, -1
        outside the crop) and the frame position of its peak."""
        frame_affine = np.asarray(getattr(frame, "affine", np.eye(3)), np.float64)
        to_frame = np.linalg.inv(frame_affine) @ np.asarray(crop.affine, np.float64)
        size = np.asarray(crop.shape[1:], float)
        patch = size / np.asarray(heat.shape, float)  # crop pixels per patch
        shape = np.asarray(frame.shape[1:], int)
        corners = np.array([[u, v, 1.0] for u in (-0.5, size[0] - 0.5) for v in (-0.5, size[1] - 0.5)])
        reach = (to_frame @ corners.T)[:2]
        lo = np.clip(np.floor(reach.min(axis=1)).astype(int), 0, shape)
        hi = np.clip(np.ceil(reach.max(axis=1)).astype(int) + 1, 0, shape)
        out = np.full(tuple(shape), -1.0, np.float32)
        peak_patch = np.unravel_index(int(np.argmax(heat)), heat.shape)
        peak_crop = (np.asarray(peak_patch, float) + 0.5) * patch - 0.5
        peak = (to_frame @ np.array([*peak_crop, 1.0]))[:2]
        if np.any(hi <= lo):
            return out, peak
        i, j = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
        crop_uv = np.linalg.solve(to_frame, np.stack([i.ravel(), j.ravel(), np.ones(i.size)]))[:2]
        inside = np.all((crop_uv >= -0.5) & (crop_uv <= size[:, None] - 0.5), axis=0)
        patch_coords = (crop_uv + 0.5) / patch[:, None] - 0.5
        values = ndimage.map_coordinates(heat, patch_coords, order=1, mode="nearest")
        block = out[lo[0]:hi[0], lo[1]:hi[1]].reshape(-1)
        block[inside] = values[inside]
        out[lo[0]:hi[0], lo[1]:hi[1]] = block.reshape(i.shape)
        return out, peak

    # -- summary --------------------------------------------------------------------------------------
    def _display(self, name: str, value: Any) -> str:
        if name in self.schema.names:
            return self.schema.display(name, value)
        if value is None:
            return f"unknown {SCALAR_LABELS.get(name, name)}"
        return f"{SCALAR_LABELS.get(name, name)} {float(value):.3g}"

    def summarize(self, result: Mapping[str, Any]) -> str:
        """One line for the viewer's segment name, e.g. ``LLNM 0.73 (capsular, microcalcifications, age 34)``:
        the LLNM probability and what pushed most towards the predicted side (report words, known scalars)."""
        probability = float(result[self.score_key])
        sign = 1.0 if probability >= 0.5 else -1.0
        drivers = [(sign * t["log_odds"], t.get("phrase", t["token"]))
                   for t in (result.get("report_attributions") or {}).get("top_tokens", [])
                   if t["token"] not in NEGATIONS and t["token"] not in STOPWORDS and any(ch.isalpha() for ch in t["token"])]
        drivers += [(sign * c["log_odds"], c["value"]) for name, c in (result.get("scalar_contributions") or {}).items()
                    if result["scalars"].get(name) is not None]
        chosen = [text for value, text in sorted(drivers, key=lambda d: -d[0]) if value > 0.01][: self.summary_items]
        text = f"{self.class_names[self.positive_class]} {probability:.2f}"
        return f"{text} ({', '.join(chosen)})" if chosen else text


def _negated(words: Sequence[Mapping[str, Any]], index: int, reach: int = 4) -> str:
    """A word as the summary names it: ``"no <word>"`` when a negation precedes it in its sentence within
    ``reach`` words (``"No capsular contact."`` -> ``no contact``), else the word."""
    token = words[index]["token"]
    for earlier in reversed(words[max(0, index - reach): index]):
        if earlier["token"] in (".", ";", "!", "?"):
            break
        if earlier["token"] in NEGATIONS:
            return f"{earlier['token']} {token}"
    return token



def _finite(value: float) -> float | None:
    return None if not math.isfinite(float(value)) else round(float(value), 4)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def morphology_result(measured: Mapping[str, float | None]) -> dict[str, Any]:
    """The measurements for the answer: numbers rounded, None when not measured (no lobe mask), and with a
    lobe mask the paper's two findings: capsule distance <= 2.5 mm, and the lobe third."""
    result: dict[str, Any] = {k: None if v is None else round(float(v), 4) for k, v in measured.items()}
    if measured.get("capsule_distance_mm") is not None:
        result["capsule_within_2_5_mm"] = bool(measured["capsule_distance_mm"] <= CAPSULE_RISK_MM)
    if measured.get("lobe_position") is not None:
        result["lobe_third"] = third_of(float(measured["lobe_position"]))
    return result


# -- evaluation over a manifest -------------------------------------------------------------------------
def predict_records(predictor: ThyroidLLNMPredictor, datalist: Sequence[dict], output_file: str | Path | None = None,
                    out_of_fold: bool = False, box_key: str = "roi") -> list[dict[str, Any]]:
    """One prediction per record with the record's box as the prompt (the box training crops around), the
    record itself as the fields; with ``out_of_fold`` each case by its own fold's model. Every record key but
    the image paths is carried along (ids, truth)."""
    image_keys = {spec.name for spec in predictor.inputs.images}
    rows = []
    for record in tqdm(datalist, desc="predict", leave=False):
        images = record_images(predictor, record)
        kwargs = {"fold": int(record["fold"])} if out_of_fold else {}
        prediction = predictor.predict(images, record_box(record, box_key), record, **kwargs)
        rows.append({**{k: v for k, v in record.items() if k not in image_keys}, **prediction.result})
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(rows, indent=1, default=str))
        logger.info("wrote %d predictions to %s", len(rows), output_file)
    return rows
