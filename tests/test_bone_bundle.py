"""The bone tumor bundle as a user runs it: metadata and network checks, and every config through
``python -m monai.bundle run`` on tiny synthetic data (one epoch)."""

from __future__ import annotations

import json

import pytest

from tests.bone_helpers import bundle_cli

pytest_plugins = ["tests.conftest_bone"]
pytestmark = pytest.mark.slow


def test_image_only_network_input_and_output_match_the_metadata():
    # the fused network takes a second input, which verify_net_in_out cannot pass: see test_bone_network
    result = bundle_cli("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "['configs/inference.json','configs/image_only.json']", "--bundle_root", ".")
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_train_writes_a_small_checkpoint_per_fold_and_variant(tiny_bone_ckpt):
    for fold in (0, 1):
        for variant in ("", "image_only/"):
            size = (tiny_bone_ckpt / f"{variant}fold{fold}" / "model.pt").stat().st_size
            assert 50_000 < size < 400_000


def test_inference_writes_a_prediction_per_case(tiny_bone_data, tiny_bone_ckpt, tmp_path):
    bundle_cli("run", "--config_file", "configs/inference.json", "--bundle_root", ".", "--datalist_file",
               str(tiny_bone_data), "--ckpt_dir", str(tiny_bone_ckpt), "--output_dir", str(tmp_path))
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 12
    for row in predictions:
        assert 0.0 <= row["osteoid_probability"] <= 1.0 and len(row["fold_probabilities"]) == 2
        assert set(row["clinical_contributions"]) == {"sex", "age", "location", "fracture"}
        assert row["label"] in (0, 1) and row["heatmap"]["method"].startswith("Grad-CAM")


def test_evaluate_compares_fusion_with_image_only(tiny_bone_data, tiny_bone_ckpt, tmp_path):
    bundle_cli("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_bone_data), "--ckpt_dir", str(tiny_bone_ckpt), "--output_dir",
               str(tmp_path), "--num_bootstrap", "50")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_cases"] == 12 and "out-of-fold" in report["data"]
    assert set(report["models"]) == {"SC-Net (CT + clinical)", "S-Net (CT only)", "clinical-only logistic regression"}
    for metrics in report["models"].values():
        assert {"auroc", "auroc_delong_ci", "accuracy", "f1", "sensitivity", "specificity"} <= set(metrics)
    pairs = {(c["a"], c["b"]) for c in report["comparisons"]}
    assert ("SC-Net (CT + clinical)", "S-Net (CT only)") in pairs
    assert all(0.0 <= c["p_value"] <= 1.0 and c["test"].startswith("DeLong") for c in report["comparisons"])
    assert report["reference"]["synthetic"] is True and "bayes_auroc" in report["reference"]
    assert (tmp_path / "roc.png").stat().st_size > 1000 and (tmp_path / "report.md").is_file()
    assert len(json.loads((tmp_path / "predictions_image_only.json").read_text())) == 12


def test_screening_config_writes_the_report(tiny_bone_data, tmp_path):
    bundle_cli("run", "--config_file", "['configs/inference.json','configs/screening.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_bone_data), "--screening_dir", str(tmp_path))
    report = json.loads((tmp_path / "screening.json").read_text())
    assert report["num_cases"] == 12 and report["outcome"] == "osteoid (label 1) vs chondroid (label 0)"
    assert (tmp_path / "screening.md").read_text().startswith("# Clinical-feature screening")

