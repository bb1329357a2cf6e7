"""Helpers for the bone tumor bundle tests: paths, the bundle CLI, in-process configs, small images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from tests.conftest import run_bundle

REPO = Path(__file__).resolve().parents[1]
BONE_BUNDLE = REPO / "bundles" / "bone_tumor_matrix"
TINY_SHAPE = (48, 48, 32)
TINY_SPACING = (1.0, 1.0, 2.0)
IMAGE_ONLY = "['configs/train.json','configs/image_only.json']"


def bundle_cli(*args: str, cwd: Path = BONE_BUNDLE, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in the bone bundle directory."""
    return run_bundle(*args, cwd=cwd, timeout=timeout)


def bone_bundle_config(*files: str, **overrides):
    """The bundle's configs parsed in-process (``files`` relative to ``configs/``), with overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BONE_BUNDLE / "configs" / f) for f in files])
    parser["bundle_root"] = str(BONE_BUNDLE)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def bone_case(manifest: Path, index: int = 0) -> tuple[MetaTensor, dict]:
    """The image (1, I, J, K) as the server loads it and the sidecar of case ``index``."""
    from monai.transforms import LoadImage

    case = json.loads(manifest.read_text())["cases"][index]
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(manifest.parent / case["image"]))
    sidecar = json.loads((manifest.parent / "datastore" / "sidecars" / f"{case['case_id']}.json").read_text())
    return image, sidecar


def blob_image(shape=(40, 36, 30), affine=None, blob_ijk=(20, 18, 15), value=1000.0) -> MetaTensor:
    """A soft-tissue volume with a dense 3-voxel blob, for geometry tests."""
    affine = np.diag([0.8, 0.9, 1.5, 1.0]) if affine is None else affine
    volume = np.full(shape, 40.0, np.float32)
    i, j, k = blob_ijk
    volume[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = value
    return MetaTensor(torch.from_numpy(volume)[None], affine=torch.from_numpy(np.asarray(affine, np.float64)))
