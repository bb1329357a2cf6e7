"""One entry point for a bundle's evaluation: the report follows from the target the bundle declares.

``evaluate.json`` calls :func:`evaluate` with its ``target``; a binary classifier gets discrimination
with CIs and calibration (:mod:`oncofusion.evaluation.report`), a survival model the C-index,
time-dependent AUC and Kaplan-Meier risk groups (:mod:`oncofusion.evaluation.survival`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from oncofusion.evaluation.report import Extra, write_report
from oncofusion.evaluation.survival import write_survival_report
from oncofusion.targets import Target


def _classification(target: Target, predictions: Sequence[dict], output_dir: Path, data_description: str,
                    score_key: str, num_bootstrap: int, extra: Extra | None) -> dict[str, Any]:
    if target.kind != "binary":
        raise ValueError(f"the classification report scores one positive class; a {target.kind} target with "
                         f"classes {list(getattr(target, 'class_names', []))} has no report yet")
    return write_report(predictions, output_dir, data_description, score_key, num_bootstrap, extra=extra,
                        label_key=target.key)


def _survival(target: Target, predictions: Sequence[dict], output_dir: Path, data_description: str,
              score_key: str, num_bootstrap: int, extra: Extra | None) -> dict[str, Any]:
    report = write_survival_report(predictions, output_dir, data_description, risk_key=score_key,
                                   num_bootstrap=num_bootstrap, target=target)
    return {**report, **{name: section(predictions) for name, section in (extra or {}).items()}}


#: ``Target.evaluation`` -> report writer
EVALUATIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "classification": _classification,
    "survival": _survival,
}


def evaluate(target: Target, predictions: Sequence[dict], output_dir: str | Path, data_description: str,
             score_key: str, num_bootstrap: int = 1000, extra: Extra | None = None) -> dict[str, Any]:
    """Write the report that fits ``target`` into ``output_dir`` and return it.

    ``score_key``: the prediction's score (a positive-class probability, or a risk); ``extra``: a model
    family's own report sections (name -> function of the predictions).
    """
    if target.evaluation not in EVALUATIONS:
        raise ValueError(f"no evaluation '{target.evaluation}'; known: {sorted(EVALUATIONS)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return EVALUATIONS[target.evaluation](target, predictions, output_dir, data_description, score_key,
                                          num_bootstrap, extra)
