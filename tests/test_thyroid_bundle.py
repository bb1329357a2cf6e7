"""The thyroid LLNM-Net bundle as a user runs it: the network's inputs and outputs against the metadata for
every variant, the training plan, the model card's figure line, and train / inference / evaluate through
``python -m monai.bundle run`` on tiny synthetic data (one epoch). The checks every bundle passes (metadata
schema, multi-GPU overlay, committed weights against the card) are in ``test_bundles.py`` and
``test_model_cards.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from oncofusion.ensemble import load_state_dict
from oncofusion.models.thyroid_llnm.predictor import VARIANT_NAMES, VARIANTS, build_network
from oncofusion.models.thyroid_llnm.transforms import HalfPrecisionWeights
from oncofusion.training import TrainingPlan
from tests.conftest import run_bundle

pytest_plugins = ["tests.conftest_thyroid"]
pytestmark = pytest.mark.slow
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "thyroid_llnm"
CARD_LINE = re.compile(r"<!-- sample-data-auroc: (\{.*?\}) -->")


def bundle_cli(*args: str, timeout: float = 600):
    return run_bundle(*args, cwd=BUNDLE, timeout=timeout)


def parser_of(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


@pytest.fixture(scope="module")
def tiny_thyroid_ckpt(tiny_thyroid_data, tmp_path_factory) -> Path:
    """Both folds of the fusion network and fold 0 of the image-only one trained for one epoch through
    ``monai.bundle run``; the other ablation folds are random (float16, as training writes them)."""
    ckpt = tmp_path_factory.mktemp("thyroid_ckpt")
    runs = [("configs/train.json", 0), ("configs/train.json", 1), ("['configs/train.json','configs/image_only.json']", 0)]
    for config, fold in runs:
        bundle_cli("run", "--config_file", config, "--bundle_root", ".", "--datalist_file", str(tiny_thyroid_data),
                   "--ckpt_dir", str(ckpt), "--output_dir", str(ckpt / "runs"), "--fold", str(fold), "--max_epochs", "1",
                   "--batch_size", "2", "--torch_threads", "1", "--validation_fraction", "0.34")
    args = parser_of("inference.json").get_parsed_content("network_args")
    for variant, fold in (("image_only", 1), ("text_only", 0), ("text_only", 1), ("scalars_only", 0), ("scalars_only", 1)):
        torch.manual_seed(fold)
        path = ckpt / variant / f"fold{fold}" / "model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": HalfPrecisionWeights(build_network(args, variant)).state_dict()}, path)
    return ckpt


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_inputs_and_outputs_match_the_metadata(variant):
    """What ``verify_net_in_out`` checks, for a network of four named inputs: each input built from its
    ``network_data_format`` entry (shape, dtype, value range), the output's channels and dtype."""
    files = ["inference.json"] + ([] if variant == "fusion" else [f"{variant}.json"])
    parser = parser_of(*files)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    network = parser.get_parsed_content("network_def").eval()
    batch, length = 2, 7
    image_meta, ids_meta, scalar_meta = meta["inputs"]["image"], meta["inputs"]["input_ids"], meta["inputs"]["scalars"]
    image = torch.rand(batch, image_meta["num_channels"], *image_meta["spatial_shape"])
    input_ids = torch.randint(int(ids_meta["value_range"][0]), int(ids_meta["value_range"][1]) + 1, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 5:] = 0
    scalars = torch.randn(batch, scalar_meta["num_channels"])
    scalars[0, 1] = float("nan")  # missing
    streams = VARIANTS[variant]
    with torch.no_grad():
        logits = network(image if "image" in streams else None, input_ids if "text" in streams else None,
                         attention_mask if "text" in streams else None, scalars if "scalars" in streams else None)
    output = meta["outputs"]["pred"]
    assert logits.shape == (batch, output["num_channels"]) and logits.dtype == getattr(torch, output["dtype"])
    assert torch.isfinite(logits).all()
    # the scalar channels the metadata describes are the network's scalar tokens, in order
    names = parser.get_parsed_content("scalar_names")
    assert [scalar_meta["channel_def"][str(i)].split(":")[0] for i in range(len(names))] == names
    assert network.max_text_tokens == 128 and tuple(network.image_size) == tuple(image_meta["spatial_shape"])


def test_paper_size_override_is_the_vit_b_width():
    args = parser_of("inference.json", "paper_size.json").get_parsed_content("network_args")
    assert (args["hidden_size"], args["num_heads"], args["mlp_dim"]) == (768, 12, 3072)
    assert args["num_fusion_layers"] + args["num_joint_layers"] == 12 and args["image_size"] == 224
    train = parser_of("train.json", "paper_size.json")
    train["bundle_root"] = "."
    assert train.get("network_args")["hidden_size"] == 768 and train.get("learning_rate") == 3e-05


