"""One predictor skeleton for every model family: locate -> inputs -> forward -> result -> draw.

A model family subclasses :class:`PredictorTemplate` and writes only what is its own:

- :meth:`~PredictorTemplate.model_inputs`: the network inputs from the images, the lesion and the fields;
- :meth:`~PredictorTemplate.result`: the JSON from the ensemble's output;
- :meth:`~PredictorTemplate.draw`: the label drawn on the primary image (e.g. a heatmap), if any;
- :meth:`~PredictorTemplate.summarize`: the one-line summary a viewer shows as the segment name.

Locating the lesion (the prompt checked against the image) and running the ensemble are shared, and so
is :meth:`~PredictorTemplate.warm_up`, which the server runs once after loading a model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from oncofusion.contract import InputSpec, InvalidRequest, Prediction, Roi
from oncofusion.ensemble import Ensemble
from oncofusion.transforms.geometry import voxel_to_world

logger = logging.getLogger(__name__)

#: the blank volume a warm-up prediction reads: small, but with room for a crop around its centre
WARM_UP_SHAPE = (32, 32, 32)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def run_preprocessing(transform: Callable[[dict], dict], data: dict) -> dict:
    """``transform(data)``, re-raising an :class:`InvalidRequest` that MONAI's ``Compose`` wrapped in a
    ``RuntimeError`` (the server answers the former with 4xx and its message, the latter with 500)."""
    try:
        return transform(data)
    except RuntimeError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, InvalidRequest):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def safe_file_name(name: str) -> str:
    """A file name with only letters, digits, '-', '_' and '.' (case ids come from users)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[-120:]


def radius_option(fields: Mapping[str, Any], name: str, default: float, maximum: float, limit: str = "") -> float:
    """A click's radius in mm from the request field ``name``: ``default`` when absent or blank, else a number
    in ``(0, maximum]`` (``limit`` says why the maximum, e.g. " (the crop size)")."""
    value = fields.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        radius = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} {value!r} is not a number of mm") from None
    if not 0 < radius <= maximum:
        raise InvalidRequest(f"{name} {radius:g} is outside 0-{maximum:g} mm{limit}")
    return radius


def text_option(fields: Mapping[str, Any], name: str, what: str = "report text") -> str:
    """The free-text field ``name`` (e.g. a report); missing, non-text or blank is refused naming the field."""
    value = fields.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InvalidRequest(f"{name} is missing: give the {what} in the request or in the study's sidecar")
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text, got {type(value).__name__} {str(value)[:40]!r}")
    if not value.strip():
        raise InvalidRequest(f"{name} is empty: give the {what}")
    return value


def last_click(roi: Roi | None) -> Roi | None:
    """Of several clicks the last is the lesion (viewers send every click so far); boxes and masks pass."""
    if roi is not None and roi.mask is None and roi.box is None and len(roi.points) > 1:
        return Roi(points=[roi.points[-1]], background=roi.background)
    return roi


@dataclass
class Context:
    """What one prediction knows before the model runs."""

    images: Mapping[str, Any]
    roi: Roi | None
    fields: Mapping[str, Any]
    fold: int | None
    center_index: np.ndarray | None = None  # lesion centre in the primary image's index space
    center_mm: np.ndarray | None = None  # the same in world millimetres
    extras: dict[str, Any] = field(default_factory=dict)  # what one hook computes for a later one


