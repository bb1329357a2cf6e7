"""The paper's comparison: CLIP + LightGBM against hand-crafted radiomics with LR, SVM and RF, out of fold.

One table on the full cohort (every model out of fold over the same patient folds, AUROC with bootstrap
CIs, DeLong tests of CLIP + LightGBM against each other model), with the image-only and text-only
boosters beside them (the modality ablation behind the paper's SHAP finding), and the balanced-subset
experiment the paper runs for radiomics (all of the minority class and as many of the majority): the
baselines refitted out of fold within the subset, CLIP + LightGBM's full-cohort out-of-fold scores on
the same patients. A SHAP summary plot over every patient's out-of-fold explanation, and the mean
modality shares, go beside the report. The generator's ceilings are carried into the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oncofusion.evaluation.baselines import balanced_subset, baseline_predictions
from oncofusion.evaluation.comparison import write_ablation_report, write_comparison
from oncofusion.features.radiomics import feature_matrix
from oncofusion.io.frames import read_frame
from oncofusion.models.rectal_erus.booster import BoosterEnsemble
from oncofusion.models.rectal_erus.model import BOOSTER_DIR, extract_fold_features
from oncofusion.models.rectal_erus.shap_explain import ShapExplanation, explain, summary_png

logger = logging.getLogger(__name__)

CLIP_MODEL = "CLIP + LightGBM"
MODALITY_MODELS = {"image": "CLIP image only + LightGBM", "text": "CLIP text only + LightGBM"}
BASELINE_NAMES = {"logistic_regression": "radiomics + logistic regression", "svm": "radiomics + SVM",
                  "random_forest": "radiomics + random forest"}


def _rows(records: Sequence[Mapping], scores: np.ndarray, score_key: str = "score") -> list[dict[str, Any]]:
    return [{"case_id": r["case_id"], "label": int(r["label"]), "fold": int(r["fold"]), score_key: float(s)}
            for r, s in zip(records, scores, strict=True)]


def clip_out_of_fold(records: Sequence[Mapping], clip_encoder: str, ckpt_dir: str | Path, cache_dir: str | Path | None,
                     intensity_range: Sequence[float], context_length: int | None, device: Any,
                     booster_params: Mapping[str, Any] | None = None, seed: int = 0
                     ) -> tuple[dict[str, np.ndarray], ShapExplanation]:
    """Out-of-fold scores of the saved boosters and of image-only / text-only boosters (fitted here on the
    same folds), each patient through its fold's encoder; and every patient's out-of-fold SHAP values."""
    boosters = BoosterEnsemble.load(Path(ckpt_dir) / BOOSTER_DIR)
    labels = np.array([int(r["label"]) for r in records])
    folds = np.array([int(r["fold"]) for r in records])
    scores = {name: np.zeros(len(records)) for name in (CLIP_MODEL, *MODALITY_MODELS.values())}
    values = np.zeros((len(records), len(boosters.feature_names)))
    shown = np.zeros_like(values)
    bases = np.zeros(len(records))
    for fold in boosters.folds:
        table, names, groups = extract_fold_features(records, clip_encoder, ckpt_dir, fold, cache_dir,
                                                     intensity_range, context_length, device, progress=False)
        held = folds == fold
        scores[CLIP_MODEL][held] = boosters.member_outputs(table[held], fold=fold)[0, :, 1].numpy()
        part = explain(boosters, table[held], fold=fold)
        values[held], shown[held], bases[held] = part.values, part.features, part.base_value
        for group, name in MODALITY_MODELS.items():
            columns = [i for i, g in enumerate(groups) if g == group]
            single = BoosterEnsemble.fit_folds(table[:, columns], labels, folds, [names[i] for i in columns],
                                               [group] * len(columns), dict(booster_params or {}), seed=seed,
                                               train_folds=[fold])
            scores[name][held] = single.member_outputs(table[held][:, columns], fold=fold)[0, :, 1].numpy()
    explanation = ShapExplanation(values=values, base_value=float(bases.mean()), feature_names=boosters.feature_names,
                                  feature_groups=boosters.feature_groups, features=shown)
    return scores, explanation


def patient_radiomics(records: Sequence[Mapping], frames_key: str = "images", masks_key: str = "tumor_masks",
                      bin_width: float = 8.0) -> tuple[np.ndarray, list[str]]:
    """Radiomics of each patient's tumor ROI, averaged over its frames: ``(N, F)`` and the names.

    Frames are read as the server reads them ``(C, W, H)``, averaged over colour channels and put in the
    masks' (rows, columns) order; the pixel size comes from the frame's calibration.
    """
    images, masks, spacings, owner = [], [], [], []
    for index, record in enumerate(records):
        frames = record.get(frames_key) or [record["image"]]
        mask_paths = record.get(masks_key) or [record["tumor_mask"]]
        if len(frames) != len(mask_paths):
            raise ValueError(f"case {record['case_id']}: {len(frames)} frames but {len(mask_paths)} tumor masks")
        for frame_path, mask_path in zip(frames, mask_paths, strict=True):
            frame = read_frame(frame_path)
            images.append(np.asarray(frame).mean(axis=0).T)  # (rows, columns)
            masks.append(np.asarray(Image.open(mask_path)) > 0)
            affine = np.asarray(frame.affine, float)
            spacings.append((float(affine[1, 1]), float(affine[0, 0])))  # (row, column) mm
            owner.append(index)
    table, names = feature_matrix(images, masks, spacings, bin_width=bin_width)
    owner_array = np.asarray(owner)
    return np.stack([np.nanmean(table[owner_array == i], axis=0) for i in range(len(records))]), names


def radiomics_predictions(records: Sequence[Mapping], radiomics: np.ndarray, rows: np.ndarray | None = None,
                          seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Out-of-fold scores of the three radiomics baselines on ``rows`` (default all), refitted within them."""
    rows = np.arange(len(records)) if rows is None else np.asarray(rows)
    chosen = [records[i] for i in rows]
    labels = np.array([int(r["label"]) for r in chosen])
    folds = np.array([int(r["fold"]) for r in chosen])
    predictions = baseline_predictions([r["case_id"] for r in chosen], radiomics[rows], labels, folds, seed=seed)
    return {BASELINE_NAMES[name]: [{**row, "fold": int(f)} for row, f in zip(found, folds, strict=True)]
            for name, found in predictions.items()}


