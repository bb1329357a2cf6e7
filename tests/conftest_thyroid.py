"""Fixtures for the thyroid LLNM-Net bundle: tiny synthetic ultrasound studies.

Test modules load them with ``pytest_plugins = ["tests.conftest_thyroid"]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SHAPE = (96, 88)
TINY_SPACING = (0.5, 0.45)


@pytest.fixture(scope="session")
def tiny_thyroid_data(tmp_path_factory) -> Path:
    """Twelve small synthetic studies in two patient-level folds; returns the manifest path."""
    from sample_data.generate_thyroid import generate

    out = tmp_path_factory.mktemp("thyroid_bundle")
    generate(out, num_cases=12, seed=0, num_folds=2, shape=TINY_SHAPE, spacing=TINY_SPACING, workers=1)
    return out / "manifest.json"
