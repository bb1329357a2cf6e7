"""The OPSCC SMuRF bundle: metadata, configs, the network's inputs and outputs against the metadata for every
variant, the batch glue (fragment padding, the [grade, time, event] label, checkpoint selection after a
warm-up), risk groups and their hazard ratios, and extract -> train -> evaluate through ``python -m monai.bundle
run`` on tiny SYNTHETIC patients. The checks every bundle passes are in ``test_bundles.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from oncofusion.evaluation.survival import cox_hazard_ratios, risk_groups, survival_report
from oncofusion.models.opscc_smurf.data import (
    VARIANT_MODALITIES,
    WARMUP_SCORE_FLOOR,
    FragmentCollate,
    GradeSurvivalLabeld,
    RandGridCellDropoutd,
    WarmupSelectionScore,
    grid_augmentation,
    record_keys,
    record_transforms,
    risk_group,
    risk_group_cutoffs,
)
from oncofusion.models.opscc_smurf.network import check_network_io, network_data_format
from oncofusion.targets import SurvivalTarget
from oncofusion.training import TrainingPlan
from tests.conftest import SCHEMA, run_bundle

pytest_plugins = ["tests.conftest_opscc"]
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "opscc_smurf"
VARIANT_FILES = {"fusion": [], "radiology_only": ["radiology_only.json"], "pathology_only": ["pathology_only.json"]}
TARGET = SurvivalTarget(time_key="dfs_months", event_key="dfs_event")


def parser_of(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser.update({"bundle_root": str(BUNDLE), **overrides})
    return parser


def metadata() -> dict:
    return json.loads((BUNDLE / "configs" / "metadata.json").read_text())


# -- configs and metadata ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_metadata_verifies_against_the_schema(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(SCHEMA.read_text())
    result = run_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema),
                        cwd=BUNDLE)
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_data_format_is_the_networks_at_the_configured_sizes():
    parser = parser_of("inference.json")
    expected = network_data_format(ct_shape=(*parser.get_parsed_content("roi_size"), parser.get_parsed_content("depth")),
                                   wsi_grid=parser.get_parsed_content("grid_options")["grid_size"])
    assert metadata()["network_data_format"] == json.loads(json.dumps(expected))


@pytest.mark.parametrize("variant", list(VARIANT_FILES))
def test_network_inputs_and_outputs_match_the_metadata(variant, monkeypatch):
    """What ``verify_net_in_out`` checks, for each variant's network (it ignores the inputs it does not read)."""
    monkeypatch.chdir(BUNDLE)
    parser = parser_of("inference.json", *VARIANT_FILES[variant])
    network = parser.get_parsed_content("network_def")
    assert network.modalities == VARIANT_MODALITIES[variant]
    output = check_network_io(network, metadata()["network_data_format"], batch_size=2)
    assert output.shape == (2, 2)


@pytest.mark.parametrize("variant", list(VARIANT_FILES))
def test_train_config_builds_its_parts_for_every_variant(variant, monkeypatch):
    monkeypatch.chdir(BUNDLE)  # train.json reads shared facts from configs/inference.json by a relative macro
    parser = parser_of("train.json", *VARIANT_FILES[variant])
    assert parser.get_parsed_content("learning_rate") == 0.002 and parser.get_parsed_content("batch_size") == 16
    assert parser.get_parsed_content("max_epochs") == 100 and parser.get_parsed_content("warmup_epochs") == 10
    assert parser.get("train#dataloader#drop_last") is True  # the head's BatchNorm needs >= 2 cases
    optimizer = parser.get_parsed_content("optimizer")
    assert isinstance(optimizer, torch.optim.Adagrad)
    network = parser.get_parsed_content("network_def")
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in network.parameters()}
    first, extra = parser.get_parsed_content("train#prepare_batch").extra_keys, parser.get_parsed_content("collate")
    assert extra.image_from == VARIANT_MODALITIES[variant][0]
    assert set(first) == set(VARIANT_MODALITIES[variant][1:]) | ({"wsi_mask"} if "wsi" in VARIANT_MODALITIES[variant]
                                                                 else set())
    selection = parser.get_parsed_content("validate#selection")
    assert selection.warmup_epochs == 10
    saver = parser.get_parsed_content("validate#logging_handlers")[-1]
    assert type(saver).__name__ == "CheckpointSaver"


