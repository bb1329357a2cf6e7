"""The contract's other shapes, each held by a tiny bundle built in ``tmp_path`` (:mod:`tests.fixture_bundles`):
a 2D frame classifier with a 2D click, a whole-image Cox model without a prompt, and LightGBM boosters over
fixed features with a two-stage plan. Quick tests run each predictor in-process; the slow ones train each
bundle with its plan, run ``inference.json`` and the out-of-fold evaluation; the server ones serve all three
from one datastore and train them through ``/train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightgbm
import nibabel as nib
import numpy as np
import pytest
import torch

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.data.manifest import datalist
from oncofusion.io.cache import ImageCache
from oncofusion.io.readers import read_image
from oncofusion.serving.infer_task import BundleInferTask
from oncofusion.serving.train_task import BundleTrainTask
from oncofusion.transforms.geometry import world_to_voxel
from tests import fixture_bundles as fx
from tests.conftest import REPO, SCHEMA

DIMENSIONS = {fx.FRAME_BUNDLE: 2, fx.COX_BUNDLE: 3, fx.BOOSTER_BUNDLE: 3}
PROMPTS = {
    fx.FRAME_BUNDLE: ["points", "box"],
    fx.COX_BUNDLE: [],
    fx.BOOSTER_BUNDLE: ["points", "box", "mask"],
}


def _build(root: Path, name: str) -> tuple[Path, Path]:
    """The bundle ``name`` and its synthetic studies under ``root``: (bundle, manifest)."""
    build, write = fx.FIXTURES[name]
    return build(root / "bundles"), write(root / "data")


def _cases(manifest: Path) -> list[dict]:
    return json.loads(manifest.read_text())["cases"]


def _inner_case(manifest: Path, shape: tuple[int, ...] = (40, 32), margin: int = fx.FRAME_PATCH // 2) -> dict:
    """The first case whose click lies ``margin`` pixels or more inside the image: its patch has no padding."""
    return next(
        c
        for c in _cases(manifest)
        if all(margin <= v <= s - margin for v, s in zip(c["center_ijk"], shape, strict=True))
    )


def _predictor(bundle: Path, **overrides):
    return fx.bundle_parser(bundle, "inference.json", **overrides).get_parsed_content("predictor")


def _random_members(bundle: Path) -> list[torch.nn.Module]:
    """Two randomly initialised fold networks saved as the bundle's ``models/fold{k}/model.pt``."""
    parser = fx.bundle_parser(bundle, "inference.json")
    members = []
    for fold in range(fx.NUM_FOLDS):
        torch.manual_seed(fold)
        network = parser.get_parsed_content("network_def", lazy=False).eval()
        (bundle / "models" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), bundle / "models" / f"fold{fold}" / "model.pt")
        members.append(network)
    return members


# -- quick: the bundles as written ---------------------------------------------------------------------
@pytest.mark.skipif(not SCHEMA.is_file(), reason="the shared bundle schema is not beside the repository")
@pytest.mark.parametrize("name", sorted(fx.FIXTURES))
def test_fixture_metadata_verifies_against_the_bundle_schema(name, tmp_path):
    import jsonschema

    bundle = fx.FIXTURES[name][0](tmp_path)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {k: v for k, v in metadata.items() if k != "network_data_format"}, json.loads(SCHEMA.read_text())
        )


@pytest.mark.parametrize("name", sorted(fx.FIXTURES))
def test_untrained_bundle_is_served_with_its_declared_dimension(name, tmp_path):
    bundle, _ = _build(tmp_path, name)
    task = BundleInferTask(bundle, ImageCache(max_bytes=0), device="cpu")
    assert task.inputs.dimension == DIMENSIONS[name] and list(task.inputs.prompt) == PROMPTS[name]
    info = task.info()
    assert info["type"] == "deepgrow" and info["dimension"] == DIMENSIONS[name]
    assert (
        "[unavailable: FileNotFoundError: no model checkpoint found: train the bundle first"
        in info["description"]
    )


