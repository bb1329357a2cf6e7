"""One training plan per bundle: its stages and variants, declared once, run the same way everywhere.

``<bundle>/configs/plan.json`` says what "train this bundle" means::

    {"num_folds": 5,
     "stages": [{"name": "extract", "config_file": ["configs/extract.json"], "per_fold": false},
                {"name": "fit", "config_file": ["configs/train.json"]}],
     "variants": {"fusion": [], "image_only": ["configs/image_only.json"]}}

Each stage runs ``python -m monai.bundle run`` on its config files plus the variant's overlay files,
once per fold (``--fold k``) or once in all (``per_fold: false``), for every variant, in order. A bundle
without a plan has one stage, ``configs/train.json``, run once. ``python -m oncofusion.cli train``,
``make`` and the server's ``/train`` all call :func:`run_plan`, so a bundle trains the same way from
each of them. Every step runs in its own process with the bundle folder as working directory, which is
where the configs' ``%configs/<file>#<id>`` macros (shared facts such as the target or the clinical
fields, written once) are resolved.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PLAN_FILE = Path("configs") / "plan.json"
DEFAULT_TRAIN_CONFIG = "configs/train.json"
LOGGING_CONFIG = Path("configs") / "logging.conf"


@dataclass(frozen=True)
class Stage:
    """One step of training, e.g. extracting frozen features, then fitting a booster on them."""

    name: str
    config_file: tuple[str, ...]
    per_fold: bool = True


@dataclass(frozen=True)
class Step:
    """One ``monai.bundle run`` of a plan: a stage, for one variant and (for a per-fold stage) one fold."""

    stage: str
    variant: str
    fold: int | None
    config_file: tuple[str, ...]

    def describe(self) -> str:
        fold = "" if self.fold is None else f", fold {self.fold}"
        return f"{self.stage} ({self.variant}{fold})"


@dataclass(frozen=True)
class TrainingPlan:
    """The stages and variants of a bundle; :meth:`steps` orders them, variant by variant."""

    stages: tuple[Stage, ...]
    variants: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {"default": ()})
    num_folds: int = 1

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike) -> TrainingPlan:
        """The bundle's ``configs/plan.json``, or the one-stage default; a malformed plan names the problem."""
        path = Path(bundle_dir) / PLAN_FILE
        if not path.is_file():
            return cls(stages=(Stage("train", (DEFAULT_TRAIN_CONFIG,), per_fold=False),))
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "plan") -> TrainingPlan:
        stages = raw.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ValueError(f"{where}: 'stages' must be a non-empty list of {{name, config_file, per_fold}}")
        parsed = []
        for index, stage in enumerate(stages):
            if not isinstance(stage, dict) or "name" not in stage or "config_file" not in stage:
                raise ValueError(f"{where}: stage {index} needs a 'name' and a 'config_file'")
            files = stage["config_file"]
            files = (files,) if isinstance(files, str) else tuple(files)
            parsed.append(Stage(str(stage["name"]), files, bool(stage.get("per_fold", True))))
        variants = raw.get("variants") or {"default": []}
        if not isinstance(variants, dict) or not all(isinstance(v, list) for v in variants.values()):
            raise ValueError(f"{where}: 'variants' must map a variant name to a list of overlay config files")
        num_folds = int(raw.get("num_folds", 1))
        if num_folds < 1:
            raise ValueError(f"{where}: 'num_folds' must be >= 1, got {num_folds}")
        return cls(tuple(parsed), {name: tuple(files) for name, files in variants.items()}, num_folds)

    def is_complete(self, bundle_dir: str | os.PathLike) -> bool:
        """Every config file the plan runs exists: the bundle can be trained (and gets a ``/train`` task)."""
        files = {f for stage in self.stages for f in stage.config_file}
        files |= {f for overlay in self.variants.values() for f in overlay}
        return all((Path(bundle_dir) / f).is_file() for f in files)

    def steps(self, variants: Sequence[str] | None = None, folds: Sequence[int] | None = None) -> list[Step]:
        """Every step to run, for the chosen ``variants`` (default all) and ``folds`` (default all)."""
        chosen = list(self.variants) if not variants else list(variants)
        unknown = [v for v in chosen if v not in self.variants]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; this bundle has {list(self.variants)}")
        fold_list = list(range(self.num_folds)) if folds is None else [int(f) for f in folds]
        bad = [f for f in fold_list if not 0 <= f < self.num_folds]
        if bad:
            raise ValueError(f"fold(s) {bad} outside 0-{self.num_folds - 1}")
        steps = []
        for variant in chosen:
            for stage in self.stages:
                files = (*stage.config_file, *self.variants[variant])
                for fold in (fold_list if stage.per_fold else [None]):
                    steps.append(Step(stage.name, variant, fold, files))
        return steps


def step_command(step: Step, overrides: Mapping[str, Any], bundle_dir: Path) -> list[str]:
    """The ``python -m monai.bundle run`` command line of one step (run with the bundle as cwd)."""
    files = step.config_file[0] if len(step.config_file) == 1 else json.dumps(list(step.config_file))
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", "."]
    if (bundle_dir / LOGGING_CONFIG).is_file():
        command += ["--logging_file", str(LOGGING_CONFIG)]
    if step.fold is not None:
        command += ["--fold", str(step.fold)]
    for key, value in overrides.items():
        if value is not None:
            command += [f"--{key}", str(value)]
    return command


def die_with_parent() -> None:
    """Ask Linux to kill the calling process when its parent dies (``PR_SET_PDEATHSIG``).

    A training run outlived a killed server and kept writing weights; with this as a child's
    ``preexec_fn`` (or called by the child itself) the whole chain server -> task -> run stops together.
    Elsewhere it does nothing: the parent's own cleanup is all there is.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _run_subprocess(command: list[str], cwd: Path) -> int:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    return subprocess.call(command, cwd=cwd, env=env, preexec_fn=die_with_parent)


def run_plan(bundle_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
             variants: Sequence[str] | None = None, folds: Sequence[int] | None = None,
             runner: Callable[[list[str], Path], int] = _run_subprocess,
             progress: Callable[[Step, int, int], None] | None = None) -> list[Step]:
    """Run every step of the bundle's plan in order; stop at the first failure with an error naming it.

    ``overrides`` (e.g. ``datalist_file``, ``max_epochs``, ``ckpt_dir``, ``output_dir``) go to every step.
    Returns the steps run.
    """
    bundle = Path(bundle_dir).resolve()
    plan = TrainingPlan.load(bundle)
    steps = plan.steps(variants, folds)
    for index, step in enumerate(steps):
        if progress is not None:
            progress(step, index, len(steps))
        logger.info("%s: %s (%d/%d)", bundle.name, step.describe(), index + 1, len(steps))
        code = runner(step_command(step, dict(overrides or {}), bundle), bundle)
        if code != 0:
            raise RuntimeError(f"training {bundle.name} failed at {step.describe()} (exit code {code})")
    return steps
