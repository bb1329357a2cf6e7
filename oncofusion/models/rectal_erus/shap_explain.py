"""SHAP explanations of the rectal ERUS booster ensemble, summed per modality (image vs report text).

Why TreeExplainer on log-odds: for trees it is exact (LightGBM's own TreeSHAP, no sampling, no background
set), and in log-odds SHAP values are additive: ``base_value + values.sum() == raw score``. Probabilities
are not additive, so contributions there would depend on the order features are added. Averaging the
members' SHAP values explains the mean of their log-odds, whose sigmoid is close to (not equal to) the
ensemble's mean probability.

Why per-modality sums: a CLIP embedding column means nothing on its own; the sum of a modality's
columns says how much the image, or the report, pushed this patient's score (the paper's finding: the
image dominates with RN50 features, both matter with ViT-B/16).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncofusion.io.atomic import atomic_write_bytes
from oncofusion.models.rectal_erus.booster import BoosterEnsemble

logger = logging.getLogger(__name__)

#: bar colour of the features folded into one "N other features" bar
OTHER_COLOUR = "#9e9e9e"


@dataclass
class ShapExplanation:
    """SHAP values ``(B, D)`` in log-odds (mean over members) for the rows ``features`` ``(B, D)``.

    ``base_value``: the members' mean expected log-odds; ``feature_groups[j]``: column ``j``'s modality.
    """

    values: np.ndarray
    base_value: float
    feature_names: list[str]
    feature_groups: list[str]
    features: np.ndarray

    @property
    def groups(self) -> list[str]:
        """The modalities, in the order their first column appears."""
        return list(dict.fromkeys(self.feature_groups))

    def _masks(self) -> dict[str, np.ndarray]:
        groups = np.asarray(self.feature_groups)
        return {g: groups == g for g in self.groups}

    def by_group(self, row: int) -> dict[str, float]:
        """Sum of ``row``'s SHAP values per modality (log-odds each modality adds to the base value)."""
        return {g: float(self.values[row, m].sum()) for g, m in self._masks().items()}

    def group_shares(self, row: int) -> dict[str, float]:
        """Each modality's share of ``row``'s total absolute SHAP contribution (sums to 1; all 0 when no
        feature contributes at all). Absolute values, so that columns pushing opposite ways both count."""
        magnitude = np.abs(self.values[row])
        return _shares({g: float(magnitude[m].sum()) for g, m in self._masks().items()})

    def overall_shares(self) -> dict[str, float]:
        """Each modality's share of the mean absolute SHAP value over all rows (the summary plot's figure)."""
        magnitude = np.abs(self.values).mean(0)
        return _shares({g: float(magnitude[m].sum()) for g, m in self._masks().items()})

    def top(self, row: int, n: int = 10) -> list[dict[str, Any]]:
        """``row``'s ``n`` largest contributions by ``|shap|``: name, group, feature value and SHAP value."""
        order = np.argsort(-np.abs(self.values[row]), kind="stable")[:n]
        return [{"name": self.feature_names[j], "group": self.feature_groups[j],
                 "value": float(self.features[row, j]), "shap": float(self.values[row, j])} for j in order]

    def raw_score(self, row: int) -> float:
        """The explained log-odds of ``row``: ``base_value`` + its SHAP values."""
        return float(self.base_value + self.values[row].sum())


def _shares(magnitudes: dict[str, float]) -> dict[str, float]:
    total = sum(magnitudes.values())
    return {g: (v / total if total > 0 else 0.0) for g, v in magnitudes.items()}


def explain(ensemble: BoosterEnsemble, features: np.ndarray | torch.Tensor,
            fold: int | None = None) -> ShapExplanation:
    """Exact tree SHAP values of ``features`` ``(B, D)``, averaged over the chosen members (all, or the one
    that held out ``fold``, to explain an out-of-fold score)."""
    import shap

    x = ensemble.check_features(features)
    values, bases = [], []
    for booster, best in ensemble.chosen(fold):
        if booster.current_iteration() != best:
            raise ValueError(f"booster holds {booster.current_iteration()} trees but its best iteration is "
                             f"{best}: SHAP would explain trees predict() ignores; trim it before explaining")
        explanation = shap.TreeExplainer(booster)(x)
        values.append(np.asarray(explanation.values, dtype=np.float64).reshape(x.shape))
        bases.append(float(np.mean(explanation.base_values)))
    return ShapExplanation(values=np.mean(values, axis=0), base_value=float(np.mean(bases)),
                           feature_names=list(ensemble.feature_names),
                           feature_groups=list(ensemble.feature_groups), features=x)


