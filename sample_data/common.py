"""Helpers every sample-data generator shares: the voxel grid, the NIfTI writer and the command-line
triple type. Patient-level folds come from the package (:func:`oncofusion.data.folds.assign_folds`), the
same assignment ``/train`` uses."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid in world RAS mm: voxel (i, j, k) lies at ``origin + (i, j, k) * spacing``."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-RAS matrix stored in the NIfTI header."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine

    def axes(self, lo: Sequence[int] = (0, 0, 0), hi: Sequence[int] | None = None) -> list[np.ndarray]:
        """World coordinates along each axis for voxel ranges ``lo..hi``, shaped for broadcasting."""
        hi = self.shape if hi is None else hi
        out = []
        for axis in range(3):
            coords = self.origin[axis] + np.arange(lo[axis], hi[axis]) * self.spacing[axis]
            shape = [1, 1, 1]
            shape[axis] = coords.size
            out.append(coords.reshape(shape).astype(np.float32))
        return out


def write_nifti(image: np.ndarray, affine: np.ndarray, path: Path, description: str | None = None) -> None:
    """Save int16 HU with the affine as both qform and sform (scanner RAS), units mm; ``description`` (at
    most 79 characters, e.g. "SYNTHETIC ...") goes into the header's ``descrip``."""
    img = nib.Nifti1Image(image, affine)
    if description is not None:
        if len(description) > 79:
            raise ValueError(f"a NIfTI description holds at most 79 characters, got {len(description)}")
        img.header["descrip"] = description
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.to_filename(str(path))


def values_arg(kind: type, count: int):
    """argparse type for ``count`` comma-separated values of ``kind`` ('96,96,64', '0.2,0.2')."""

    def parse(text: str) -> tuple:
        parts = [kind(p) for p in text.split(",")]
        if len(parts) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, got {text!r}")
        return tuple(parts)

    return parse


def generator_parser(description: str, default_out: str, default_cases: int) -> argparse.ArgumentParser:
    """The options every sample-data generator takes: output folder, case count, seed, folds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument("--num-cases", type=int, default=default_cases)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-folds", type=int, default=5, help="patient-level cross-validation folds")
    return parser


def _one_torch_thread() -> None:
    """A generator's worker runs a few torch ops on small tensors (reading a frame back): one thread each,
    not a pool per worker fighting for the same cores."""
    import torch

    torch.set_num_threads(1)


def render_in_processes(render: Callable[[Any], dict], tasks: Sequence[Any], workers: int) -> list[dict]:
    """``render`` over ``tasks`` in ``workers`` processes (in this one, on one torch thread, for 1)."""
    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        _one_torch_thread()
        try:
            return [render(t) for t in tasks]
        finally:
            torch.set_num_threads(threads)
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_torch_thread) as pool:
        return list(pool.map(render, tasks, chunksize=8))


def logistic_oof_auroc(features: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float | None:
    """AUROC of out-of-fold probabilities of an L2 logistic regression (C = 1) on standardised features,
    one fit per fold on the other folds; None when a training part or the whole set lacks a class. The
    generators record it as the ceiling reachable from what a model observes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from oncofusion.metrics.classification import auroc

    labels = np.asarray(labels, int)
    if labels.min() == labels.max():
        return None
    scores = np.zeros(len(labels))
    for fold in np.unique(folds):
        train = folds != fold
        if labels[train].min() == labels[train].max():
            return None
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        model.fit(features[train], labels[train])
        scores[~train] = model.predict_proba(features[~train])[:, 1]
    return round(auroc(labels, scores), 4)


def fit_cox(features: np.ndarray, time: np.ndarray, event: np.ndarray, penalty: float = 1.0,
            iterations: int = 50) -> np.ndarray:
    """Coefficients of an L2-penalised Cox model (Breslow ties) by Newton-Raphson with step halving:
    numpy only, so generating sample data needs no survival package. ``penalty`` is the ridge weight on
    the log partial likelihood (features are best standardised first)."""
    order = np.argsort(-np.asarray(time, float), kind="stable")  # latest first: risk sets are prefixes
    x, t, e = np.asarray(features, float)[order], np.asarray(time, float)[order], np.asarray(event, bool)[order]
    last = np.searchsorted(-t, -t, side="right") - 1  # a tie's risk set holds every tied case

    def objective(beta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        eta = x @ beta
        shift = eta.max()
        w = np.exp(eta - shift)
        s0 = np.cumsum(w)[last][e]
        s1 = np.cumsum(w[:, None] * x, axis=0)[last][e]
        s2 = np.cumsum(w[:, None, None] * x[:, :, None] * x[:, None, :], axis=0)[last][e]
        mean = s1 / s0[:, None]
        loglik = float(np.sum(eta[e] - shift - np.log(s0))) - 0.5 * penalty * float(beta @ beta)
        grad = np.sum(x[e] - mean, axis=0) - penalty * beta
        hess = -np.sum(s2 / s0[:, None, None] - mean[:, :, None] * mean[:, None, :], axis=0)
        return loglik, grad, hess - penalty * np.eye(beta.size)

    beta = np.zeros(x.shape[1])
    value, grad, hess = objective(beta)
    for _ in range(iterations):
        step = np.linalg.solve(hess, -grad)
        for _ in range(30):
            candidate = beta + step
            new_value, new_grad, new_hess = objective(candidate)
            if new_value >= value - 1e-12:
                break
            step = step / 2
        converged = abs(new_value - value) < 1e-9
        beta, value, grad, hess = candidate, new_value, new_grad, new_hess
        if converged:
            break
    return beta


def cox_oof_cindex(features: np.ndarray, time: np.ndarray, event: np.ndarray, folds: np.ndarray,
                   penalty: float = 1.0) -> float | None:
    """Harrell's C-index of out-of-fold linear predictors of :func:`fit_cox` on standardised features, one
    fit per fold on the other folds; None when a training part or the whole set has no event. The
    survival counterpart of :func:`logistic_oof_auroc`."""
    from oncofusion.metrics.survival import concordance_index

    features, event, folds = np.asarray(features, float), np.asarray(event, int), np.asarray(folds)
    if event.sum() == 0:
        return None
    risk = np.zeros(len(event))
    for fold in np.unique(folds):
        train = folds != fold
        if event[train].sum() == 0:
            return None
        mean, sd = features[train].mean(axis=0), features[train].std(axis=0)
        sd[sd == 0] = 1.0
        beta = fit_cox((features[train] - mean) / sd, time[train], event[train], penalty)
        risk[~train] = ((features[~train] - mean) / sd) @ beta
    return round(concordance_index(time, risk, event), 4)