def test_plan_trains_every_variant_in_five_folds():
    plan = TrainingPlan.load(BUNDLE)
    assert plan.num_folds == 5 and set(plan.variants) == set(VARIANTS) and plan.is_complete(BUNDLE)
    steps = plan.steps()
    assert len(steps) == 20 and all("configs/cpu_demo.json" in s.config_file for s in steps)
    train = parser_of("train.json")
    assert train.get("learning_rate") == 3e-05 and train.get("weight_decay") == 0.01  # the paper's recipe
    assert train.get("amp") == "$torch.cuda.is_available()"


def test_model_card_states_the_sample_data_figures_by_name():
    card = (BUNDLE / "docs" / "README.md").read_text()
    (line,) = CARD_LINE.findall(card)
    stated = json.loads(line)
    assert set(stated) == set(VARIANT_NAMES.values())
    assert all(0.5 < v < 1.0 for v in stated.values())
    for ceiling in ("0.908", "0.819"):
        assert ceiling in card
    assert "SYNTHETIC" in card and "latent oracle" in card and "observable logistic" in card


def test_train_writes_small_float16_checkpoints_without_the_frozen_encoder(tiny_thyroid_ckpt):
    for path in (tiny_thyroid_ckpt / "fold0" / "model.pt", tiny_thyroid_ckpt / "fold1" / "model.pt",
                 tiny_thyroid_ckpt / "image_only" / "fold0" / "model.pt"):
        assert 100_000 < path.stat().st_size < 1_000_000
        state = load_state_dict(path)
        assert not any(".encoder.layer." in k for k in state)  # the frozen MiniLM is not saved
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}


def test_inference_writes_a_prediction_per_case(tiny_thyroid_data, tiny_thyroid_ckpt, tmp_path):
    bundle_cli("run", "--config_file", "configs/inference.json", "--bundle_root", ".", "--datalist_file",
               str(tiny_thyroid_data), "--ckpt_dir", str(tiny_thyroid_ckpt), "--output_dir", str(tmp_path))
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 12
    for row in predictions:
        assert 0.0 <= row["llnm_probability"] <= 1.0 and len(row["fold_probabilities"]) == 2
        assert set(row["scalar_contributions"]) == {"aspect_ratio", "echogenicity_contrast", "capsule_distance_mm",
                                                   "lobe_position", "age", "sex"}
        assert row["morphology"]["lobe_third"] in ("upper", "middle", "lower")  # the manifest's lobe mask is read
        assert row["report_attributions"]["top_tokens"] and row["attention"]["grid"] == [8, 8]
        assert row["label"] in (0, 1) and row["roi"]["prompt"] == "box"


def test_evaluate_reports_the_ablation_with_delong_and_training_fold_thresholds(tiny_thyroid_data,
                                                                                 tiny_thyroid_ckpt, tmp_path):
    bundle_cli("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--bundle_root", ".",
               "--datalist_file", str(tiny_thyroid_data), "--ckpt_dir", str(tiny_thyroid_ckpt), "--output_dir",
               str(tmp_path), "--num_bootstrap", "50")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_cases"] == 12 and "out-of-fold" in report["data"]
    assert list(report["models"]) == [VARIANT_NAMES[v] for v in ("fusion", "image_only", "text_only", "scalars_only")]
    for metrics in report["models"].values():
        assert {"auroc", "auroc_delong_ci", "auprc", "accuracy", "sensitivity", "specificity"} <= set(metrics)
    fusion = VARIANT_NAMES["fusion"]
    assert {(c["a"], c["b"]) for c in report["comparisons"]} == {(fusion, VARIANT_NAMES[v])
                                                                 for v in ("image_only", "text_only", "scalars_only")}
    assert all(c["test"].startswith("DeLong") and 0.0 <= c["p_value"] <= 1.0 for c in report["comparisons"])
    thresholds = report["threshold_from_training_folds"]["models"]
    assert set(thresholds) == set(report["models"])
    assert all(set(m["thresholds"]) == {"0", "1"} and "accuracy" in m for m in thresholds.values())
    reference = report["reference"]
    assert reference["synthetic"] is True and {"latent_oracle_auroc", "observable_logistic_oof_auroc"} <= set(reference)
    assert "Threshold chosen on the training folds" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "predictions_scalars_only.json").read_text())) == 12


def test_multi_gpu_overlay_lets_an_ablation_leave_streams_unused():
    """An ablation variant never reaches the other streams' parameters: DDP waits for their gradients and
    hangs unless told they may be unused (the overlay's other checks are in ``test_bundles.py``)."""
    network = parser_of("train.json", "multi_gpu_train.json").get("network")
    assert network["_target_"].endswith("DistributedDataParallel") and network["find_unused_parameters"] is True
    image_only = build_network(parser_of("inference.json").get_parsed_content("network_args"), "image_only")
    logits = image_only(torch.rand(1, 3, *image_only.image_size), None, None, None)
    logits.sum().backward()
    assert any(p.grad is None for p in image_only.parameters() if p.requires_grad)