def test_train_task_reads_2d_lesions_and_takes_the_plans_folds(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    bundle, manifest = _build(tmp_path, fx.FRAME_BUNDLE)
    studies = manifest.parent / "datastore"
    datastore = LocalDatastore(str(studies), extensions=["*.png"])
    task = BundleTrainTask(bundle, studies / "sidecars", tmp_path / "runs", num_folds=5)
    assert task.num_folds == fx.NUM_FOLDS  # the plan's, not the app's default
    records = {r["case_id"]: r for r in task.check(datastore, with_world=True)}
    cases = _cases(manifest)
    assert sorted(records) == sorted(c["case_id"] for c in cases)
    for case in cases:
        record = records[case["case_id"]]
        assert record["center_ijk"] == case["center_ijk"] and record["center_mm"] == case["center_mm"]
        assert record["blob"] == case["blob"] and record["fold"] in (0, 1)
    assert {r["fold"] for r in records.values()} == {0, 1}


def test_crop_around_puts_the_click_at_the_patch_centre_in_2d_and_3d():
    image = torch.zeros(1, 9, 7)
    image[0, 1, 6] = 1.0
    patch = fx.crop_around(image, (1.4, 5.6), 4, padding_value=-1.0)  # indices -1..2 and 4..7
    assert patch.shape == (1, 4, 4) and patch[0, 2, 2] == 1.0
    assert (patch[0, 0] == -1.0).all() and (patch[0, 1:, 3] == -1.0).all()  # i = -1 and j = 7 lie outside
    assert (patch == -1.0).sum() == 4 + 3 and patch.sum() == 1.0 - 7
    volume = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 5, 6, 7)
    cube = fx.crop_around(volume, (2, 3, 3), 3)
    assert torch.equal(cube, volume[:, 1:4, 2:5, 2:5])
    assert (fx.crop_around(volume, (40, 3, 3), 3) == 0).all()


def test_frame_predictor_classifies_the_patch_under_a_2d_click(tmp_path):
    bundle, manifest = _build(tmp_path, fx.FRAME_BUNDLE)
    members = _random_members(bundle)
    predictor = _predictor(bundle)
    case = _inner_case(manifest)
    frame = read_image(manifest.parent / case["image"], "frame")
    assert frame.shape[1:] == (40, 32)
    roi = Roi(points=[tuple(case["center_ijk"])])

    prediction = predictor.predict({"image": frame}, roi, {})
    (patch,) = predictor.model_inputs(predictor.locate({"image": frame}, roi, {}, None))
    i, j = case["center_ijk"]
    np.testing.assert_allclose(
        patch[0, 0].numpy(), frame[0, i - 8 : i + 8, j - 8 : j + 8].numpy() / 255.0, atol=1e-6
    )
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(patch), -1)[0] for m in members])
    result = prediction.result
    assert result["bright_probability"] == pytest.approx(float(expected[:, 1].mean()), abs=1e-6)
    assert result["fold_probabilities"] == pytest.approx(expected[:, 1].tolist(), abs=1e-6)
    assert result["prediction"] == ("bright" if expected[:, 1].mean() >= 0.5 else "dim")
    assert prediction.label.shape == (40, 32) and prediction.label.sum() == 16 * 16
    assert (
        prediction.label[i, j] == 1
        and prediction.label[i - 8, j - 8] == 1
        and prediction.label[i + 8, j] == 0
    )
    assert list(prediction.label_names) == [predictor.summarize(result)]

    with pytest.raises(InvalidRequest, match="lesion position has 3 coordinates but the image is 2D"):
        predictor.predict({"image": frame}, Roi(points=[(i, j, 0)]), {})


def test_cox_risk_is_the_mean_member_log_hazard_never_softmaxed(tmp_path):
    bundle, manifest = _build(tmp_path, fx.COX_BUNDLE)
    members = _random_members(bundle)
    predictor = _predictor(bundle)
    assert predictor.ensemble.aggregation == "mean_log_hazard" and predictor.score_key == "risk"
    risks = []
    for case in _cases(manifest)[:4]:
        volume = read_image(manifest.parent / case["image"], "volume")
        result = predictor.predict({"image": volume}, None, {}).result
        x = predictor.preprocessing({"image": volume})["image"][None]
        assert tuple(x.shape) == (1, 1, 16, 16, 16)
        with torch.no_grad():
            log_hazards = [float(m(x)[0, 0]) for m in members]
        assert result["fold_log_hazards"] == pytest.approx(log_hazards, abs=1e-6)
        assert result["risk"] == pytest.approx(np.mean(log_hazards), abs=1e-6)
        assert float(predictor.ensemble(x)[0]) == pytest.approx(np.mean(log_hazards), abs=1e-6)
        assert float(predictor.ensemble(x, fold=1)[0]) == pytest.approx(log_hazards[1], abs=1e-6)
        risks.append(result["risk"])
    assert len(set(np.round(risks, 6))) == 4  # a softmax over one output would be 1.0 for every case


