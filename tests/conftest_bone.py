"""Fixtures for the bone tumor bundle: tiny synthetic bone data and tiny trained fold models.

Test modules load them with ``pytest_plugins = ["tests.conftest_bone"]``; plain helpers are in
:mod:`tests.bone_helpers`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bone_helpers import IMAGE_ONLY, TINY_SHAPE, TINY_SPACING, bundle_cli


@pytest.fixture(scope="session")
def tiny_bone_data(tmp_path_factory) -> Path:
    """Twelve small synthetic cases in two patient-level folds; returns the manifest path."""
    from sample_data.generate_bone import generate

    out = tmp_path_factory.mktemp("bone")
    generate(out, num_cases=12, seed=0, num_folds=2, shape=TINY_SHAPE, spacing=TINY_SPACING, workers=1,
             bayes_draws=2000)
    return out / "manifest.json"


@pytest.fixture(scope="session")
def tiny_bone_ckpt(tiny_bone_data, tmp_path_factory) -> Path:
    """Both folds of SC-Net and of the image-only S-Net trained for one epoch on the tiny data.

    The default architecture, so the checkpoints load into an unmodified copy of the bundle.
    """
    ckpt = tmp_path_factory.mktemp("bone_ckpt")
    for fold in (0, 1):
        for config in ("configs/train.json", IMAGE_ONLY):
            bundle_cli("run", "--config_file", config, "--bundle_root", ".", "--datalist_file", str(tiny_bone_data),
                       "--ckpt_dir", str(ckpt), "--output_dir", str(ckpt / "runs"), "--fold", str(fold),
                       "--max_epochs", "1", "--batch_size", "4", "--torch_threads", "1")
    return ckpt
