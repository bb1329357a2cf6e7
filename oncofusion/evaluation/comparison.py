"""Side-by-side evaluation of several binary classifiers on the same cases, with paired DeLong tests.

The papers compare a fused model with its image-only ablation (and with readers) on one test set.
Per model: AUROC with a bootstrap 95 % CI (and DeLong's asymptotic CI), AUPRC, and accuracy, F1,
sensitivity and specificity at a threshold with bootstrap CIs. Per pair: DeLong's test of the AUROC
difference. One ROC plot holds every model. A reference block (e.g. a synthetic generator's
Bayes-optimal AUROC) is carried into the report so the numbers can be read against the ceiling.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.metrics.classification import auprc, auroc, bootstrap, roc_curve
from oncofusion.metrics.delong import delong_interval, delong_test
from oncofusion.metrics.threshold import THRESHOLD_METRICS, confusion, youden_threshold

logger = logging.getLogger(__name__)

SYNTHETIC_NOTE = ("Computed on the data named in 'data'. On the bundled SYNTHETIC sample data these numbers "
                  "check the pipeline and the fusion; they are not clinical performance.")


def align(predictions: Mapping[str, Sequence[Mapping[str, Any]]], score_key: str
          ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Case ids, labels and each model's scores on the cases every model predicted, in one order.

    Paired tests need the same cases; a case one model lacks is an error, not silently dropped.
    """
    names = list(predictions)
    if not names:
        raise ValueError("no predictions to compare")
    by_model = {name: {str(r["case_id"]): r for r in rows} for name, rows in predictions.items()}
    case_ids = list(by_model[names[0]])
    for name in names[1:]:
        if set(by_model[name]) != set(case_ids):
            missing = sorted(set(case_ids) ^ set(by_model[name]))[:5]
            raise ValueError(f"models '{names[0]}' and '{name}' predicted different cases (e.g. {missing})")
    labels = np.array([int(by_model[names[0]][c]["label"]) for c in case_ids])
    for name in names[1:]:
        other = np.array([int(by_model[name][c]["label"]) for c in case_ids])
        if not np.array_equal(labels, other):
            raise ValueError(f"models '{names[0]}' and '{name}' disagree on the labels of the same cases")
    scores = {name: np.array([float(by_model[name][c][score_key]) for c in case_ids]) for name in names}
    return case_ids, labels, scores


def model_metrics(labels: np.ndarray, scores: np.ndarray, num_bootstrap: int = 1000, threshold: float = 0.5,
                  seed: int = 0) -> dict[str, Any]:
    """AUROC (bootstrap and DeLong CIs), AUPRC and the threshold metrics with bootstrap CIs."""
    value, low, high = delong_interval(labels, scores)
    metrics: dict[str, Any] = {
        "auroc": bootstrap(auroc, labels, scores, num_bootstrap, seed=seed).to_dict(),
        "auroc_delong_ci": {"value": value, "low": low, "high": high},
        "auprc": bootstrap(auprc, labels, scores, num_bootstrap, seed=seed).to_dict(),
        "threshold": threshold,
        "confusion": confusion(labels, scores, threshold),
    }
    for name, metric in THRESHOLD_METRICS.items():
        metrics[name] = bootstrap(functools.partial(metric, threshold=threshold), labels, scores, num_bootstrap,
                                  seed=seed).to_dict()
    return metrics