def test_booster_features_and_ensemble_match_lightgbm(tmp_path):
    bundle, manifest = _build(tmp_path, fx.BOOSTER_BUNDLE)
    parser = fx.bundle_parser(bundle, "inference.json", datalist_file=str(manifest))
    target = parser.get_parsed_content("target")
    records = datalist(manifest, target)
    cache = fx.extract_features(records, str(tmp_path / "features.json"), radius=3.0)
    assert cache["feature_names"] == list(fx.FEATURE_NAMES) and len(cache["features"]) == len(records)

    boosters = []
    for fold in range(fx.NUM_FOLDS):
        train = datalist(manifest, target, exclude_folds=[fold], part="train", validation_fraction=0.25)
        validation = datalist(
            manifest, target, exclude_folds=[fold], part="validation", validation_fraction=0.25
        )
        model_file = bundle / "models" / f"fold{fold}" / "model.txt"
        fx.fit_booster(
            str(tmp_path / "features.json"),
            train,
            validation,
            target,
            fx.BOOSTER_PARAMS,
            60,
            10,
            str(model_file),
        )
        boosters.append(lightgbm.Booster(model_file=str(model_file)))

    predictor = _predictor(bundle)
    assert predictor.ensemble.aggregation == "mean_probability" and len(predictor.ensemble.members()) == 2
    for record in records[:6]:
        image = read_image(record["image"], "volume")
        click = world_to_voxel(image.affine.numpy(), np.asarray([record["center_mm"]]))[0]
        result = predictor.predict({"image": image}, Roi(points=[tuple(click)]), {}).result
        features = np.asarray([cache["features"][record["case_id"]]])
        assert list(result["features"].values()) == pytest.approx(features[0].tolist(), rel=1e-5)
        own = [float(b.predict(features)[0]) for b in boosters]
        assert result["fold_probabilities"] == pytest.approx(own, abs=1e-6)
        assert result["malignant_probability"] == pytest.approx(np.mean(own), abs=1e-6)


def test_booster_stops_early_on_the_inner_validation_split(tmp_path):
    _, manifest = _build(tmp_path, fx.BOOSTER_BUNDLE)
    from oncofusion.targets import BinaryTarget

    target = BinaryTarget(key="diagnosis", class_names=["benign", "malignant"])
    records = datalist(manifest, target)
    fx.extract_features(records, str(tmp_path / "features.json"), radius=3.0)
    train, validation = records[:16], records[16:]
    flipped = [{**r, "diagnosis": 1 - r["diagnosis"]} for r in validation]  # what trains worsens validation
    fit = [
        fx.fit_booster(
            str(tmp_path / "features.json"),
            train,
            v,
            target,
            fx.BOOSTER_PARAMS,
            60,
            5,
            str(tmp_path / f"{n}.txt"),
        )
        for n, v in enumerate((validation, flipped))
    ]
    assert fit[1]["best_iteration"] == 1 < fit[0]["best_iteration"]
    assert lightgbm.Booster(model_file=str(tmp_path / "1.txt")).num_trees() == 1
    with pytest.raises(ValueError, match="have no cached features: run the 'extract' stage first"):
        fx.fit_booster(
            str(tmp_path / "features.json"),
            [{**train[0], "case_id": "unknown"}],
            validation,
            target,
            fx.BOOSTER_PARAMS,
            5,
            2,
            str(tmp_path / "x.txt"),
        )


def test_classification_report_reads_the_truth_under_the_targets_key(tmp_path):
    from sklearn.metrics import roc_auc_score

    from oncofusion.evaluation.registry import evaluate
    from oncofusion.targets import BinaryTarget

    rng = np.random.default_rng(0)
    blob = [0, 1] * 10
    predictions = [{"case_id": f"c{n}", "blob": b, "bright_probability": float(rng.uniform(0, 1) * 0.5 + 0.4 * b)}
                   for n, b in enumerate(blob)]  # fmt: skip
    report = evaluate(BinaryTarget(key="blob", class_names=["dim", "bright"]), predictions, tmp_path, "synthetic",
                      "bright_probability", num_bootstrap=20)  # fmt: skip
    scores = [p["bright_probability"] for p in predictions]
    assert report["label"] == "blob" and report["num_positive"] == 10
    assert report["auroc"]["value"] == pytest.approx(roc_auc_score(blob, scores))
    assert json.loads((tmp_path / "report.json").read_text())["auroc"] == report["auroc"]
    assert (tmp_path / "roc.png").is_file()


