"""Fixtures for the rectal ERUS bundle: tiny synthetic ERUS patients and a tiny CLIP saved to disk.

Test modules load them with ``pytest_plugins = ["tests.conftest_rectal"]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SHAPE = (160, 160)
TINY_SPACING = (0.36, 0.36)


@pytest.fixture(scope="session")
def tiny_rectal_data(tmp_path_factory) -> Path:
    """Twenty small synthetic patients (two frames each) in two patient-level folds; the manifest path."""
    from sample_data.generate_rectal import generate

    out = tmp_path_factory.mktemp("rectal_bundle")
    generate(out, num_cases=20, seed=0, num_folds=2, shape=TINY_SHAPE, spacing=TINY_SPACING, workers=1,
             frames_per_patient=2)
    return out / "manifest.json"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A 2-layer Hugging Face CLIP (32-px images) saved with its tokenizer: the real loading code runs on it."""
    from tests.tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