def comparison_report(predictions: Mapping[str, Sequence[Mapping[str, Any]]], data_description: str,
                      score_key: str = "probability", num_bootstrap: int = 1000, threshold: float = 0.5,
                      pairs: Sequence[Sequence[str]] | None = None, reference: Mapping[str, Any] | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """Every model's metrics and the DeLong test of each pair (default: the first model against each other)."""
    case_ids, labels, scores = align(predictions, score_key)
    names = list(scores)
    pairs = [tuple(p) for p in pairs] if pairs else [(names[0], other) for other in names[1:]]
    for a, b in pairs:
        if a not in scores or b not in scores:
            raise ValueError(f"pair ({a!r}, {b!r}) names a model without predictions (have {names})")
    return {
        "data": data_description,
        "note": SYNTHETIC_NOTE,
        "score": score_key,
        "num_cases": int(labels.size),
        "num_positive": int(labels.sum()),
        "models": {name: model_metrics(labels, s, num_bootstrap, threshold, seed) for name, s in scores.items()},
        "comparisons": [{"a": a, "b": b, "test": "DeLong (paired, two-sided)",
                         **delong_test(labels, scores[a], scores[b]).to_dict()} for a, b in pairs],
        "reference": dict(reference or {}),
    }


def _ci(estimate: Mapping[str, float], digits: int = 3) -> str:
    return f"{estimate['value']:.{digits}f} ({estimate['low']:.{digits}f}-{estimate['high']:.{digits}f})"


def comparison_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown page."""
    lines = ["# Model comparison", "", f"- data: {report['data']}",
             f"- cases: {report['num_cases']} ({report['num_positive']} positive); score: `{report['score']}`",
             f"- note: {report['note']}", "",
             "| model | AUROC (95 % bootstrap CI) | AUPRC | accuracy | F1 | sensitivity | specificity |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {_ci(m['auroc'])} | {_ci(m['auprc'])} | {_ci(m['accuracy'])} | {_ci(m['f1'])} | "
                     f"{_ci(m['sensitivity'])} | {_ci(m['specificity'])} |")
    threshold = next(iter(report["models"].values()))["threshold"] if report["models"] else 0.5
    lines += ["", f"Threshold metrics at probability >= {threshold:g}.", "",
              "| comparison | AUROC difference (95 % CI) | DeLong z | p |", "|---|---|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['a']} vs {c['b']} | {c['difference']:+.3f} ({c['ci_low']:+.3f} to {c['ci_high']:+.3f}) | "
                     f"{c['z']:.2f} | {c['p_value']:.4f} |")
    if report.get("reference"):
        lines += ["", "Reference:", ""] + [f"- {k}: {v}" for k, v in report["reference"].items()]
    return "\n".join(lines) + "\n"


def plot_roc(report: Mapping[str, Any], labels: np.ndarray, scores: Mapping[str, np.ndarray], path: str | Path
             ) -> Path:
    """One ROC plot with every model, AUROC and CI in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for name, s in scores.items():
        fpr, tpr = roc_curve(labels, s)
        axis.plot(fpr, tpr, label=f"{name}: {_ci(report['models'][name]['auroc'])}")
    axis.plot([0, 1], [0, 1], "k:", lw=0.8)
    axis.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1))
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def write_comparison(predictions: Mapping[str, Sequence[Mapping[str, Any]]], output_dir: str | Path,
                     data_description: str, score_key: str = "probability", num_bootstrap: int = 1000,
                     threshold: float = 0.5, pairs: Sequence[Sequence[str]] | None = None,
                     reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``report.json``, ``report.md`` and ``roc.png`` in ``output_dir``; returns the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = comparison_report(predictions, data_description, score_key, num_bootstrap, threshold, pairs, reference)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (output_dir / "report.md").write_text(comparison_markdown(report))
    _, labels, scores = align(predictions, score_key)
    plot_roc(report, labels, scores, output_dir / "roc.png")
    for name, m in report["models"].items():
        logger.info("%s: AUROC %s on %s", name, _ci(m["auroc"]), data_description)
    for c in report["comparisons"]:
        logger.info("%s vs %s: AUROC difference %+.3f, DeLong p %.4f", c["a"], c["b"], c["difference"], c["p_value"])
    return report


# -- thresholds chosen on the training folds --------------------------------------------------------
def training_fold_thresholds(rows: Sequence[Mapping[str, Any]], score_key: str, label_key: str = "label"
                             ) -> dict[int, float]:
    """For each fold ``k``: :func:`youden_threshold` on the out-of-fold scores of the other folds' cases (the
    cases fold ``k``'s model trained on, each scored by a model that did not train on it)."""
    folds = np.array([int(r["fold"]) for r in rows])
    labels = np.array([int(r[label_key]) for r in rows])
    scores = np.array([float(r[score_key]) for r in rows])
    return {int(k): youden_threshold(labels[folds != k], scores[folds != k]) for k in np.unique(folds)}


def threshold_section(predictions: Mapping[str, Sequence[Mapping[str, Any]]], score_key: str,
                      num_bootstrap: int = 1000, label_key: str = "label") -> dict[str, Any]:
    """Per model: the threshold of each fold (:func:`training_fold_thresholds`) and accuracy, sensitivity,
    specificity and F1 of every case at its own fold's threshold, with bootstrap 95 % CIs."""
    section: dict[str, Any] = {}
    for name, rows in predictions.items():
        thresholds = training_fold_thresholds(rows, score_key, label_key)
        labels = np.array([int(r[label_key]) for r in rows])
        # shifting each score by its fold's threshold turns "score >= t_fold" into "shifted >= 0.5"
        shifted = np.array([float(r[score_key]) - thresholds[int(r["fold"])] + 0.5 for r in rows])
        section[name] = {"thresholds": {str(k): round(v, 4) for k, v in thresholds.items()}}
        for metric_name, metric in THRESHOLD_METRICS.items():
            section[name][metric_name] = bootstrap(metric, labels, shifted, num_bootstrap).to_dict()
    return section


def write_ablation_report(predictions: Mapping[str, Sequence[Mapping[str, Any]]], output_dir: str | Path,
                          data_description: str, score_key: str, num_bootstrap: int = 1000, threshold: float = 0.5,
                          reference: Mapping[str, Any] | None = None, out_of_fold: bool = True) -> dict[str, Any]:
    """The comparison report (every variant's AUROC/AUPRC with CIs, DeLong tests of the first against each
    other, threshold metrics at ``threshold``) plus, out of fold, the threshold metrics at thresholds chosen
    on the training folds; ``report.json``, ``report.md``, ``roc.png`` in ``output_dir``."""
    report = write_comparison(predictions, output_dir, data_description, score_key, num_bootstrap, threshold,
                              reference=reference)
    if not out_of_fold:
        return report
    section = threshold_section(predictions, score_key, num_bootstrap)
    report["threshold_from_training_folds"] = {
        "method": "per fold k, the threshold maximising Youden's J on the out-of-fold scores of the other folds' "
                  "cases (the training folds of k's model); each case is classified at its own fold's threshold",
        "models": section,
    }
    output_dir = Path(output_dir)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["", "## Threshold chosen on the training folds", "", report["threshold_from_training_folds"]["method"] + ".",
             "", "| model | thresholds by fold | accuracy | sensitivity | specificity | F1 |", "|---|---|---|---|---|---|"]
    for name, m in section.items():
        thresholds = ", ".join(f"{k}: {v:.2f}" for k, v in m["thresholds"].items())
        lines.append(f"| {name} | {thresholds} | {_ci(m['accuracy'])} | {_ci(m['sensitivity'])} | "
                     f"{_ci(m['specificity'])} | {_ci(m['f1'])} |")
    with open(output_dir / "report.md", "a") as markdown:
        markdown.write("\n".join(lines) + "\n")
    for name, m in section.items():
        logger.info("%s: accuracy %s at training-fold thresholds", name, _ci(m["accuracy"]))
    return report