# -- slow: each bundle through its plan, inference.json and the out-of-fold evaluation -------------------
def _cli_train(bundle: Path, manifest: Path, timeout: float = 900) -> None:
    """``python -m oncofusion.cli train``: every step of the bundle's plan."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "oncofusion.cli", "train", "--bundle", str(bundle),
               "--datalist-file", str(manifest)]  # fmt: skip
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def _run_predictions(bundle: Path, manifest: Path, out: Path) -> tuple[list[dict], list[dict], dict]:
    """``python -m monai.bundle run`` of ``inference.json`` (fold ensemble) and of ``inference.json`` +
    ``evaluate.json`` (out of fold), side by side: both prediction lists and the report."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {"inference": "configs/inference.json",
            "evaluate": "['configs/inference.json','configs/evaluate.json']"}  # fmt: skip
    processes = {}
    for name, files in runs.items():
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", ".",
                   "--datalist_file", str(manifest), "--output_dir", str(out / name)]  # fmt: skip
        processes[name] = subprocess.Popen(command, cwd=bundle, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for name, process in processes.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}:\n{output[-5000:]}"
    ensemble = json.loads((out / "inference" / "predictions.json").read_text())
    out_of_fold = json.loads((out / "evaluate" / "predictions.json").read_text())
    report = json.loads((out / "evaluate" / "report.json").read_text())
    return ensemble, out_of_fold, report


def _assert_out_of_fold(
    ensemble: list[dict], out_of_fold: list[dict], members_key: str, score_key: str
) -> None:
    """Each case's out-of-fold score is the score of its own fold's member in the fold ensemble."""
    assert [r["case_id"] for r in ensemble] == [r["case_id"] for r in out_of_fold]
    for full, own in zip(ensemble, out_of_fold, strict=True):
        assert len(full[members_key]) == fx.NUM_FOLDS and len(own[members_key]) == 1
        assert full[score_key] == pytest.approx(np.mean(full[members_key]), abs=1e-6)
        assert own[score_key] == pytest.approx(full[members_key][own["fold"]], abs=1e-6)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


@pytest.mark.slow
def test_frame_classifier_end_to_end(tmp_path):
    from sklearn.metrics import roc_auc_score

    bundle, manifest = _build(tmp_path, fx.FRAME_BUNDLE)
    _cli_train(bundle, manifest)
    assert sorted(p.parent.name for p in (bundle / "models").glob("fold*/model.pt")) == ["fold0", "fold1"]
    ensemble, out_of_fold, report = _run_predictions(bundle, manifest, tmp_path / "out")
    _assert_out_of_fold(ensemble, out_of_fold, "fold_probabilities", "bright_probability")
    labels = [r["blob"] for r in out_of_fold]
    scores = [r["bright_probability"] for r in out_of_fold]
    assert report["num_cases"] == len(_cases(manifest)) and report["num_positive"] == sum(labels)
    assert report["auroc"]["value"] == pytest.approx(roc_auc_score(labels, scores))
    assert report["auroc"]["value"] >= 0.8  # the bright blob is learnt from the clicked patch alone
    assert _is_png(tmp_path / "out" / "evaluate" / "roc.png")

    # every frame holds a bright and a dim blob: the answer follows the click, not the frame
    predictor = _predictor(bundle)
    clicked_bright, probabilities = [], []
    for case in _cases(manifest):
        frame = read_image(manifest.parent / case["image"], "frame")
        for click, bright in (
            (case["center_ijk"], case["blob"] == 1),
            (case["decoy_ijk"], case["blob"] == 0),
        ):
            result = predictor.predict({"image": frame}, Roi(points=[tuple(click)]), {}).result
            clicked_bright.append(bright)
            probabilities.append(result["bright_probability"])
    assert roc_auc_score(clicked_bright, probabilities) >= 0.8


