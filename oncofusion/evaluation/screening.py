"""Clinical-feature screening: which clinical fields carry signal about the label?

The papers keep the clinical features that a multivariable logistic regression on the training table
finds significant, then fuse those with the image. This module runs that step on a case table with
``statsmodels``: odds ratios with Wald 95 % confidence intervals and p-values per term, a
likelihood-ratio test per field (a categorical field has several terms), and a JSON + markdown report.
It also gives the clinical-only baseline a fused model should beat: an out-of-fold logistic
regression on the same encoded vector the network sees.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.data.clinical import BooleanField, CategoricalField, ClinicalSchema, NumericField

logger = logging.getLogger(__name__)

SYNTHETIC_NOTE = ("Fitted on the table named in 'data'. On the bundled SYNTHETIC sample data the odds ratios "
                  "reflect the generator's distributions, not epidemiology.")


def _step_label(step: float, unit: str) -> str:
    return f"per {step:g} {unit}".strip() if step != 1 else (f"per {unit}" if unit else "per unit")


def design_matrix(records: Sequence[Mapping[str, Any]], schema: ClinicalSchema
                  ) -> tuple[np.ndarray, list[str], list[str]]:
    """Regression columns (no intercept), their term names and the field each belongs to.

    Categorical fields: one dummy per non-reference value. Numeric: the value per ``report_step``
    (missing values imputed with the observed mean). Boolean: yes vs no. A field that is missing in
    some rows gets a missing-indicator column, as in the network's encoding.
    """
    values = [schema.validate(r) for r in records]
    columns: list[np.ndarray] = []
    names: list[str] = []
    fields: list[str] = []
    for f in schema.fields:
        observed = [v[f.name] for v in values]
        missing = np.array([v is None for v in observed])
        if isinstance(f, CategoricalField):
            for level in f.values:
                if level == f.baseline:
                    continue
                columns.append(np.array([v == level for v in observed], float))
                names.append(f"{f.name}: {level} vs {f.baseline}")
                fields.append(f.name)
        elif isinstance(f, NumericField):
            present = np.array([float(v) for v in observed if v is not None])
            fill = float(present.mean()) if present.size else 0.0
            numbers = np.array([fill if v is None else float(v) for v in observed])
            columns.append(numbers / f.report_step)
            names.append(f"{f.name} ({_step_label(f.report_step, f.unit)})")
            fields.append(f.name)
        elif isinstance(f, BooleanField):
            columns.append(np.array([bool(v) if v is not None else False for v in observed], float))
            names.append(f"{f.name}: yes vs no")
            fields.append(f.name)
        if missing.any():
            columns.append(missing.astype(float))
            names.append(f"{f.name}: missing")
            fields.append(f.name)
    matrix = np.stack(columns, axis=1) if columns else np.zeros((len(records), 0))
    return matrix, names, fields


def _fit(y: np.ndarray, x: np.ndarray):
    """Maximum-likelihood logistic regression with an intercept; warnings (separation) are kept."""
    import statsmodels.api as sm

    with warnings.catch_warnings(record=True) as caught, np.errstate(over="ignore", divide="ignore"):
        warnings.simplefilter("always")
        result = sm.Logit(y, sm.add_constant(x, has_constant="add")).fit(disp=0, maxiter=200, method="newton")
    messages = [str(w.message) for w in caught]
    return result, list(dict.fromkeys(m for m in messages if "converge" in m.lower() or "separation" in m.lower()))


def screening_report(records: Sequence[Mapping[str, Any]], schema: ClinicalSchema, data_description: str = "",
                     alpha: float = 0.05, outcome: str = "label 1 vs label 0") -> dict[str, Any]:
    """Multivariable logistic regression of ``label`` on every clinical field, with per-field LR tests."""
    from scipy.stats import chi2

    y = np.array([int(r["label"]) for r in records])
    x, names, fields = design_matrix(records, schema)
    report: dict[str, Any] = {
        "data": data_description,
        "note": SYNTHETIC_NOTE,
        "method": ("multivariable logistic regression (statsmodels Logit, Newton); odds ratios with Wald 95 % CIs; "
                   "one likelihood-ratio test per field (all its terms dropped together)"),
        "outcome": outcome,
        "alpha": alpha,
        "num_cases": int(y.size),
        "num_events": int(y.sum()),
    }
    keep = x.std(axis=0) > 0 if x.size else np.zeros(0, bool)
    dropped = [n for n, k in zip(names, keep, strict=True) if not k]
    x = x[:, keep]
    names = [n for n, k in zip(names, keep, strict=True) if k]
    fields = [f for f, k in zip(fields, keep, strict=True) if k]
    report["dropped_terms"] = dropped
    if len(np.unique(y)) < 2 or y.size <= x.shape[1] + 1:
        report["error"] = (f"cannot fit {x.shape[1] + 1} coefficients to {y.size} cases with "
                           f"{int(y.sum())} events: too few cases or a single class")
        report.update({"terms": [], "fields": [], "selected_fields": []})
        return report
    try:
        full, fit_warnings = _fit(y, x)
    except Exception as e:  # singular design, perfect prediction: report instead of crashing the bundle run
        report["error"] = f"logistic regression failed: {type(e).__name__}: {e}"
        report.update({"terms": [], "fields": [], "selected_fields": []})
        return report
    report["converged"] = bool(full.mle_retvals.get("converged", False))
    report["warnings"] = fit_warnings
    if not report["converged"] or any("separation" in w.lower() for w in fit_warnings):
        # infinite coefficients: odds ratios and p-values would be noise, so none are reported
        report["error"] = (f"the fit did not converge or the classes are perfectly separated on {y.size} cases with "
                           f"{int(y.sum())} events: odds ratios are not identifiable; add cases or fields with less "
                           "sparse categories")
        report.update({"terms": [], "fields": [], "selected_fields": []})
        return report
    params, intervals, pvalues = full.params[1:], full.conf_int(alpha=0.05)[1:], full.pvalues[1:]
    report["pseudo_r2"] = float(full.prsquared)
    report["terms"] = [
        {"term": name, "field": field, "odds_ratio": float(np.exp(b)), "ci_low": float(np.exp(lo)),
         "ci_high": float(np.exp(hi)), "p_value": float(p)}
        for name, field, b, (lo, hi), p in zip(names, fields, params, intervals, pvalues, strict=True)
    ]
    field_tests = []
    for name in dict.fromkeys(fields):
        own = np.array([f == name for f in fields])
        try:
            reduced, _ = _fit(y, x[:, ~own])
            statistic = max(0.0, 2.0 * float(full.llf - reduced.llf))
            p_value = float(chi2.sf(statistic, int(own.sum())))
        except Exception as e:
            logger.warning("likelihood-ratio test of %s failed: %s", name, e)
            statistic, p_value = float("nan"), float("nan")
        field_tests.append({"field": name, "df": int(own.sum()), "lr_statistic": statistic, "p_value": p_value,
                            "selected": bool(p_value < alpha)})
    report["fields"] = field_tests
    report["selected_fields"] = [t["field"] for t in field_tests if t["selected"]]
    return report


def _fmt_p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def screening_markdown(report: Mapping[str, Any]) -> str:
    """The report as a markdown page: terms table, field tests, what was selected."""
    lines = [
        "# Clinical-feature screening",
        "",
        f"- data: {report['data']}",
        f"- outcome: {report['outcome']}; {report['num_cases']} cases, {report['num_events']} events",
        f"- method: {report['method']}",
        f"- note: {report['note']}",
        "",
    ]
    if report.get("error"):
        return "\n".join([*lines, f"**Not fitted:** {report['error']}", ""])
    lines += ["| term | odds ratio | 95 % CI | p |", "|---|---|---|---|"]
    for t in report["terms"]:
        lines.append(f"| {t['term']} | {t['odds_ratio']:.2f} | {t['ci_low']:.2f}-{t['ci_high']:.2f} | "
                     f"{_fmt_p(t['p_value'])} |")
    lines += ["", f"Per field (likelihood-ratio test, selected when p < {report['alpha']:g}):", "",
              "| field | df | LR chi2 | p | selected |", "|---|---|---|---|---|"]
    for t in report["fields"]:
        lines.append(f"| {t['field']} | {t['df']} | {t['lr_statistic']:.2f} | {_fmt_p(t['p_value'])} | "
                     f"{'yes' if t['selected'] else 'no'} |")
    lines += ["", f"Selected: {', '.join(report['selected_fields']) or 'none'}. "
              f"McFadden pseudo-R2 {report['pseudo_r2']:.3f}."]
    if report.get("dropped_terms"):
        lines.append(f"Terms without variation, left out: {', '.join(report['dropped_terms'])}.")
    if report.get("warnings"):
        lines.append(f"Fit warnings: {'; '.join(report['warnings'])}.")
    return "\n".join(lines) + "\n"


def write_screening(records: Sequence[Mapping[str, Any]], schema: ClinicalSchema, output_dir: str | Path,
                    data_description: str = "", alpha: float = 0.05, outcome: str = "label 1 vs label 0"
                    ) -> dict[str, Any]:
    """``screening.json`` and ``screening.md`` in ``output_dir``; returns the report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = screening_report(records, schema, data_description, alpha, outcome)
    (output_dir / "screening.json").write_text(json.dumps(report, indent=2))
    (output_dir / "screening.md").write_text(screening_markdown(report))
    logger.info("clinical screening on %d cases: selected %s", report["num_cases"],
                ", ".join(report.get("selected_fields", [])) or "none")
    return report