def test_every_config_parses_and_resolves_what_needs_no_data(monkeypatch, tmp_path):
    monkeypatch.chdir(BUNDLE)
    for files in (["extract.json"], ["inference.json"], ["inference.json", "evaluate.json"],
                  ["train.json", "cpu_demo.json"], ["inference.json", "paper_size.json"]):
        parser = parser_of(*files, cache_dir=str(tmp_path / "grids"))
        assert parser.get("run"), files
        slide_grid = parser.get_parsed_content("slide_grid")
        assert slide_grid.grid_options["grid_size"] == 16 and slide_grid.cache_dir == str(tmp_path / "grids")
    assert parser_of("inference.json", "paper_size.json").get_parsed_content("roi_size") == [128, 128]
    demo = parser_of("train.json", "cpu_demo.json")
    assert demo.get_parsed_content("max_epochs") < 100 and demo.get_parsed_content("roi_size") == [64, 64]
    target = parser_of("inference.json").get_parsed_content("target")
    assert (target.time_key, target.event_key) == ("dfs_months", "dfs_event")


def test_plan_extracts_then_trains_every_variant_in_five_folds():
    plan = TrainingPlan.load(BUNDLE)
    assert plan.num_folds == 5 and set(plan.variants) == set(VARIANT_FILES) and plan.is_complete(BUNDLE)
    steps = plan.steps()
    assert [s.stage for s in steps[:6]] == ["extract"] + ["train"] * 5
    assert len(steps) == 18 and all("configs/cpu_demo.json" in s.config_file for s in steps if s.stage == "train")


def test_record_keys_ask_only_for_what_a_variant_reads():
    assert record_keys(("wsi",))["keys"] == ["slide"]
    assert record_keys(("ct_tumor", "ct_nodes"))["keys"] == ["tumor_mask"]
    assert "node_mask" in record_keys(("ct_tumor", "ct_nodes", "wsi"))["optional_keys"]


# -- batch glue ----------------------------------------------------------------------------------------------
def test_collate_pads_fragments_and_builds_the_mask():
    items = [{"wsi": torch.full((n, 3, 4, 4), float(n)), "ct_tumor": torch.rand(4, 8, 8, 4),
              "label": torch.tensor([1.0, 5.0, 1.0])} for n in (1, 3, 2)]
    batch = FragmentCollate(image_from="ct_tumor")(items)
    assert batch["wsi"].shape == (3, 3, 3, 4, 4)
    torch.testing.assert_close(batch["wsi_mask"], torch.tensor([[1.0, 0, 0], [1, 1, 1], [1, 1, 0]]))
    assert (batch["wsi"][0, 0] == 1).all() and (batch["wsi"][0, 1:] == 0).all()
    assert (batch["wsi"][2, :2] == 2).all() and (batch["wsi"][2, 2] == 0).all()
    assert batch["image"] is batch["ct_tumor"] and batch["label"].shape == (3, 3)
    pathology = FragmentCollate(image_from="wsi")([{k: v for k, v in item.items() if k == "wsi"} for item in items])
    assert pathology["image"].shape == (3, 3, 3, 4, 4)
    with pytest.raises(ValueError, match="same encoder and grid_size"):
        FragmentCollate()([{"wsi": torch.zeros(1, 3, 4, 4)}, {"wsi": torch.zeros(1, 3, 2, 2)}])