@pytest.mark.slow
def test_cox_model_end_to_end(tmp_path):
    from lifelines.utils import concordance_index

    bundle, manifest = _build(tmp_path, fx.COX_BUNDLE)
    _cli_train(bundle, manifest)
    members = fx.bundle_parser(bundle, "inference.json").get_parsed_content("ensemble").members()
    assert len(members) == fx.NUM_FOLDS
    ensemble, out_of_fold, report = _run_predictions(bundle, manifest, tmp_path / "out")
    _assert_out_of_fold(ensemble, out_of_fold, "fold_log_hazards", "risk")
    risk = np.array([r["risk"] for r in out_of_fold])
    assert np.ptp(risk) > 0 and not np.allclose(risk, 1.0)  # a softmax over one output is 1.0 for all
    time_ = np.array([r["os_months"] for r in out_of_fold])
    event = np.array([r["death"] for r in out_of_fold])
    assert report["num_cases"] == len(time_) and report["num_events"] == int(event.sum())
    assert report["c_index"]["value"] == pytest.approx(concordance_index(time_, -risk, event))
    horizons = np.quantile(time_[event == 1], [0.25, 0.5, 0.75])
    assert report["time_dependent_auc"]["horizons"] == pytest.approx(horizons.tolist())
    assert all(0.0 <= a <= 1.0 for a in report["time_dependent_auc"]["auc"])
    groups = report["risk_groups"]["groups"]
    assert sum(g["num_cases"] for g in groups) == len(time_) and report["risk_groups"]["split"] == "median"
    assert _is_png(tmp_path / "out" / "evaluate" / "km_risk_groups.png")

    predictor = _predictor(bundle)
    volume = read_image(manifest.parent / _cases(manifest)[0]["image"], "volume")
    x = predictor.preprocessing({"image": volume})["image"][None]
    with torch.no_grad():
        log_hazards = [float(m(x)[0, 0]) for m in predictor.ensemble.members()]
    result = predictor.predict({"image": volume}, None, {}).result
    assert result["risk"] == pytest.approx(np.mean(log_hazards), abs=1e-6) == ensemble[0]["risk"]


@pytest.mark.slow
def test_booster_plan_end_to_end(tmp_path):
    bundle, manifest = _build(tmp_path, fx.BOOSTER_BUNDLE)
    _cli_train(bundle, manifest)
    cache = json.loads((bundle / "runs" / "features.json").read_text())
    assert sorted(cache["features"]) == sorted(c["case_id"] for c in _cases(manifest))
    boosters = [
        lightgbm.Booster(model_file=str(bundle / "models" / f"fold{k}" / "model.txt"))
        for k in range(fx.NUM_FOLDS)
    ]
    assert all(0 < b.num_trees() <= 60 for b in boosters)
    ensemble, out_of_fold, report = _run_predictions(bundle, manifest, tmp_path / "out")
    _assert_out_of_fold(ensemble, out_of_fold, "fold_probabilities", "malignant_probability")
    for row in out_of_fold:
        own = boosters[row["fold"]].predict(np.asarray([cache["features"][row["case_id"]]]))[0]
        assert row["malignant_probability"] == pytest.approx(float(own), abs=1e-6)
        assert list(row["features"].values()) == pytest.approx(cache["features"][row["case_id"]], rel=1e-5)
    assert report["num_cases"] == len(out_of_fold) and report["auroc"]["value"] >= 0.8
    assert _is_png(tmp_path / "out" / "evaluate" / "calibration.png")


# -- server: all three bundles from one datastore, trained through /train --------------------------------
TRAIN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from oncofusion.serving.launcher import LocalServer

    root = tmp_path_factory.mktemp("fixture_server")
    manifests = {}
    for name, (build, write) in fx.FIXTURES.items():
        build(root / "bundles")
        manifests[name] = write(root)
    conf = {
        "bundles": str(root / "bundles"),
        "runs": str(root / "runs"),
        "device": "cpu",
        "num_folds": "5",
        "max_epochs": "2",
    }
    with LocalServer(root / "datastore", root, conf) as live:
        yield {"url": live.url, "root": root, "manifests": manifests}


@pytest.fixture()
def client(server, tmp_path):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server["url"], tmpdir=str(tmp_path))


