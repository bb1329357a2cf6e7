"""Evaluation report of a survival model: C-index with a bootstrap CI, time-dependent AUC, and
Kaplan-Meier curves of risk groups compared by a log-rank test."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.evaluation.report import SYNTHETIC_NOTE
from oncofusion.metrics.survival import (
    bootstrap_survival,
    concordance_index,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
)
from oncofusion.targets import SurvivalTarget

logger = logging.getLogger(__name__)

__all__ = ["plot_survival_report", "risk_groups", "survival_report", "write_survival_report"]

GROUP_NAMES = {2: ("low", "high"), 3: ("low", "intermediate", "high")}


def _arrays(predictions: Sequence[Mapping], target: SurvivalTarget, risk_key: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``time``, ``event`` and ``risk`` of every prediction, validated by the target."""
    if not predictions:
        raise ValueError("no predictions to evaluate")
    fields = [target.parse(r) for r in predictions]
    missing = [r.get("case_id", f"#{i}") for i, r in enumerate(predictions) if risk_key not in r]
    if missing:
        raise ValueError(f"predictions {missing[:5]} lack the key '{risk_key}'; pass the key that holds the "
                         f"predicted risk (higher = shorter survival) as risk_key")
    time = np.array([f[target.time_key] for f in fields], dtype=float)
    event = np.array([f[target.event_key] for f in fields], dtype=int)
    risk = np.array([float(r[risk_key]) for r in predictions])
    return time, event, risk


def risk_groups(risk: np.ndarray, num_groups: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(group, thresholds)``: 0 = lowest risk, split at the median (2 groups) or the tertiles (3).

    A risk equal to a threshold joins the lower group.
    """
    if num_groups not in GROUP_NAMES:
        raise ValueError(f"num_groups must be 2 (median split) or 3 (tertiles), got {num_groups}")
    thresholds = np.quantile(np.asarray(risk, float), np.arange(1, num_groups) / num_groups)
    return np.searchsorted(thresholds, risk, side="left"), thresholds


def survival_report(predictions: Sequence[Mapping], data_description: str, risk_key: str = "risk",
                    num_bootstrap: int = 1000, seed: int = 0, horizons: Sequence[float] | None = None,
                    num_groups: int = 2, target: SurvivalTarget | None = None) -> dict[str, Any]:
    """Discrimination and risk stratification of ``predictions`` (records with time, event and risk).

    Args:
        predictions: one record per case holding the target's time and event keys and ``risk_key``.
        data_description: what the cases are; copied into the report next to the synthetic-data note.
        horizons: times for the time-dependent AUC; by default the quartiles of the event times.
        num_groups: 2 splits at the median risk, 3 at the tertiles.
        target: names the time and event keys and the time unit (default ``SurvivalTarget()``).
    """
    target = target or SurvivalTarget()
    time, event, risk = _arrays(predictions, target, risk_key)
    if horizons is None:
        event_times = time[event == 1]
        horizons = np.quantile(event_times, [0.25, 0.5, 0.75]) if event_times.size else np.array([])
    horizons = np.asarray(horizons, dtype=float).ravel()
    group, thresholds = risk_groups(risk, num_groups)
    names = GROUP_NAMES[num_groups]
    present = np.unique(group)
    logrank = logrank_test(time, event, group).to_dict() if present.size > 1 else None
    if logrank is None:
        logger.warning("all risks fall in one group: no log-rank test")
    groups = []
    for g, name in enumerate(names):
        members = group == g
        groups.append({"name": name, "num_cases": int(members.sum()), "num_events": int(event[members].sum())})
    return {
        "data": data_description,
        "note": SYNTHETIC_NOTE,
        "time_unit": target.time_unit,
        "num_cases": int(time.size),
        "num_events": int(event.sum()),
        "c_index": bootstrap_survival(concordance_index, time, risk, event, num_bootstrap, seed=seed).to_dict(),
        "time_dependent_auc": {
            "horizons": horizons.tolist(),
            "auc": time_dependent_auc(time, risk, event, horizons).tolist(),
            "estimator": "cumulative/dynamic AUC with inverse-probability-of-censoring weights (Uno 2007)",
        },
        "risk_groups": {"split": "median" if num_groups == 2 else "tertiles", "thresholds": thresholds.tolist(),
                        "groups": groups, "logrank": logrank},
    }


def plot_survival_report(predictions: Sequence[Mapping], report: Mapping[str, Any], output_dir: str | Path,
                         risk_key: str = "risk", target: SurvivalTarget | None = None) -> list[Path]:
    """``km_risk_groups.png`` (Kaplan-Meier per risk group, log-rank p in the legend) and ``td_auc.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = target or SurvivalTarget()
    output_dir = Path(output_dir)
    time, event, risk = _arrays(predictions, target, risk_key)
    stratification = report["risk_groups"]
    group = np.searchsorted(np.asarray(stratification["thresholds"], float), risk, side="left")
    paths = [output_dir / "km_risk_groups.png", output_dir / "td_auc.png"]

    figure, axis = plt.subplots(figsize=(5, 4))
    for g, info in enumerate(stratification["groups"]):
        members = group == g
        if members.any():
            times, survival = kaplan_meier(time[members], event[members])
            axis.step(times, survival, where="post",
                      label=f"{info['name']} risk (n={info['num_cases']}, {info['num_events']} events)")
    logrank = stratification["logrank"]
    if logrank is not None:
        axis.plot([], [], " ", label=f"log-rank p = {logrank['p_value']:.3g}")
    axis.set(xlabel=f"time ({report.get('time_unit', target.time_unit)})", ylabel="survival probability",
             ylim=(0, 1.02), title="Kaplan-Meier by predicted risk")
    axis.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    auc = report["time_dependent_auc"]
    c_index = report["c_index"]
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.plot(auc["horizons"], auc["auc"], "o-", label="time-dependent AUC")
    axis.axhline(c_index["value"], color="k", ls="--", lw=0.8,
                 label=f"C-index {c_index['value']:.3f} ({c_index['low']:.3f}-{c_index['high']:.3f})")
    axis.axhline(0.5, color="k", ls=":", lw=0.8)
    axis.set(xlabel=f"horizon ({report.get('time_unit', target.time_unit)})", ylabel="AUC", ylim=(0, 1),
             title="Cumulative/dynamic AUC")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


def write_survival_report(predictions: Sequence[Mapping], output_dir: str | Path, data_description: str,
                          **kwargs: Any) -> dict[str, Any]:
    """``report.json``, ``km_risk_groups.png`` and ``td_auc.png`` in ``output_dir``; returns the report.

    ``kwargs`` go to :func:`survival_report` (``risk_key`` and ``target`` to the plots as well).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = survival_report(predictions, data_description, **kwargs)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_survival_report(predictions, report, output_dir, risk_key=kwargs.get("risk_key", "risk"),
                         target=kwargs.get("target"))
    c_index = report["c_index"]
    logger.info("C-index %.3f (95%% CI %.3f-%.3f) on %s", c_index["value"], c_index["low"], c_index["high"],
                data_description)
    return report