def test_cell_dropout_empties_the_same_random_cells_of_every_fragment():
    grid = torch.rand(3, 192, 16, 16) + 0.1
    dropout = RandGridCellDropoutd(keys="wsi", cell_prob=0.5)
    dropout.set_random_state(3)
    out = dropout({"wsi": grid})["wsi"]
    emptied = (out == 0).all(dim=1)  # (fragments, S, S)
    assert 0.3 < emptied[0].float().mean() < 0.7
    assert (emptied == emptied[0]).all()  # the same cells in every fragment
    assert torch.equal(out[:, :, ~emptied[0]], grid[:, :, ~emptied[0]])  # the others untouched
    assert not torch.equal(dropout({"wsi": grid})["wsi"], out)  # a new draw each call
    dropout.set_random_state(3)
    assert torch.equal(dropout({"wsi": grid})["wsi"], out)
    with pytest.raises(ValueError, match="cell_prob"):
        RandGridCellDropoutd(keys="wsi", cell_prob=1.0)
    with pytest.raises(ValueError, match="n_fragments, D, S, S"):
        dropout({"wsi": torch.rand(192, 16, 16)})


def test_grid_augmentation_turns_and_flips_the_grid_plane_only():
    grid = torch.rand(2, 192, 8, 8)
    dihedral = [torch.rot90(g, k, (2, 3)) for g in (grid, grid.flip(3)) for k in range(4)]
    seen = set()
    for seed in range(12):
        augmentation = Compose(grid_augmentation("wsi", cell_prob=0.0))
        augmentation.set_random_state(seed)
        out = torch.as_tensor(augmentation({"wsi": grid})["wsi"])
        matches = [i for i, d in enumerate(dihedral) if torch.equal(out, d)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 3  # several turns and flips, not one fixed transform


def test_slide_augmentation_runs_after_the_cached_ct_steps():
    def step(name):
        return lambda d: d

    label, slide, read, flip, augment = (step(n) for n in ("label", "slide", "read", "flip", "augment"))
    steps = record_transforms(("ct_tumor", "ct_nodes", "wsi"), ct=[read, flip], slide=slide, label=label,
                              slide_augmentation=[augment]).transforms
    assert list(steps[:-1]) == [label, slide, read, flip, augment]
    radiology = record_transforms(("ct_tumor", "ct_nodes"), ct=[read, flip], label=label,
                                  slide_augmentation=[augment]).transforms
    assert augment not in radiology


def test_label_is_grade_time_event_with_nan_for_an_unknown_grade():
    label = GradeSurvivalLabeld(keys="grade", target=TARGET)
    out = label({"case_id": "a", "grade": 1, "dfs_months": 12.5, "dfs_event": 0})["label"]
    torch.testing.assert_close(out, torch.tensor([1.0, 12.5, 0.0]))
    unknown = label({"case_id": "b", "grade": None, "dfs_months": 3.0, "dfs_event": 1})["label"]
    assert math.isnan(unknown[0]) and unknown[1:].tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="'grade' is 2"):
        label({"case_id": "c", "grade": 2, "dfs_months": 3.0, "dfs_event": 1})
    with pytest.raises(ValueError, match="follow-up must be > 0"):
        label({"case_id": "d", "grade": 0, "dfs_months": 0.0, "dfs_event": 1})


def test_checkpoint_selection_ignores_the_warm_up_then_prefers_the_lowest_loss():
    selection = WarmupSelectionScore(warmup_epochs=3)
    scores = [selection.score(epoch, loss) for epoch, loss in ((1, 0.1), (2, 0.2), (3, 0.05), (4, 0.9), (5, 0.4))]
    assert scores[0] < scores[1] < scores[2] < scores[3] < scores[4]  # warm-up epochs never beat a later one
    assert scores[2] == WARMUP_SCORE_FLOOR + 3 and scores[4] == -0.4

    class Engine:
        state = type("State", (), {"epoch": 5, "metrics": {"val_loss": 0.4}})()

    selection(Engine)
    assert Engine.state.metrics["val_selection"] == -0.4
    with pytest.raises(ValueError, match="warmup_epochs"):
        WarmupSelectionScore(warmup_epochs=-1)