def _error(call) -> tuple[int, str]:
    from monailabel.client.client import MONAILabelClientException

    from tests.serving_fakes import status_and_detail

    with pytest.raises(MONAILabelClientException) as e:
        call()
    return status_and_detail(e.value)


def _train(client, name: str) -> dict:
    task = client.train_start(name, {"max_epochs": 2})
    assert task["status"] in ("SUBMITTED", "RUNNING"), task
    deadline = time.time() + TRAIN_TIMEOUT_S
    while task["status"] in ("SUBMITTED", "RUNNING"):
        assert time.time() < deadline, f"training {name} still running after {TRAIN_TIMEOUT_S}s"
        time.sleep(2)
        task = client.train_status()
    assert task["status"] == "DONE", task
    return task


@pytest.mark.server
@pytest.mark.slow
def test_server_lists_each_bundle_with_its_dimension(client):
    info = client.info()
    for name, dimension in DIMENSIONS.items():
        assert info["models"][name]["type"] == "deepgrow" and info["models"][name]["dimension"] == dimension
        assert name in info["trainers"]


def _requests(name: str, case: dict) -> tuple[dict, str, dict, int, str]:
    """A good request's params on ``case``, and a bad request (image id, params) with its status and message."""
    if name == fx.FRAME_BUNDLE:
        good = {"foreground": [case["center_ijk"]]}
        return (
            good,
            case["case_id"],
            {"foreground": [[*case["center_ijk"], 0, 0]]},  # [i, j, k] is a click on frame k; four is wrong
            422,
            "'foreground' point 0 must have 2 coordinates (i, j) on this 2D image",
        )
    if name == fx.COX_BUNDLE:
        return {}, "frame_000", {}, 415, "unsupported image format for 'frame_000.png'"
    return (
        {"foreground": [case["center_ijk"]]},
        case["case_id"],
        {"foreground": [[2, 2, 30]]},
        422,
        "ROI point (2, 2, 30) lies outside image 20x20x16",
    )


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("name", list(fx.FIXTURES))
def test_server_trains_the_plan_then_answers(client, server, name):
    bundle = server["root"] / "bundles" / name
    manifest = server["manifests"][name]
    case = _inner_case(manifest) if name == fx.FRAME_BUNDLE else _cases(manifest)[0]
    good, bad_image, bad, status, detail = _requests(name, case)

    status_before, detail_before = _error(lambda: client.infer(name, case["case_id"], good))
    assert status_before == 503 and "no model checkpoint found: train the bundle first" in detail_before

    task = _train(client, name)
    run = sorted((server["root"] / "runs" / name).glob("*/datalist.json"))[-1]
    records = json.loads(run.read_text())
    assert records["num_folds"] == fx.NUM_FOLDS and {r["fold"] for r in records["cases"]} == {0, 1}
    assert sorted(r["case_id"] for r in records["cases"]) == sorted(c["case_id"] for c in _cases(manifest))
    run_status = json.loads((run.parent / "status.json").read_text())
    assert run_status["status"] == "DONE" and run_status["published"] == "yes", task
    # the run is served through the published link; the bundle's own models/ stay untouched
    published = server["root"] / "runs" / name / "current"
    assert published.resolve() == (run.parent / "models").resolve() and not list((bundle / "models").rglob("*.pt"))

    label_file, result = client.infer(name, case["case_id"], good)
    predictor = _predictor(bundle, ckpt_dir=str(published.resolve()))
    primary = predictor.inputs.primary
    image = read_image(manifest.parent / case["image"], primary.reader)
    roi = Roi(points=[tuple(case["center_ijk"])]) if predictor.inputs.prompt else None
    expected = predictor.predict({"image": image}, roi, {})
    assert result[predictor.score_key] == pytest.approx(expected.result[predictor.score_key], abs=1e-5)
    assert result["model"] == name and result["model_version"] == "0.1.0"
    label = nib.load(label_file)
    assert label.shape == tuple(image.shape[1:])
    if name == fx.FRAME_BUNDLE:
        i, j = case["center_ijk"]
        assert label.get_fdata()[i, j] == 1 and label.get_fdata().sum() == 16 * 16
        assert result["label_names"] == {predictor.summarize(expected.result): 1}
    else:
        assert label.get_fdata().max() == 0

    got_status, got_detail = _error(lambda: client.infer(name, bad_image, bad))
    assert got_status == status and detail in got_detail
