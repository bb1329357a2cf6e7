"""The lung bundle as a user runs it: metadata and network checks, and every config through
``python -m monai.bundle run`` on tiny synthetic data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_bundle

pytestmark = pytest.mark.slow


def test_network_input_and_output_match_the_metadata():
    result = run_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "configs/inference.json", "--bundle_root", ".")
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_train_writes_a_checkpoint_per_fold(tiny_lung_checkpoints):
    for fold in (0, 1):
        assert (tiny_lung_checkpoints / f"fold{fold}" / "model.pt").stat().st_size > 10_000


def test_paper_backbone_trains_with_a_local_clip(tiny_lung_data, tiny_clip_dir, tmp_path):
    run_bundle("run", "--config_file", "['configs/train.json','configs/backbone_clip.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_lung_data), "--clip_model", str(tiny_clip_dir), "--view_pixels", "32",
               "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "runs"), "--max_epochs", "1")
    assert (tmp_path / "fold0" / "model.pt").is_file()


def test_inference_writes_a_prediction_per_case(tiny_lung_data, tiny_lung_checkpoints, tmp_path):
    run_bundle("run", "--config_file", "configs/inference.json", "--bundle_root", ".", "--datalist_file",
               str(tiny_lung_data), "--ckpt_dir", str(tiny_lung_checkpoints), "--output_dir", str(tmp_path),
               "--view_pixels", "32")
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 10
    for row in predictions:
        assert 0.0 <= row["malignancy_probability"] <= 1.0
        assert len(row["fold_probabilities"]) == 2
        assert sum(row["view_attention"].values()) == pytest.approx(1.0, abs=1e-4)
        assert sum(row["semantic_features"]["texture"].values()) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_reports_out_of_fold_metrics_and_plots(tiny_lung_data, tiny_lung_checkpoints, tmp_path):
    run_bundle("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_lung_data), "--ckpt_dir", str(tiny_lung_checkpoints), "--output_dir",
               str(tmp_path), "--view_pixels", "32", "--num_bootstrap", "50")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_cases"] == 10 and "out-of-fold" in report["data"]
    assert report["auroc"]["low"] <= report["auroc"]["value"] <= report["auroc"]["high"]
    assert set(report["zero_shot_auroc"]) >= {"margin", "spiculation", "texture"}
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "calibration.png").is_file()
