"""Fixtures for the OPSCC SMuRF bundle: tiny synthetic patients (CT with masks, slide with outline).

Test modules load them with ``pytest_plugins = ["tests.conftest_opscc"]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CT_SHAPE = (48, 48, 24)
TINY_CT_SPACING = (2.0, 2.0, 3.0)
TINY_SLIDE_SIZE = 512


@pytest.fixture(scope="session")
def tiny_opscc_data(tmp_path_factory) -> Path:
    """Twelve small SYNTHETIC patients in two patient-level folds; returns the manifest path."""
    from sample_data.generate_opscc import generate

    out = tmp_path_factory.mktemp("opscc_bundle")
    generate(out, num_cases=12, seed=0, num_folds=2, ct_shape=TINY_CT_SHAPE, ct_spacing=TINY_CT_SPACING,
             slide_size=TINY_SLIDE_SIZE, workers=1)
    return out / "manifest.json"