def out_of_fold_clinical(records: Sequence[Mapping[str, Any]], schema: ClinicalSchema,
                         score_key: str = "probability", regularization: float = 1.0,
                         folds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Clinical-only baseline: per fold, an L2 logistic regression on the other folds' encoded vectors.

    It sees exactly the vector the fused network gets, so the gap between the two is what the image adds.
    The mild L2 penalty (``C = regularization``) keeps small or separable tables fittable. ``records`` is
    the whole table (every fold trains the others); ``folds`` limits which folds' predictions are returned.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.stack([schema.encode_raw(r) for r in records])
    y = np.array([int(r["label"]) for r in records])
    case_folds = np.array([int(r["fold"]) for r in records])
    scores = np.full(len(records), np.nan)
    for fold in np.unique(case_folds):
        train, test = case_folds != fold, case_folds == fold
        if len(np.unique(y[train])) < 2:
            scores[test] = y[train].mean() if train.any() else 0.5
            continue
        model = LogisticRegression(C=regularization, max_iter=1000).fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    keys = ("case_id", "patient_id", "label", "fold")
    wanted = None if folds is None else {int(f) for f in folds}
    return [{**{k: r[k] for k in keys if k in r}, score_key: float(s)} for r, s in zip(records, scores, strict=True)
            if wanted is None or int(r["fold"]) in wanted]
