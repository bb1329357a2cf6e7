"""ERUS frame + tumor prompt + report -> nCRT response probability, SHAP contributions and the ROI label.

The encoder reads the whole radial frame, as the paper feeds the ERUS image to CLIP: the wall layers,
the fat and the nodes around the tumor carry the stage. The prompt says which tumor the user means: it
is drawn back as label value 1 (named after the summary) and reported, so that the answer is tied to
the lesion on screen. SHAP values (exact, TreeExplainer) come summed per modality, the paper's image vs
text finding, with the top columns and a waterfall PNG.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from oncofusion.contract import ImageInput, InputSpec, InvalidRequest, Prediction, Roi
from oncofusion.data.roi import roi_region
from oncofusion.evaluation.predict import record_box, record_images
from oncofusion.models.rectal_erus.model import ErusClipBooster
from oncofusion.models.rectal_erus.shap_explain import waterfall_png
from oncofusion.predictor import (
    Context,
    PredictorTemplate,
    last_click,
    radius_option,
    safe_file_name,
    text_option,
)

logger = logging.getLogger(__name__)

CLICK_RADIUS_OPTION = "click_radius_mm"


class RectalErusPredictor(PredictorTemplate):
    """Through :class:`~oncofusion.models.rectal_erus.model.ErusClipBooster`: one member per fold.

    ``explanations_dir``: where each prediction's SHAP waterfall PNG goes (its path is in the answer);
    None writes none. ``top_features``: SHAP columns listed per answer.
    """

    def __init__(self, model: ErusClipBooster, inputs: InputSpec | None = None,
                 class_names: Sequence[str] = ("poor response", "good response"), positive_class: int = 1,
                 score_key: str = "good_response_probability", report_key: str = "report",
                 click_radius_mm: float = 5.0, max_click_radius_mm: float = 30.0, top_features: int = 8,
                 explanations_dir: str | Path | None = None, explain: bool = True, model_version: str = "",
                 device: torch.device | str = "cpu"):
        default_inputs = InputSpec(
            images=(ImageInput("image", reader="frame", description="radial endorectal ultrasound frame"),),
            prompt=("points", "box", "mask"), texts=(report_key,))
        super().__init__(model, inputs or default_inputs, class_names, positive_class, score_key, model_version, device)
        self.model = model
        self.report_key = report_key
        self.click_radius_mm = float(click_radius_mm)
        self.max_click_radius_mm = float(max_click_radius_mm)
        self.top_features = int(top_features)
        self.explanations_dir = Path(explanations_dir) if explanations_dir else None
        self.explain = bool(explain)
        self.config_options: dict[str, Any] = {report_key: "", CLICK_RADIUS_OPTION: self.click_radius_mm}
        self._one_at_a_time = threading.Lock()  # LightGBM and the frozen encoders are shared by requests

    def predict(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
                fold: int | None = None) -> Prediction:
        with self._one_at_a_time:
            return super().predict(images, roi, fields, fold)

    def report_text(self, fields: Mapping[str, Any]) -> str:
        return text_option(fields, self.report_key, "ERUS report text")

    # -- hooks ----------------------------------------------------------------------------------------
    def locate(self, images: Mapping[str, Any], roi: Roi | None, fields: Mapping[str, Any],
               fold: int | None) -> Context:
        roi = last_click(roi)
        context = super().locate(images, roi, fields, fold)
        report = self.report_text(fields)  # a bad report is answered before any work
        frame = images[self.inputs.primary.name]
        meta = getattr(frame, "meta", {}) or {}
        prompt = "mask" if roi.mask is not None else "box" if roi.box is not None else "click"
        if prompt == "click" and meta.get("spacing_source", "none") == "none":
            raise InvalidRequest("a click's radius is in mm, but the frame has no pixel calibration: draw a box "
                                 "or a mask around the tumor, or send the DICOM from the scanner")
        radius = radius_option(fields, CLICK_RADIUS_OPTION, self.click_radius_mm, self.max_click_radius_mm)
        affine = np.asarray(frame.affine, float)
        region = roi_region(roi, frame.shape[1:], affine, radius)
        if region.shape != tuple(frame.shape[1:]):
            raise InvalidRequest(f"ROI mask is {region.shape} but the frame is {tuple(frame.shape[1:])}")
        if not region.any():
            raise InvalidRequest("the tumor ROI is empty: draw the tumor or click on it")
        context.extras.update(region=region, report=report, prompt=prompt,
                              click_radius_mm=radius if prompt == "click" else None)
        return context

    def model_inputs(self, context: Context) -> tuple[Any, ...]:
        """``({fold: (1, D) features},)``: the frame and the report through each fold's encoder."""
        frame = context.images[self.inputs.primary.name]
        return (self.model.features([frame], context.extras["report"], context.fold),)

    def forward(self, model_inputs: Sequence[Any], context: Context) -> torch.Tensor:
        return self.model.member_outputs(model_inputs[0])

    def result(self, output: torch.Tensor, model_inputs: Sequence[Any], context: Context) -> dict[str, Any]:
        result = self.class_result(output)
        region = context.extras["region"]
        points = np.argwhere(region)
        result["roi"] = {
            "prompt": context.extras["prompt"],
            "center_ijk": [round(float(c), 2) for c in context.center_index],
            "bbox_ijk": [points.min(axis=0).tolist(), points.max(axis=0).tolist()],
            **({"click_radius_mm": context.extras["click_radius_mm"]} if context.extras["prompt"] == "click" else {}),
        }
        result["encoder"] = {"members": len(model_inputs[0]), "image_region": "whole frame"}
        if self.explain:
            result["shap"] = self.shap_result(model_inputs[0], context)
        return result

    def shap_result(self, features: Mapping[int, np.ndarray], context: Context) -> dict[str, Any]:
        explanation = self.model.explain(features)
        answer: dict[str, Any] = {
            "method": f"TreeExplainer (exact tree SHAP) of the log-odds, mean over {len(features)} fold booster(s), "
                      "each on its own encoder's features",
            "base_log_odds": round(explanation.base_value, 4),
            "log_odds": round(explanation.raw_score(0), 4),
            "by_modality": {g: round(v, 4) for g, v in explanation.by_group(0).items()},
            "modality_share": {g: round(v, 4) for g, v in explanation.group_shares(0).items()},
            "top_features": [{**t, "value": round(t["value"], 4), "shap": round(t["shap"], 4)}
                             for t in explanation.top(0, self.top_features)],
        }
        if self.explanations_dir is not None:
            name = f"{context.fields.get('case_id') or uuid.uuid4().hex}_shap_waterfall.png"
            title = f"{self.class_names[self.positive_class]}: SHAP contributions (log-odds)"
            answer["waterfall_png"] = str(waterfall_png(explanation, 0, self.explanations_dir / safe_file_name(name), title=title))
        return answer

    def draw(self, result: dict[str, Any], output: Any, model_inputs: Sequence[Any],
             context: Context) -> tuple[np.ndarray | None, dict[str, int]]:
        """The tumor ROI as label value 1, named after the summary."""
        return context.extras["region"].astype(np.uint8), {self.summarize(result): 1}

    def summarize(self, result: Mapping[str, Any]) -> str:
        """E.g. ``good response 0.31 (image 64 %, text 36 %)``: the score and each modality's SHAP share."""
        text = f"{self.class_names[self.positive_class]} {float(result[self.score_key]):.2f}"
        shares = (result.get("shap") or {}).get("modality_share")
        if not shares:
            return text
        return f"{text} ({', '.join(f'{g} {100 * v:.0f} %' for g, v in shares.items())})"



def predict_records(predictor: RectalErusPredictor, datalist: Sequence[dict], output_file: str | Path | None = None,
                    out_of_fold: bool = False) -> list[dict[str, Any]]:
    """One prediction per record (its first frame, its box, its report); ``out_of_fold``: each case by the
    member that held out its fold. Record keys other than image paths are carried along."""
    rows = []
    for record in tqdm(datalist, desc="predict", leave=False):
        images = record_images(predictor, record)
        kwargs = {"fold": int(record["fold"])} if out_of_fold else {}
        prediction = predictor.predict(images, record_box(record), record, **kwargs)
        kept = {k: v for k, v in record.items() if k not in ("image", "images", "tumor_masks", "anatomy_masks")}
        rows.append({**kept, **prediction.result})
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(output_file).write_text(json.dumps(rows, indent=1, default=str))
        logger.info("wrote %d predictions to %s", len(rows), output_file)
    return rows