# -- risk groups ---------------------------------------------------------------------------------------------
def test_risk_group_cutoffs_are_the_tertiles_and_name_a_new_risk():
    predictions = [{"log_hazard": float(v)} for v in range(9)]
    cutoffs = risk_group_cutoffs(predictions)
    np.testing.assert_allclose(cutoffs["thresholds"], np.quantile(np.arange(9.0), [1 / 3, 2 / 3]))
    assert [risk_group(r, cutoffs) for r in (0.0, 2.67, 2.66, 5.5, 8.0)] == ["low", "intermediate", "low", "high",
                                                                             "high"]
    with pytest.raises(ValueError, match="cannot be cut into 3 groups"):
        risk_group_cutoffs(predictions[:2])


def test_fixed_thresholds_and_group_hazard_ratios_match_lifelines():
    import pandas as pd
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    group = rng.integers(0, 3, 120)
    time = rng.exponential(np.exp(-0.6 * group)) * 10 + 0.5  # no ties: Breslow equals lifelines' Efron
    event = (rng.random(120) < 0.7).astype(int)
    ratios = cox_hazard_ratios(time, event, group, ["low", "intermediate", "high"])
    frame = pd.DataFrame({"t": time, "e": event, "g1": (group == 1) * 1.0, "g2": (group == 2) * 1.0})
    fitted = CoxPHFitter().fit(frame, "t", "e").summary
    for name, row in (("intermediate", "g1"), ("high", "g2")):
        assert ratios["groups"][name]["hazard_ratio"] == pytest.approx(fitted.loc[row, "exp(coef)"], rel=1e-3)
        assert ratios["groups"][name]["low"] == pytest.approx(fitted.loc[row, "exp(coef) lower 95%"], rel=1e-3)
        assert ratios["groups"][name]["p_value"] == pytest.approx(fitted.loc[row, "p"], rel=1e-2, abs=1e-6)
    trend = CoxPHFitter().fit(pd.DataFrame({"t": time, "e": event, "g": group * 1.0}), "t", "e").summary
    assert ratios["per_group_step"]["hazard_ratio"] == pytest.approx(trend.loc["g", "exp(coef)"], rel=1e-3)
    # a group without events cannot have a ratio: None and the reason, not a huge number
    only_high = cox_hazard_ratios(time, (group == 2).astype(int), group, ["low", "intermediate", "high"])
    assert only_high["groups"] == {"intermediate": None, "high": None} and "not_estimable" in only_high

    group_of, cut = risk_groups(np.array([0.0, 1.0, 2.0, 3.0]), 3, thresholds=[0.5, 2.0])
    assert group_of.tolist() == [0, 1, 1, 2] and cut.tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="ascending thresholds"):
        risk_groups(np.array([0.0, 1.0]), 3, thresholds=[2.0, 0.5])
    predictions = [{"case_id": i, "time": float(t), "event": int(e), "risk": float(g)}
                   for i, (t, e, g) in enumerate(zip(time, event, group, strict=True))]
    report = survival_report(predictions, "x", num_bootstrap=5, num_groups=3, thresholds=[0.5, 1.5],
                             thresholds_from="training folds", extra={"count": len})
    assert [g["num_cases"] for g in report["risk_groups"]["groups"]] == [int((group == k).sum()) for k in range(3)]
    assert report["risk_groups"]["thresholds_from"] == "training folds" and report["count"] == 120
    assert report["risk_groups"]["hazard_ratios"]["groups"]["high"]["hazard_ratio"] > 1


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def check_saved_grid_statistics(checkpoint: Path, args: list[str], fold: int) -> None:
    """The checkpoint holds the channel statistics of its fold's training grids (region cells only)."""
    overrides = dict(zip((a.lstrip("-") for a in args[::2]), args[1::2], strict=True))
    parser = parser_of("train.json", **{**overrides, "bundle_root": str(BUNDLE), "fold": fold,
                                        "validation_fraction": 0.34})
    slide_grid = parser.get_parsed_content("slide_grid")
    cells = np.concatenate([slide_grid.grids(r["slide"], r.get("slide_annotation")).reshape(-1, 192)
                            for r in parser.get_parsed_content("train#datalist")])
    cells = cells[np.any(cells != 0, axis=1)]
    state = torch.load(checkpoint, weights_only=True)
    np.testing.assert_allclose(state["wsi_mean"].numpy(), cells.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["wsi_std"].numpy(), cells.std(axis=0, ddof=1), rtol=1e-3)


