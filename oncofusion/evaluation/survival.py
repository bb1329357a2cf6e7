"""Evaluation report of a survival model: C-index with a bootstrap CI, time-dependent AUC, and
Kaplan-Meier curves of risk groups compared by a log-rank test, with each group's hazard ratio.

Risk groups are cut at the median or tertiles of the evaluated risks, or at ``thresholds`` fixed
beforehand (e.g. the tertiles of the training folds' out-of-fold risks, the cut-offs a served model
applies to a new patient): cut-offs taken from the evaluated cases themselves always fill the groups
evenly, which flatters a small cohort.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from oncofusion.evaluation.report import SYNTHETIC_NOTE, Extra
from oncofusion.metrics.survival import (
    bootstrap_survival,
    concordance_index,
    kaplan_meier,
    logrank_test,
    time_dependent_auc,
)
from oncofusion.targets import SurvivalTarget

logger = logging.getLogger(__name__)

__all__ = ["cox_hazard_ratios", "plot_survival_report", "risk_groups", "survival_report", "write_survival_report"]

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


def risk_groups(risk: np.ndarray, num_groups: int = 2, thresholds: Sequence[float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(group, thresholds)``: 0 = lowest risk, split at the median (2 groups) or the tertiles (3) of
    ``risk``, or at the given ascending ``thresholds`` (``num_groups - 1`` of them).

    A risk equal to a threshold joins the lower group.
    """
    if num_groups not in GROUP_NAMES:
        raise ValueError(f"num_groups must be 2 (median split) or 3 (tertiles), got {num_groups}")
    if thresholds is None:
        cut = np.quantile(np.asarray(risk, float), np.arange(1, num_groups) / num_groups)
    else:
        cut = np.asarray(thresholds, dtype=float).ravel()
        if cut.size != num_groups - 1 or not np.isfinite(cut).all() or (np.diff(cut) < 0).any():
            raise ValueError(f"{num_groups} risk groups need {num_groups - 1} finite ascending thresholds, got "
                             f"{list(np.asarray(thresholds).ravel())}")
    return np.searchsorted(cut, risk, side="left"), cut