# -- plots ------------------------------------------------------------------------------------------
def _colours(groups: list[str]) -> dict[str, str]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {g: palette(i % 10) for i, g in enumerate(groups)}


def _new_figure(width: float, height: float) -> tuple[Any, Any]:
    """A figure on the Agg canvas: headless, and no global pyplot state touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _write_png(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("wrote %s", path)
    return path


def _waterfall_bars(explanation: ShapExplanation, row: int, top: int) -> list[tuple[str, str | None, float]]:
    """(label, group or None for the folded rest, shap) from the smallest shown contribution up."""
    shown = explanation.top(row, top)
    bars = [(f"{t['name']} = {t['value']:.3g}", t["group"], t["shap"]) for t in shown]
    rest = explanation.values.shape[1] - len(shown)
    if rest:
        rest_sum = explanation.raw_score(row) - explanation.base_value - sum(t["shap"] for t in shown)
        bars.append((f"{rest} other features", None, rest_sum))
    return bars[::-1]


def waterfall_png(explanation: ShapExplanation, row: int, path: str | Path, top: int = 10, title: str = "") -> Path:
    """One row's waterfall from the base value to its log-odds: the ``top`` largest contributions, coloured
    by modality, the rest folded into one bar; written atomically to ``path``."""
    from matplotlib.patches import Patch

    bars = _waterfall_bars(explanation, row, top)
    colours = _colours(explanation.groups)
    figure, axis = _new_figure(7, 0.4 * len(bars) + 1.8)
    start = explanation.base_value
    for y, (_, group, value) in enumerate(bars):
        axis.barh(y, value, left=start, color=colours.get(group, OTHER_COLOUR), edgecolor="black", lw=0.4)
        axis.text(start + value, y, f" {value:+.3f}", va="center", ha="left" if value >= 0 else "right", fontsize=7)
        start += value
    axis.axvline(explanation.base_value, color="grey", ls=":", lw=0.8)
    axis.axvline(start, color="black", ls="--", lw=0.8)
    axis.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    shares = ", ".join(f"{g} {s:.0%}" for g, s in explanation.group_shares(row).items())
    axis.set(xlabel=f"log-odds (base {explanation.base_value:.3f} -> f(x) {start:.3f})",
             title=f"{title}\n|SHAP| share: {shares}".strip())
    legend = [Patch(color=c, label=g) for g, c in colours.items()] + [Patch(color=OTHER_COLOUR, label="other")]
    axis.legend(handles=legend, fontsize=7, loc="best")
    return _write_png(figure, path)


def summary_png(explanation: ShapExplanation, path: str | Path, top: int = 20) -> Path:
    """Beeswarm-like summary: the ``top`` features by mean ``|SHAP|``, one dot per row coloured by the
    feature's value (low blue, high red), labels coloured by modality; the title gives each modality's
    share of the mean ``|SHAP|``. Written atomically to ``path``."""
    values, features = explanation.values, explanation.features
    order = np.argsort(-np.abs(values).mean(0), kind="stable")[:top][::-1]
    colours = _colours(explanation.groups)
    figure, axis = _new_figure(7, 0.3 * len(order) + 1.8)
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, size=values.shape[0])
    for y, j in enumerate(order):
        column = features[:, j]
        span = np.ptp(column)
        shade = (column - column.min()) / span if span > 0 else np.full_like(column, 0.5)
        axis.scatter(values[:, j], y + jitter, c=shade, cmap="coolwarm", vmin=0, vmax=1, s=8, lw=0)
    axis.axvline(0, color="grey", lw=0.8)
    axis.set_yticks(range(len(order)), [explanation.feature_names[j] for j in order], fontsize=7)
    for label, j in zip(axis.get_yticklabels(), order, strict=True):
        label.set_color(colours[explanation.feature_groups[j]])
    shares = ", ".join(f"{g} {s:.0%}" for g, s in explanation.overall_shares().items())
    axis.set(xlabel="SHAP value (log-odds)", title=f"mean |SHAP| share: {shares}")
    return _write_png(figure, path)
