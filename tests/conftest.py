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


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