class PredictorTemplate:
    """Images + prompt + fields -> :class:`~oncofusion.contract.Prediction`, through a fold ensemble.

    ``class_names``: output classes (empty for a risk model); ``positive_class`` is the class whose
    probability is the score, reported under ``score_key`` (default ``<class>_probability``);
    ``model_version`` is echoed in every result. ``fold`` in :meth:`predict` restricts the ensemble to
    that fold's model (out-of-fold evaluation).
    """

    #: typed options shown in ``/info``; subclasses set it per instance when it depends on config
    config_options: dict[str, Any] = {}

    def __init__(self, ensemble: Ensemble, inputs: InputSpec | None = None, class_names: Sequence[str] = (),
                 positive_class: int = -1, score_key: str | None = None, model_version: str = "",
                 device: torch.device | str = "cpu"):
        self.ensemble = ensemble
        self.inputs = inputs or InputSpec()
        self.class_names = list(class_names)
        self.positive_class = positive_class % len(self.class_names) if self.class_names else None
        default_key = f"{self.class_names[self.positive_class]}_probability" if self.class_names else "risk"
        self.score_key = score_key or default_key
        self.model_version = model_version
        self.device = torch.device(device)

    # -- the skeleton -------------------------------------------------------------------------------
    def predict(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
                fold: int | None = None) -> Prediction:
        context = self.locate(images, roi, fields, fold)
        model_inputs = self.model_inputs(context)
        output = self.forward(model_inputs, context)
        result = self.result(output, model_inputs, context)
        result["model_version"] = self.model_version
        label, label_names = self.draw(result, output, model_inputs, context)
        return Prediction(result=result, label=label, label_names=label_names)

    def locate(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
               fold: int | None) -> Context:
        """Check the images the model needs and put the lesion centre on the primary image."""
        missing = [i.name for i in self.inputs.images if i.required and images.get(i.name) is None]
        if missing:
            raise InvalidRequest(f"missing image input(s) {', '.join(missing)}: send them with the request "
                                 "or record them in the study's sidecar", 400)
        context = Context(images=images, roi=roi, fields=fields, fold=fold)
        if not self.inputs.prompt:
            return context
        if roi is None:
            raise InvalidRequest("no lesion given: send a 'foreground' point, an 'roi' box or a label mask")
        primary = images[self.inputs.primary.name]
        shape = np.asarray(primary.shape[1:])
        center = roi.center()
        if center.shape != shape.shape:
            raise InvalidRequest(f"lesion position has {center.size} coordinates but the image is {shape.size}D")
        if not np.all((center >= 0) & (center <= shape - 1)):
            raise InvalidRequest(f"lesion centre {tuple(np.round(center, 1))} lies outside image {_shape_text(shape)}")
        affine = primary.affine.numpy() if hasattr(primary, "affine") else np.eye(shape.size + 1)
        context.center_index = center
        context.center_mm = voxel_to_world(affine, center[None])[0]
        return context

    def forward(self, model_inputs: Sequence[Any], context: Context) -> torch.Tensor:
        """Each chosen fold member's output after the ensemble's aggregation transform, ``(M, B, ...)``."""
        return self.ensemble.member_outputs(*model_inputs, fold=context.fold)

    def warm_up_request(self) -> tuple[dict[str, Any], Roi | None, dict[str, Any]] | None:
        """The made-up request a warm-up predicts: a blank volume clicked at its centre. None (no warm-up)
        for a model that reads text, clinical fields or a non-volume image: there is no neutral stand-in
        for a report. A model family with other needs (e.g. a mask) overrides this."""
        if self.inputs.texts or self.inputs.fields is not None or any(
                spec.reader != "volume" for spec in self.inputs.images if spec.required):
            return None
        blank = MetaTensor(torch.zeros(1, *WARM_UP_SHAPE), affine=torch.eye(4, dtype=torch.float64))
        images = {spec.name: blank for spec in self.inputs.images if spec.required}
        roi = Roi(points=[tuple(s // 2 for s in WARM_UP_SHAPE)]) if self.inputs.prompt else None
        return images, roi, {}

    def warm_up(self) -> bool:
        """Predict :meth:`warm_up_request` once, so that the first real click does not pay the one-time costs
        (torch's first call through each layer, lazily built kernels and imports). Returns whether it ran;
        a failure is logged, never raised (the first click reports it properly)."""
        request = self.warm_up_request()
        if request is None:
            return False
        start = time.perf_counter()
        try:
            self.predict(*request)
        except Exception as e:  # noqa: BLE001 - a warm-up never stops a model from being served
            logger.info("%s: no warm-up (%s: %s)", type(self).__name__, type(e).__name__, e)
            return False
        logger.info("%s: warmed up in %.2fs", type(self).__name__, time.perf_counter() - start)
        return True

    # -- hooks --------------------------------------------------------------------------------------
    def model_inputs(self, context: Context) -> tuple[Any, ...]:
        raise NotImplementedError

    def result(self, output: torch.Tensor, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        """Default: class probabilities (mean over members) and the predicted class."""
        return self.class_result(output)

    def draw(self, result: dict[str, Any], output: Any, model_inputs: Sequence[Any],
             context: Context) -> tuple[np.ndarray | None, dict[str, int]]:
        """Default: nothing drawn."""
        return None, {}

    def summarize(self, result: Mapping[str, Any]) -> str:
        predicted = result.get("prediction")
        if predicted is None:
            return ""
        return f"{predicted} {result['class_probabilities'][predicted]:.2f}"

    # -- shared pieces ------------------------------------------------------------------------------
    def class_result(self, member_probabilities: torch.Tensor) -> dict[str, Any]:
        """``(M, 1, C)`` member probabilities -> the predicted class, the score (positive-class probability,
        mean over members), every class's probability and each member's score."""
        per_member = member_probabilities[:, 0].cpu().numpy()
        probabilities = per_member.mean(0)
        return {
            "prediction": self.class_names[int(np.argmax(probabilities))],
            self.score_key: float(probabilities[self.positive_class]),
            "class_probabilities": dict(zip(self.class_names, map(float, probabilities), strict=True)),
            "fold_probabilities": [float(p[self.positive_class]) for p in per_member],
        }