def test_extract_train_and_evaluate_through_monai_bundle_run(tiny_opscc_data, tmp_path, monkeypatch):
    """extract -> train both folds of the fusion model (2 epochs, warm-up 1) -> out-of-fold evaluation."""
    monkeypatch.chdir(BUNDLE)  # for the train.json parsed here, as for the runs
    grids, models = tmp_path / "grids", tmp_path / "models"
    common = ["--bundle_root", ".", "--datalist_file", str(tiny_opscc_data), "--cache_dir", str(grids)]
    run_bundle("run", "--config_file", "configs/extract.json", *common, cwd=BUNDLE)
    summary = json.loads((grids / "extract_summary.json").read_text())
    assert summary["num_slides"] == 12 and summary["embedding_dim"] == 192 and summary["fragments_per_slide"]["min"] >= 1
    cached = sorted(grids.glob("*.npy"))
    assert len(cached) == 12
    for fold in (0, 1):
        run_bundle("run", "--config_file", "configs/train.json", *common, "--ckpt_dir", str(models), "--output_dir",
                   str(tmp_path / "runs"), "--fold", str(fold), "--max_epochs", "2", "--warmup_epochs", "1",
                   "--batch_size", "2", "--validation_fraction", "0.34", "--torch_threads", "1", cwd=BUNDLE)
        assert (models / f"fold{fold}" / "model.pt").is_file()
        check_saved_grid_statistics(models / f"fold{fold}" / "model.pt", common, fold)
    assert sorted(grids.glob("*.npy")) == cached  # training read the extracted grids, embedded nothing new

    out = tmp_path / "eval"
    run_bundle("run", "--config_file", "['configs/inference.json','configs/evaluate.json']", *common, "--ckpt_dir",
               str(models), "--output_dir", str(out), "--variants", "['fusion']", "--num_bootstrap", "20", cwd=BUNDLE)
    report = json.loads((out / "report.json").read_text())
    assert report["num_cases"] == 12 and "out-of-fold" in report["data"] and report["reference"]["synthetic"] is True
    (model,) = report["models"].values()
    assert 0.0 <= model["c_index"]["value"] <= 1.0 and model["auroc"] is None or 0.0 <= model["auroc"]["value"] <= 1.0
    assert [g["name"] for g in model["risk_groups"]] == ["low", "intermediate", "high"]
    predictions = json.loads((out / "predictions_fusion.json").read_text())
    assert len(predictions) == 12 and {p["fold"] for p in predictions} == {0, 1}
    assert all(0.0 <= p["grade_probability"] <= 1.0 and math.isfinite(p["log_hazard"]) for p in predictions)
    cutoffs = json.loads((models / "risk_groups.json").read_text())
    np.testing.assert_allclose(cutoffs["thresholds"], np.quantile([p["log_hazard"] for p in predictions], [1 / 3, 2 / 3]))
    assert model["thresholds"] == cutoffs["thresholds"]
    assert (out / "fusion" / "km_risk_groups.png").stat().st_size > 1000
    assert "SYNTHETIC" in (out / "report.md").read_text()