def _cox_fit(time: np.ndarray, event: np.ndarray, x: np.ndarray, max_iter: int = 50, tol: float = 1e-9
             ) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients and covariance of a Cox model (Breslow ties) by Newton-Raphson with step halving."""
    order = np.argsort(-time, kind="stable")  # descending: a risk set is a prefix
    time, event, x = time[order], event[order], x[order]
    last_of_tie = np.r_[np.nonzero(np.diff(time))[0], time.size - 1]  # end of each run of equal times
    tie_end = np.repeat(last_of_tie, np.diff(np.r_[-1, last_of_tie]))  # per case: its risk set's end

    def terms(beta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        w = np.exp(x @ beta)
        s0 = np.cumsum(w)[tie_end]
        s1 = np.cumsum(w[:, None] * x, axis=0)[tie_end]
        s2 = np.cumsum(w[:, None, None] * x[:, :, None] * x[:, None, :], axis=0)[tie_end]
        e = event == 1
        loglik = float((x[e] @ beta).sum() - np.log(s0[e]).sum())
        gradient = (x[e] - s1[e] / s0[e, None]).sum(0)
        mean = s1[e] / s0[e, None]
        information = (s2[e] / s0[e, None, None] - mean[:, :, None] * mean[:, None, :]).sum(0)
        return loglik, gradient, information

    beta = np.zeros(x.shape[1])
    loglik, gradient, information = terms(beta)
    for _ in range(max_iter):
        step = np.linalg.solve(information, gradient)
        for _ in range(30):
            candidate = beta + step
            new = terms(candidate)
            if new[0] >= loglik - 1e-12:
                break
            step = step / 2
        beta, (previous, (loglik, gradient, information)) = candidate, (loglik, new)
        if abs(loglik - previous) < tol:
            break
    return beta, np.linalg.inv(information)


def cox_hazard_ratios(time: np.ndarray, event: np.ndarray, group: np.ndarray, names: Sequence[str],
                      confidence: float = 0.95) -> dict[str, Any]:
    """Hazard ratio of each risk group against the lowest (group 0), from one Cox model on group
    indicators, with Wald CIs and p values; and the ratio per step up the ordered groups (a Cox model
    on the group index, the usual trend summary). A ratio that cannot be estimated (a group without
    members or without events, or groups separating the events perfectly) is None, with the reason.
    """
    time, event, group = np.asarray(time, float), np.asarray(event, int), np.asarray(group, int)
    z = norm.ppf(0.5 + confidence / 2)

    def summary(beta: float, variance: float) -> dict[str, float]:
        se = float(np.sqrt(variance))
        return {"hazard_ratio": float(np.exp(beta)), "low": float(np.exp(beta - z * se)),
                "high": float(np.exp(beta + z * se)), "p_value": float(2 * norm.sf(abs(beta) / se))}

    def estimable(x: np.ndarray) -> str | None:
        if not event.any():
            return "no event"
        for column in range(x.shape[1]):
            values = x[:, column]
            if np.unique(values).size < 2:
                return "a group without members"
        try:
            beta, covariance = _cox_fit(time, event, x)
        except np.linalg.LinAlgError:
            return "the Cox model did not converge (groups separate the events)"
        if not (np.isfinite(beta).all() and np.isfinite(covariance).all()) or np.abs(beta).max() > 15:
            return "the Cox model did not converge (a group without events, or groups separating the events)"
        return None

    result: dict[str, Any] = {"reference": names[0], "confidence": confidence,
                              "model": "Cox proportional hazards (Breslow ties), Wald intervals", "groups": {},
                              "per_group_step": None}
    dummies = np.stack([(group == g).astype(float) for g in range(1, len(names))], axis=1)
    reason = estimable(dummies)
    if reason is None:
        beta, covariance = _cox_fit(time, event, dummies)
        result["groups"] = {name: summary(beta[g], covariance[g, g]) for g, name in enumerate(names[1:])}
    else:
        result["groups"] = {name: None for name in names[1:]}
        result["not_estimable"] = reason
    trend = group[:, None].astype(float)
    if estimable(trend) is None:
        beta, covariance = _cox_fit(time, event, trend)
        result["per_group_step"] = summary(beta[0], covariance[0, 0])
    return result


def survival_report(predictions: Sequence[Mapping], data_description: str, risk_key: str = "risk",
                    num_bootstrap: int = 1000, seed: int = 0, horizons: Sequence[float] | None = None,
                    num_groups: int = 2, target: SurvivalTarget | None = None,
                    thresholds: Sequence[float] | None = None, thresholds_from: str | None = None,
                    extra: Extra | None = None) -> dict[str, Any]:
    """Discrimination and risk stratification of ``predictions`` (records with time, event and risk).

    Args:
        predictions: one record per case holding the target's time and event keys and ``risk_key``.
        data_description: what the cases are; copied into the report next to the synthetic-data note.
        horizons: times for the time-dependent AUC; by default the quartiles of the event times.
        num_groups: 2 splits at the median risk, 3 at the tertiles.
        target: names the time and event keys and the time unit (default ``SurvivalTarget()``).
        thresholds: fixed ascending cut-offs of the risk groups (``num_groups - 1``), e.g. from the
            training folds; None cuts at the quantiles of these ``predictions``.
        thresholds_from: where fixed ``thresholds`` come from, copied into the report.
        extra: a model family's own sections (name -> function of the predictions), e.g. a grade AUROC.
    """
    target = target or SurvivalTarget()
    time, event, risk = _arrays(predictions, target, risk_key)
    if horizons is None:
        event_times = time[event == 1]
        horizons = np.quantile(event_times, [0.25, 0.5, 0.75]) if event_times.size else np.array([])
    horizons = np.asarray(horizons, dtype=float).ravel()
    fixed = thresholds is not None
    group, thresholds = risk_groups(risk, num_groups, thresholds)
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
                        "thresholds_from": (thresholds_from or "given") if fixed else "these predictions",
                        "groups": groups, "logrank": logrank,
                        "hazard_ratios": cox_hazard_ratios(time, event, group, names)},
        **{name: section(predictions) for name, section in (extra or {}).items()},
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

    ``kwargs`` go to :func:`survival_report` (``risk_key`` and ``target`` to the plots as well; ``extra``
    sections are written into ``report.json`` with the rest).
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
