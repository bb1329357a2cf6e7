"""Helpers every sample-data generator shares: the voxel grid, the NIfTI writer and the command-line
triple type. Patient-level folds come from the package (:func:`oncofusion.data.folds.assign_folds`), the
same assignment ``/train`` uses."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
