"""The rectal ERUS bundle as a user runs it: frozen CLIP loading and preprocessing, the contrastively
pre-trained offline pair, the feature cache, extract / train / inference / evaluate through
``python -m monai.bundle run`` on tiny synthetic data, the multi-GPU extraction overlay, and the
predictor's answers to good and bad requests. LightGBM + SHAP and radiomics have their own modules
(``test_rectal_booster.py``, ``test_radiomics.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.data import manifest
from oncofusion.io.frames import read_frame
from oncofusion.models.rectal_erus import features as feature_lib
from oncofusion.models.rectal_erus.pretrain import pretrain_clip_pair
from oncofusion.networks.clip_encoders import ClipPair, clip_pixels, load_frozen_clip
from oncofusion.training import TrainingPlan
from tests.conftest import run_bundle

pytest_plugins = ["tests.conftest_rectal"]
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "rectal_erus_clip"
TINY_PAIR = {"text_encoder": "minilm", "embed_dim": 16, "image_size": 64, "image_channels": [4, 8, 8, 8],
             "text_tuning": "frozen", "context_length": 64}
TINY_BOOSTER = json.dumps({"num_leaves": 4, "min_data_in_leaf": 2, "learning_rate": 0.1})


def records_of(manifest_path: Path) -> list[dict]:
    return manifest.datalist(manifest_path, keys=["report", "roi"], optional_keys=["images"], path_keys=["images"])


# -- preprocessing and encoders ---------------------------------------------------------------------------
def test_clip_pixels_resizes_grey_to_rgb_and_normalises_with_the_encoders_statistics():
    frame = torch.zeros(1, 40, 20)  # (C, W, H): 40 columns, 20 rows
    frame[0, :20] = 255.0  # the left half of the columns is white
    pixels = clip_pixels(frame, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert pixels.shape == (3, 32, 32)
    assert torch.equal(pixels[0], pixels[2])  # grey repeated to RGB
    assert pixels[0, :, 0].mean() == pytest.approx(2.0, abs=1e-3)  # (1 - 0.5) / 0.25 on the left ...
    assert pixels[0, :, -1].mean() == pytest.approx(-2.0, abs=1e-3)  # ... (0 - 0.5) / 0.25 on the right: W is x
    with pytest.raises(ValueError, match="1 or 3 channels"):
        clip_pixels(torch.zeros(2, 8, 8), 32, (0.5,) * 3, (0.25,) * 3)


def test_a_hugging_face_clip_loads_frozen_and_encodes_unit_vectors(tiny_clip, tmp_path):
    clip = load_frozen_clip(tiny_clip)
    assert clip.image_size == 32 and clip.context_length == 77
    assert not any(p.requires_grad for p in clip.parameters())
    images = clip.encode_images(torch.randn(2, 3, 32, 32))
    texts = clip.encode_texts(["upper rectal tumour", "no suspicious node"])
    assert images.shape == (2, 24) and texts.shape == (2, 24)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))
    assert not torch.allclose(texts[0], texts[1])
    # the cache key follows the weights: a changed checkpoint is a new encoder
    changed = tmp_path / "changed"
    shutil.copytree(tiny_clip, changed)
    model = load_frozen_clip(changed).model
    with torch.no_grad():
        model.visual_projection.weight.mul_(2.0)
    model.save_pretrained(changed)
    assert load_frozen_clip(changed).encoder_id != load_frozen_clip(tiny_clip).encoder_id


def test_an_encoder_source_that_is_no_clip_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither clip_pair.json"):
        load_frozen_clip(tmp_path)
    with pytest.raises(ImportError, match="open_clip_torch"):
        load_frozen_clip("open_clip:RN50/openai")


def test_the_clip_pair_saves_only_what_training_changes_and_reloads_identically(tmp_path):
    pair = ClipPair(**TINY_PAIR).eval()
    saved = pair.save_pretrained(tmp_path / "pair")
    state = torch.load(saved / "clip_pair.pt", weights_only=True)
    assert any(k.startswith("image_tower.") for k in state) and any(k.startswith("text_projection.") for k in state)
    assert not any("text_tower.encoder" in k for k in state)  # the frozen MiniLM comes from its own package
    again = ClipPair.from_pretrained(saved).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), pair.encode_image(pixels))
        torch.testing.assert_close(again.encode_text(["uT3 uN1"]), pair.encode_text(["uT3 uN1"]))
    frozen = load_frozen_clip(saved)
    torch.testing.assert_close(frozen.encode_images(pixels), pair.encode_image(pixels))


def test_contrastive_pre_training_lowers_the_loss_and_keeps_the_best_epoch(tiny_rectal_data, tmp_path):
    records = records_of(tiny_rectal_data)
    history = pretrain_clip_pair(records, tmp_path / "pair", TINY_PAIR, max_epochs=6, patience=6, batch_size=8,
                                 learning_rate=3e-3, validation_fraction=0.2)
    assert history["pairs"] == 2 * len(records)
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["best_epoch"] == int(np.argmin(history["validation_loss"]))
    assert (tmp_path / "pair" / "clip_pair.json").is_file()
    with pytest.raises(ValueError, match="too few"):
        pretrain_clip_pair(records[:1], tmp_path / "one", TINY_PAIR, max_epochs=1)


def test_features_are_cached_by_encoder_and_file_content(tiny_rectal_data, tiny_clip, tmp_path):
    records = records_of(tiny_rectal_data)[:3]
    clip = load_frozen_clip(tiny_clip)
    cache = feature_lib.FeatureCache(tmp_path / "cache")
    first = feature_lib.feature_table(clip, records, cache, progress=False)
    assert first.shape == (3, 48) and cache.misses == 3 * 2 + 3 and cache.hits == 0
    again = feature_lib.FeatureCache(tmp_path / "cache")
    np.testing.assert_array_equal(feature_lib.feature_table(clip, records, again, progress=False), first)
    assert again.hits == 9 and again.misses == 0
    # the image part is the normalised mean of the frames' unit vectors, the text part the report's
    frames = [read_frame(p) for p in records[0]["images"]]
    per_frame = clip.encode_images(torch.stack([feature_lib.frame_pixels(f, clip, (0, 255)) for f in frames]))
    pooled = per_frame.mean(0) / per_frame.mean(0).norm()
    np.testing.assert_allclose(first[0, :24], pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(first[0, 24:], clip.encode_texts([records[0]["report"]])[0].numpy(), atol=1e-5)
    # a frame whose bytes change is encoded again
    changed = tmp_path / "changed.dcm"
    changed.write_bytes(Path(records[0]["images"][0]).read_bytes() + b"\0")
    moved = feature_lib.FeatureCache(tmp_path / "cache")
    feature_lib.patient_features(clip, [changed], records[0]["report"], moved)
    assert moved.misses == 1 and moved.hits == 1


# -- the bundle through monai.bundle run --------------------------------------------------------------------
def test_the_training_plan_extracts_then_trains():
    plan = TrainingPlan.load(BUNDLE)
    assert [s.describe() for s in plan.steps()] == ["extract (default)", "train (default)"]
    assert plan.is_complete(BUNDLE)


@pytest.fixture(scope="module")
def trained_tiny_bundle(tiny_rectal_data, tmp_path_factory) -> dict[str, str]:
    """extract.json (a tiny pair pre-trained per fold) then train.json through the CLI on the tiny data."""
    out = tmp_path_factory.mktemp("rectal_run")
    overrides = {"datalist_file": str(tiny_rectal_data), "ckpt_dir": str(out / "models"),
                 "cache_dir": str(out / "cache"), "output_dir": str(out / "eval"), "folds": "[0,1]"}
    args = [f"--{k}={v}" for k, v in overrides.items()]
    run_bundle("run", "--config_file", "['configs/inference.json','configs/extract.json']", *args,
               f"--pair_args={json.dumps(TINY_PAIR)}", "--pretrain_args#max_epochs=2",
               "--pretrain_args#batch_size=8", cwd=BUNDLE)
    run_bundle("run", "--config_file", "configs/train.json", *args, f"--booster_params={TINY_BOOSTER}",
               cwd=BUNDLE)
    return overrides


def test_extract_and_train_write_a_pair_per_fold_and_the_fold_boosters(trained_tiny_bundle):
    models = Path(trained_tiny_bundle["ckpt_dir"])
    for fold in (0, 1):
        assert (models / "clip_pair" / f"fold_{fold}" / "clip_pair.json").is_file()
        history = json.loads((models / "clip_pair" / f"fold_{fold}" / "history.json").read_text())
        assert history["pairs"] == 2 * 10  # the other fold's 10 patients, two frames each
    booster = json.loads((models / "booster" / "booster.json").read_text())
    assert booster["folds"] == [0, 1]
    assert booster["feature_groups"].count("image") == 16 and booster["feature_groups"].count("text") == 16


def test_inference_answers_each_case_with_shap_by_modality_and_a_waterfall_png(trained_tiny_bundle):
    run_bundle("run", "--config_file", "configs/inference.json",
               *[f"--{k}={v}" for k, v in trained_tiny_bundle.items()], cwd=BUNDLE)
    rows = json.loads((Path(trained_tiny_bundle["output_dir"]) / "predictions.json").read_text())
    assert len(rows) == 20
    for row in rows:
        assert 0.0 <= row["good_response_probability"] <= 1.0 and len(row["fold_probabilities"]) == 2
        shap = row["shap"]
        assert set(shap["by_modality"]) == {"image", "text"}
        assert shap["log_odds"] == pytest.approx(shap["base_log_odds"] + sum(shap["by_modality"].values()), abs=2e-3)
        png = Path(shap["waterfall_png"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_compares_clip_lightgbm_with_three_radiomics_baselines(trained_tiny_bundle):
    run_bundle("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", "--num_bootstrap=20",
               f"--booster_params={TINY_BOOSTER}", *[f"--{k}={v}" for k, v in trained_tiny_bundle.items()],
               cwd=BUNDLE)
    output = Path(trained_tiny_bundle["output_dir"])
    report = json.loads((output / "report.json").read_text())
    assert list(report["models"]) == ["CLIP + LightGBM", "radiomics + logistic regression", "radiomics + SVM",
                                      "radiomics + random forest", "CLIP image only + LightGBM",
                                      "CLIP text only + LightGBM"]
    assert [c["b"] for c in report["comparisons"]][:3] == list(report["models"])[1:4]
    assert report["num_cases"] == 20 and "observable_logistic_oof_auroc" in report["reference"]
    assert set(report["balanced_subset"]) == {"CLIP + LightGBM (full-cohort model)", "radiomics + logistic regression",
                                              "radiomics + SVM", "radiomics + random forest"}
    assert json.loads((output / "balanced" / "report.json").read_text())["num_cases"] == 12  # 6 good + 6 poor
    assert sum(report["shap_modality_share"].values()) in (pytest.approx(1.0), 0.0)
    assert (output / "shap_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_the_baselines_config_runs_the_radiomics_models_alone(trained_tiny_bundle, tmp_path):
    run_bundle("run", "--config_file", "['configs/inference.json','configs/baselines.json']", "--num_bootstrap=20",
               *[f"--{k}={v}" for k, v in trained_tiny_bundle.items() if k != "output_dir"],
               f"--output_dir={tmp_path}", cwd=BUNDLE)
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["models"]) == ["radiomics + logistic regression", "radiomics + SVM", "radiomics + random forest"]
    assert "radiomics of the tumor ROI" in report["data"] and report["num_cases"] == 20
    assert json.loads((tmp_path / "balanced" / "report.json").read_text())["num_cases"] == 12


def test_multi_gpu_extraction_gives_each_rank_its_folds(tiny_rectal_data, tmp_path, monkeypatch):
    """multi_gpu_train.json over extract.json: each torchrun process pre-trains and extracts its share of the
    folds (a gloo group of one rank here takes them all)."""
    monkeypatch.chdir(BUNDLE)
    monkeypatch.setenv("LOCAL_RANK", "0")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in ("inference.json", "extract.json", "multi_gpu_train.json")])
    parser.update({"bundle_root": str(BUNDLE), "datalist_file": str(tiny_rectal_data), "folds": [0, 1]})
    assert parser.get_parsed_content("device") == torch.device("cuda:0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        assert parser.get_parsed_content("rank_folds") == [0, 1]
    finally:
        dist.destroy_process_group()
    assert any("run_extraction" in step and "@rank_folds" in step for step in parser.get("run"))


# -- the predictor ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(trained_tiny_bundle):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), **{k: v for k, v in trained_tiny_bundle.items() if k != "folds"},
                   "folds": [0, 1]})
    return parser.get_parsed_content("predictor")


def test_a_box_on_a_frame_answers_a_probability_and_draws_the_roi_as_label_one(predictor, tiny_rectal_data):
    record = records_of(tiny_rectal_data)[0]
    frame = read_frame(record["image"])
    (i0, j0), (i1, j1) = record["roi"]
    prediction = predictor.predict({"image": frame}, Roi(box=((i0, j0), (i1, j1))), {"report": record["report"]})
    label = prediction.label
    assert label.shape == tuple(frame.shape[1:]) and set(np.unique(label)) == {0, 1}
    assert label[i0:i1 + 1, j0:j1 + 1].all() and label.sum() == (i1 - i0 + 1) * (j1 - j0 + 1)
    (name,) = prediction.label_names
    assert name.startswith("good response ") and prediction.label_names[name] == 1
    assert prediction.result["roi"]["bbox_ijk"] == [[i0, j0], [i1, j1]]
    # the fold restriction picks one member
    one = predictor.predict({"image": frame}, Roi(box=((i0, j0), (i1, j1))), {"report": record["report"]}, fold=1)
    assert one.result["fold_probabilities"] == [prediction.result["fold_probabilities"][1]]


@pytest.mark.parametrize(("fields", "roi", "message"), [
    ({}, Roi(box=((10, 10), (20, 20))), "report is missing"),
    ({"report": "   "}, Roi(box=((10, 10), (20, 20))), "report is empty"),
    ({"report": 7}, Roi(box=((10, 10), (20, 20))), "report must be text"),
    ({"report": "uT2"}, Roi(points=[(500.0, 10.0)]), "outside image"),
    ({"report": "uT2", "click_radius_mm": "-1"}, Roi(points=[(50.0, 50.0)]), "click_radius_mm -1 is outside"),
    ({"report": "uT2"}, None, "no lesion given"),
])
def test_bad_requests_are_refused_naming_the_problem(predictor, tiny_rectal_data, fields, roi, message):
    frame = read_frame(records_of(tiny_rectal_data)[0]["image"])
    with pytest.raises(InvalidRequest, match=message):
        predictor.predict({"image": frame}, roi, fields)


def test_a_click_on_an_uncalibrated_frame_is_refused(predictor):
    frame = MetaTensor(torch.zeros(1, 64, 64), affine=torch.eye(3), meta={"spacing_source": "none"})
    with pytest.raises(InvalidRequest, match="no pixel calibration"):
        predictor.predict({"image": frame}, Roi(points=[(30.0, 30.0)]), {"report": "uT2"})