def _balanced(records: Sequence[Mapping], seed: int) -> tuple[np.ndarray, str]:
    labels = np.array([int(r["label"]) for r in records])
    subset = balanced_subset(labels, seed=seed)
    counts = np.bincount(labels[subset], minlength=2)
    return subset, f"balanced subset {counts[1]} + {counts[0]} (baselines refitted out of fold within it)"


def evaluate_baselines(records: Sequence[Mapping], output_dir: str | Path, data_description: str,
                       reference: Mapping[str, Any] | None = None, radiomics_bin_width: float = 8.0,
                       num_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The radiomics baselines alone (``configs/baselines.json``): the full cohort in ``output_dir`` and the
    balanced subset in ``output_dir/balanced``, each with DeLong tests of LR against SVM and RF."""
    radiomics, _ = patient_radiomics(records, bin_width=radiomics_bin_width)
    report = write_ablation_report(radiomics_predictions(records, radiomics, seed=seed), output_dir, data_description,
                                   "score", num_bootstrap, reference=reference)
    subset, described = _balanced(records, seed)
    report["balanced_subset"] = write_comparison(
        radiomics_predictions(records, radiomics, subset, seed), Path(output_dir) / "balanced",
        f"{data_description}; {described}", "score", num_bootstrap)["models"]
    (Path(output_dir) / "report.json").write_text(json.dumps(report, indent=2))
    return report


def evaluate(records: Sequence[Mapping], clip_encoder: str, ckpt_dir: str | Path, cache_dir: str | Path | None,
             output_dir: str | Path, data_description: str, intensity_range: Sequence[float] = (0, 255),
             context_length: int | None = None, device: Any = "cpu", reference: Mapping[str, Any] | None = None,
             booster_params: Mapping[str, Any] | None = None, radiomics_bin_width: float = 8.0,
             num_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``report.json``/``report.md``/``roc.png`` (full cohort), ``balanced/`` (balanced subset),
    ``shap_summary.png`` and ``predictions.json`` under ``output_dir``; return the full-cohort report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clip_scores, explanation = clip_out_of_fold(records, clip_encoder, ckpt_dir, cache_dir, intensity_range,
                                                context_length, device, booster_params, seed)
    radiomics, _ = patient_radiomics(records, bin_width=radiomics_bin_width)
    predictions = {name: _rows(records, s) for name, s in clip_scores.items()}
    predictions.update(radiomics_predictions(records, radiomics, seed=seed))
    order = [CLIP_MODEL, *BASELINE_NAMES.values(), *MODALITY_MODELS.values()]
    report = write_ablation_report({n: predictions[n] for n in order}, output_dir, data_description, "score",
                                   num_bootstrap, reference=reference)

    subset, described = _balanced(records, seed)
    balanced = {CLIP_MODEL + " (full-cohort model)": [predictions[CLIP_MODEL][i] for i in subset],
                **radiomics_predictions(records, radiomics, subset, seed)}
    report["balanced_subset"] = write_comparison(balanced, output_dir / "balanced", f"{data_description}; {described}",
                                                 "score", num_bootstrap)["models"]

    summary_png(explanation, output_dir / "shap_summary.png")
    report["shap_modality_share"] = {g: round(v, 4) for g, v in explanation.overall_shares().items()}
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (output_dir / "predictions.json").write_text(json.dumps(predictions[CLIP_MODEL], indent=1))
    logger.info("mean |SHAP| share by modality: %s", report["shap_modality_share"])
    return report
