"""The lung bundle as a user runs it: metadata and network checks, and every config through
``python -m monai.bundle run`` on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LUNG_BUNDLE, REPO

SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
pytestmark = pytest.mark.slow


def bundle_cli(*args: str, cwd: Path = LUNG_BUNDLE) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in the bundle directory; fails the test with its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def trained_ckpt(tiny_lung_data, tmp_path_factory) -> Path:
    """Both folds of the offline default trained for one epoch on tiny views."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    for fold in (0, 1):
        bundle_cli("run", "--config_file", "configs/train.json", "--bundle_root", ".",
                   "--datalist_file", str(tiny_lung_data), "--ckpt_dir", str(ckpt), "--output_dir",
                   str(ckpt / "runs"), "--fold", str(fold), "--max_epochs", "1", "--view_pixels", "32")
    return ckpt


@pytest.mark.skipif(not SCHEMA.is_file(), reason="the shared bundle schema is not beside the repository")
def test_metadata_verifies_against_the_bundle_schema(tmp_path):
    schema_copy = tmp_path / "schema.json"
    schema_copy.write_text(SCHEMA.read_text())
    result = bundle_cli("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema_copy))
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_network_input_and_output_match_the_metadata():
    result = bundle_cli("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "configs/inference.json", "--bundle_root", ".")
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_train_writes_a_checkpoint_per_fold(trained_ckpt):
    for fold in (0, 1):
        assert (trained_ckpt / f"fold{fold}" / "model.pt").stat().st_size > 10_000


def test_paper_backbone_trains_with_a_local_clip(tiny_lung_data, tiny_clip_dir, tmp_path):
    bundle_cli("run", "--config_file", "['configs/train.json','configs/backbone_clip.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_lung_data), "--clip_model", str(tiny_clip_dir), "--view_pixels", "32",
               "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "runs"), "--max_epochs", "1")
    assert (tmp_path / "fold0" / "model.pt").is_file()


def test_inference_writes_a_prediction_per_case(tiny_lung_data, trained_ckpt, tmp_path):
    bundle_cli("run", "--config_file", "configs/inference.json", "--bundle_root", ".", "--datalist_file",
               str(tiny_lung_data), "--ckpt_dir", str(trained_ckpt), "--output_dir", str(tmp_path),
               "--view_pixels", "32")
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 10
    for row in predictions:
        assert 0.0 <= row["malignancy_probability"] <= 1.0
        assert len(row["fold_malignancy_probabilities"]) == 2
        assert sum(row["view_attention"].values()) == pytest.approx(1.0, abs=1e-4)
        assert sum(row["semantic_features"]["texture"].values()) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_reports_out_of_fold_metrics_and_plots(tiny_lung_data, trained_ckpt, tmp_path):
    bundle_cli("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_lung_data), "--ckpt_dir", str(trained_ckpt), "--output_dir",
               str(tmp_path), "--view_pixels", "32", "--num_bootstrap", "50")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_cases"] == 10 and "out-of-fold" in report["data"]
    assert report["auroc"]["low"] <= report["auroc"]["value"] <= report["auroc"]["high"]
    assert set(report["zero_shot_auroc"]) >= {"margin", "spiculation", "texture"}
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "calibration.png").is_file()
