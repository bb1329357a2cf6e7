"""The training plan: stages and variants read from configs/plan.json, ordered, and run the same way
by the command line and the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oncofusion.cli import main as cli_main
from oncofusion.training import Stage, Step, TrainingPlan, run_plan, step_command

REPO = Path(__file__).resolve().parents[1]
PLAN = {
    "num_folds": 3,
    "stages": [{"name": "extract", "config_file": "configs/extract.json", "per_fold": False},
               {"name": "fit", "config_file": ["configs/fit.json"]}],
    "variants": {"fusion": [], "image_only": ["configs/image_only.json"]},
}


def _bundle(tmp_path: Path, plan: dict | None = PLAN) -> Path:
    (tmp_path / "configs").mkdir(parents=True)
    if plan is not None:
        (tmp_path / "configs" / "plan.json").write_text(json.dumps(plan))
    return tmp_path


def test_steps_run_each_variant_stage_by_stage_and_fold_by_fold(tmp_path):
    plan = TrainingPlan.load(_bundle(tmp_path))
    assert plan.stages == (Stage("extract", ("configs/extract.json",), False), Stage("fit", ("configs/fit.json",)))
    steps = plan.steps()
    assert [(s.variant, s.stage, s.fold) for s in steps] == [
        ("fusion", "extract", None), ("fusion", "fit", 0), ("fusion", "fit", 1), ("fusion", "fit", 2),
        ("image_only", "extract", None), ("image_only", "fit", 0), ("image_only", "fit", 1),
        ("image_only", "fit", 2),
    ]
    assert steps[-1].config_file == ("configs/fit.json", "configs/image_only.json")
    chosen = plan.steps(variants=["image_only"], folds=[2])
    assert [(s.stage, s.fold) for s in chosen] == [("extract", None), ("fit", 2)]


def test_a_bundle_without_a_plan_runs_train_json_once(tmp_path):
    assert TrainingPlan.load(_bundle(tmp_path, plan=None)).steps() == [
        Step("train", "default", None, ("configs/train.json",))]


@pytest.mark.parametrize("plan, message", [
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"stages": [{"config_file": "c.json"}]}, "stage 0 needs a 'name'"),
    ({"stages": [{"name": "a", "config_file": "c.json"}], "variants": {"x": "y.json"}}, "'variants' must map"),
    ({"stages": [{"name": "a", "config_file": "c.json"}], "num_folds": 0}, "'num_folds' must be >= 1"),
])
def test_a_malformed_plan_names_the_problem(tmp_path, plan, message):
    with pytest.raises(ValueError, match=message):
        TrainingPlan.load(_bundle(tmp_path, plan))


def test_unknown_variants_and_folds_are_refused(tmp_path):
    plan = TrainingPlan.load(_bundle(tmp_path))
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['fused'\]; this bundle has \['fusion', 'image_only'\]"):
        plan.steps(variants=["fused"])
    with pytest.raises(ValueError, match=r"fold\(s\) \[3\] outside 0-2"):
        plan.steps(folds=[3])


def test_step_command_passes_fold_files_and_overrides(tmp_path):
    bundle = _bundle(tmp_path)
    step = Step("fit", "image_only", 1, ("configs/fit.json", "configs/image_only.json"))
    command = step_command(step, {"max_epochs": 2, "ckpt_dir": None, "datalist_file": "/d/m.json"}, bundle)
    assert command[:4] == [sys.executable, "-m", "monai.bundle", "run"]
    assert command[command.index("--config_file") + 1] == '["configs/fit.json", "configs/image_only.json"]'
    assert command[command.index("--fold") + 1] == "1"
    assert command[command.index("--max_epochs") + 1] == "2" and "--ckpt_dir" not in command
    assert command[command.index("--datalist_file") + 1] == "/d/m.json"


def test_run_plan_runs_every_step_in_the_bundle_and_stops_at_a_failure(tmp_path):
    bundle = _bundle(tmp_path)
    calls = []

    def runner(command, cwd):
        calls.append((command[command.index("--config_file") + 1], cwd))
        return 1 if len(calls) == 3 else 0

    with pytest.raises(RuntimeError, match=r"failed at fit \(fusion, fold 1\) \(exit code 1\)"):
        run_plan(bundle, {"max_epochs": 1}, runner=runner)
    assert [c[0] for c in calls] == ["configs/extract.json", "configs/fit.json", "configs/fit.json"]
    assert all(cwd == bundle.resolve() for _, cwd in calls)


def test_the_real_bundles_declare_plans_whose_configs_exist():
    for name, variants in (("lung_nodule_clip", ["default"]), ("bone_tumor_matrix", ["fusion", "image_only"])):
        bundle = REPO / "bundles" / name
        plan = TrainingPlan.load(bundle)
        assert list(plan.variants) == variants and plan.num_folds == 5
        for step in plan.steps():
            assert all((bundle / f).is_file() for f in step.config_file), step


def test_cli_train_names_a_bad_variant(tmp_path, capsys):
    assert cli_main(["train", "--bundle", str(_bundle(tmp_path)), "--variant", "fused"]) == 2
    assert "unknown variant(s) ['fused']" in capsys.readouterr().err


def test_cli_train_passes_epochs_and_patience_to_every_step(tmp_path, monkeypatch):
    import oncofusion.training

    seen = []
    monkeypatch.setattr(oncofusion.training, "run_plan",
                        lambda bundle, overrides, variants, folds, progress: seen.append(dict(overrides)))
    assert cli_main(["train", "--bundle", str(_bundle(tmp_path)), "--max-epochs", "20", "--patience", "10"]) == 0
    assert seen[0]["max_epochs"] == 20 and seen[0]["patience"] == 10
    command = step_command(Step("fit", "fusion", 0, ("configs/fit.json",)), seen[0], tmp_path)
    assert command[command.index("--patience") + 1] == "10"


def test_a_plan_is_complete_only_when_every_config_it_runs_exists(tmp_path):
    bundle = _bundle(tmp_path)
    plan = TrainingPlan.load(bundle)
    for name in ("extract.json", "fit.json"):
        (bundle / "configs" / name).write_text("{}")
    assert not plan.is_complete(bundle)  # the image_only overlay is missing
    (bundle / "configs" / "image_only.json").write_text("{}")
    assert plan.is_complete(bundle)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_dies_with_the_process_that_started_it():
    """Server -> task runner -> training run: killing the parent kills the run (it once kept writing)."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, time\n"
         "from oncofusion.training import die_with_parent\n"
         "run = subprocess.Popen(['sleep', '120'], preexec_fn=die_with_parent)\n"
         "print(run.pid, flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    run_pid = int(parent.stdout.readline())
    os.kill(run_pid, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(run_pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it became our zombie: it is gone either way
            if os.waitpid(run_pid, os.WNOHANG)[0] == run_pid:
                return
        except ChildProcessError:
            pass
        with open(f"/proc/{run_pid}/stat") as stat:
            if stat.read().split()[2] == "Z":
                return
        time.sleep(0.2)
    os.kill(run_pid, signal.SIGKILL)
    pytest.fail("the training run outlived the process that started it")
