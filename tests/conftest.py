"""Shared fixtures: a tiny synthetic lung data set and a tiny CLIP, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LUNG_BUNDLE = REPO / "bundles" / "lung_nodule_clip"


@pytest.fixture(scope="session")
def tiny_lung_data(tmp_path_factory) -> Path:
    """Ten small synthetic cases in two patient-level folds; returns the manifest path."""
    from sample_data.generate_lung import generate

    out = tmp_path_factory.mktemp("lung")
    generate(out, num_cases=10, seed=0, num_folds=2, shape=(64, 64, 48), spacing=(1.0, 1.0, 1.5))
    return out / "manifest.json"


SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
BUNDLES = sorted(p.parent.parent for p in (REPO / "bundles").glob("*/configs/metadata.json"))


def run_bundle(*args: str, cwd: Path = LUNG_BUNDLE, timeout: float = 600):
    """``python -m monai.bundle ARGS`` in a bundle directory, offline and on one torch thread (the CPUs
    are shared with the test runner); fails the test with its output."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="session")
def tiny_lung_checkpoints(tiny_lung_data, tmp_path_factory) -> Path:
    """Both folds of the lung bundle's offline default trained for one epoch on tiny views."""
    ckpt = tmp_path_factory.mktemp("lung_ckpt")
    for fold in (0, 1):
        run_bundle("run", "--config_file", "configs/train.json", "--bundle_root", ".",
                   "--datalist_file", str(tiny_lung_data), "--ckpt_dir", str(ckpt), "--output_dir",
                   str(ckpt / "runs"), "--fold", str(fold), "--max_epochs", "1", "--view_pixels", "32")
    return ckpt


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
