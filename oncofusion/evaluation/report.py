"""Evaluation report of a binary classifier: AUROC/AUPRC with bootstrap CIs, calibration, ROC plot,
and the zero-shot AUROC of every semantic feature the predictions carry."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.metrics.classification import auprc, auroc, bootstrap, calibration_curve, roc_curve

logger = logging.getLogger(__name__)

SYNTHETIC_NOTE = ("Computed on the data named in 'data'. On the bundled SYNTHETIC sample data these numbers "
                  "check the pipeline; they are not clinical performance.")


def zero_shot_auroc(predictions: Sequence[dict], feature: str) -> float:
    """Macro one-vs-rest AUROC of a zero-shot feature against the recorded truth (NaN if not scorable)."""
    rows = [r for r in predictions if feature in r.get("semantics", {}) and feature in r.get("semantic_features", {})]
    if not rows:
        return float("nan")
    options = list(rows[0]["semantic_features"][feature])
    scores = []
    for option in options:
        truth = np.array([r["semantics"][feature] == option for r in rows], int)
        if 0 < truth.sum() < truth.size:
            scores.append(auroc(truth, np.array([r["semantic_features"][feature][option] for r in rows])))
        if len(options) == 2:  # both one-vs-rest AUROCs of a binary feature are the same number
            break
    return float(np.mean(scores)) if scores else float("nan")


def classification_report(predictions: Sequence[dict], data_description: str, num_bootstrap: int = 1000,
                          seed: int = 0) -> dict[str, Any]:
    """Discrimination with 95 % CIs, calibration and zero-shot feature AUROCs of ``predictions``."""
    labels = np.array([int(r["label"]) for r in predictions])
    scores = np.array([float(r["malignancy_probability"]) for r in predictions])
    features = sorted({f for r in predictions for f in r.get("semantic_features", {})})
    return {
        "data": data_description,
        "note": SYNTHETIC_NOTE,
        "num_cases": int(labels.size),
        "num_positive": int(labels.sum()),
        "auroc": bootstrap(auroc, labels, scores, num_bootstrap, seed=seed).to_dict(),
        "auprc": bootstrap(auprc, labels, scores, num_bootstrap, seed=seed).to_dict(),
        "calibration": calibration_curve(labels, scores, num_bins=10),
        "zero_shot_auroc": {feature: zero_shot_auroc(predictions, feature) for feature in features},
    }


def plot_report(predictions: Sequence[dict], report: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """ROC curve and calibration curve as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    labels = np.array([int(r["label"]) for r in predictions])
    scores = np.array([float(r["malignancy_probability"]) for r in predictions])
    fpr, tpr = roc_curve(labels, scores)
    paths = [output_dir / "roc.png", output_dir / "calibration.png"]
    auc = report["auroc"]
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(fpr, tpr, label=f"AUROC {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})")
    axis.plot([0, 1], [0, 1], "k:", lw=0.8)
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)
    curve = report["calibration"]
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot([0, 1], [0, 1], "k:", lw=0.8)
    axis.plot(curve["predicted"], curve["observed"], "o-")
    axis.set(xlabel="predicted probability", ylabel="observed frequency", title="Calibration", xlim=(0, 1),
             ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


def write_report(predictions: Sequence[dict], output_dir: str | Path, data_description: str,
                 num_bootstrap: int = 1000) -> dict[str, Any]:
    """``report.json``, ``roc.png`` and ``calibration.png`` in ``output_dir``; returns the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = classification_report(predictions, data_description, num_bootstrap)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(predictions, report, output_dir)
    auc = report["auroc"]
    logger.info("AUROC %.3f (95%% CI %.3f-%.3f) on %s", auc["value"], auc["low"], auc["high"], data_description)
    return report
