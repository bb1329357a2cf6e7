"""Evaluation report of a binary classifier: AUROC/AUPRC with bootstrap CIs, calibration and ROC plots.

The score is read from each prediction under ``score_key`` (a model's positive-class probability, e.g.
``malignancy_probability``) and the truth under ``label_key``; a model family adds its own sections
through ``extra`` (name -> function of the predictions).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.metrics.classification import auprc, auroc, bootstrap, calibration_curve, roc_curve

logger = logging.getLogger(__name__)

SYNTHETIC_NOTE = ("Computed on the data named in 'data'. On the bundled SYNTHETIC sample data these numbers "
                  "check the pipeline; they are not clinical performance.")


Extra = Mapping[str, Callable[[Sequence[dict]], Any]]


def labels_and_scores(predictions: Sequence[dict], score_key: str, label_key: str = "label"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Truth and score arrays; a prediction lacking either is an error naming the case and the key."""
    for row in predictions:
        for key in (label_key, score_key):
            if key not in row:
                raise ValueError(f"prediction of case {row.get('case_id', '?')} lacks '{key}'")
    return (np.array([int(r[label_key]) for r in predictions]),
            np.array([float(r[score_key]) for r in predictions]))


def classification_report(predictions: Sequence[dict], data_description: str, score_key: str,
                          num_bootstrap: int = 1000, seed: int = 0, label_key: str = "label",
                          extra: Extra | None = None) -> dict[str, Any]:
    """Discrimination with 95 % CIs and calibration of ``predictions``, plus each ``extra`` section."""
    labels, scores = labels_and_scores(predictions, score_key, label_key)
    return {
        "data": data_description,
        "note": SYNTHETIC_NOTE,
        "num_cases": int(labels.size),
        "num_positive": int(labels.sum()),
        "auroc": bootstrap(auroc, labels, scores, num_bootstrap, seed=seed).to_dict(),
        "auprc": bootstrap(auprc, labels, scores, num_bootstrap, seed=seed).to_dict(),
        "score": score_key,
        "label": label_key,
        "calibration": calibration_curve(labels, scores, num_bins=10),
        **{name: section(predictions) for name, section in (extra or {}).items()},
    }


def plot_report(predictions: Sequence[dict], report: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """ROC curve and calibration curve as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    labels, scores = labels_and_scores(predictions, report["score"], report.get("label", "label"))
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


def write_report(predictions: Sequence[dict], output_dir: str | Path, data_description: str, score_key: str,
                 num_bootstrap: int = 1000, extra: Extra | None = None, label_key: str = "label") -> dict[str, Any]:
    """``report.json``, ``roc.png`` and ``calibration.png`` in ``output_dir``; returns the report.

    ``label_key``: the prediction key holding the true class index (the target's ``key``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = classification_report(predictions, data_description, score_key, num_bootstrap, label_key=label_key,
                                   extra=extra)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(predictions, report, output_dir)
    auc = report["auroc"]
    logger.info("AUROC %.3f (95%% CI %.3f-%.3f) on %s", auc["value"], auc["low"], auc["high"], data_description)
    return report
