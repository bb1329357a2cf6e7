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


def write_nifti(image: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save int16 HU with the affine as both qform and sform (scanner RAS), units mm."""
    img = nib.Nifti1Image(image, affine)
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
