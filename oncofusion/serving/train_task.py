"""Train a bundle from the datastore's studies and their multimodal sidecars.

Stock MONAI Label trains from image + label-mask pairs. Here a training record is a study, its target
(as the bundle's ``target`` in ``inference.json`` declares it: a class, or a survival time and event),
the lesion position when the model takes a prompt, and the text and clinical fields in
``<datastore>/sidecars/<image_id>.json``. The records are written as a case manifest
(:mod:`oncofusion.data.manifest`), the same file a bundle trains from offline.

MONAI Label runs ``/train`` in a background subprocess of its own (``monailabel.utils.async_tasks``),
which re-creates the app and calls this task; the task runs the bundle's training plan
(:mod:`oncofusion.training`, the same ``python -m oncofusion.cli train`` a researcher runs) in one more
subprocess with a time limit, so neither the server nor a stuck run can hang forever.

Training cannot hurt serving: a run writes only into its own folder (``<runs>/<timestamp>/models``),
never into the bundle's committed weights; when it finishes and a predictor builds from its
checkpoints, it is *published* by swapping the ``<runs>/current`` link in one atomic step, which the
infer task follows. Every process of the chain dies with its parent, so a killed server leaves no run
behind. In a datastore holding several bundles' studies, a study whose sidecar names a ``bundle`` is
used by that bundle only.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from oncofusion.contract import InputSpec, InvalidRequest
from oncofusion.data.folds import assign_missing_folds
from oncofusion.io.readers import image_affine, read_image
from oncofusion.serving.infer_task import load_metadata
from oncofusion.serving.request import parse_box, parse_points, read_sidecar
from oncofusion.targets import Target
from oncofusion.training import TrainingPlan, die_with_parent

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
#: link under a bundle's runs folder to the checkpoints the server serves
PUBLISHED_LINK = "current"


def belongs_to(sidecar: dict[str, Any], bundle: str) -> bool:
    """A study is a bundle's when its sidecar names that bundle (``bundle``: a name or a list), or names
    none (a datastore of one bundle's studies needs no tag)."""
    tagged = sidecar.get("bundle")
    if tagged is None:
        return True
    return bundle in (tagged if isinstance(tagged, list) else [tagged])


def publish(models_dir: Path, link: Path) -> None:
    """Point ``link`` at ``models_dir`` in one step (``os.replace`` of a symlink): a reader sees the old
    checkpoints or the new ones, never a half-written folder."""
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(os.path.relpath(models_dir, link.parent))
    os.replace(temporary, link)
    folder = os.open(link.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sidecar_center_ijk(sidecar: dict[str, Any], dims: int = 3) -> np.ndarray | None:
    """The lesion centre of a sidecar: ``center_ijk``, else the centre of ``roi``, else of ``foreground``,
    with ``dims`` indices (those of the primary image)."""
    if sidecar.get("center_ijk") is not None:
        points = parse_points(sidecar["center_ijk"], "center_ijk", dims)
        return np.asarray(points, float).mean(axis=0) if points else None
    box = parse_box(sidecar.get("roi"), "roi", dims)
    if box is not None:
        return (np.asarray(box[0]) + np.asarray(box[1])) / 2.0
    points = parse_points(sidecar.get("foreground"), "foreground", dims)
    return np.asarray(points, float).mean(axis=0) if points else None


class BundleTrainTask(TrainTask):
    """Build a multimodal datalist and run the bundle's training plan on it.

    The bundle's train configs must accept the overrides ``datalist_file``, ``max_epochs`` and
    ``output_dir``; the datalist file is a manifest ``{"description", "num_folds", "cases": [...]}``
    whose cases carry ``image`` (absolute), ``case_id``, ``patient_id``, ``fold``, the target's fields,
    ``center_ijk``/``center_mm`` when the study records a lesion, and every other sidecar field.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        sidecar_dir: str | os.PathLike,
        runs_dir: str | os.PathLike,
        max_epochs: int = 50,
        timeout_s: float = 24 * 3600,
        num_folds: int = 5,
        name: str | None = None,
    ):
        self.bundle_dir = Path(bundle_dir).resolve()
        self.name = name or self.bundle_dir.name
        self.config_path = self.bundle_dir / "configs" / "train.json"
        self.metadata = load_metadata(self.bundle_dir)
        self.target, self.inputs = self._read_contract()
        self.sidecar_dir = Path(sidecar_dir)
        self.runs_dir = Path(runs_dir)
        self.max_epochs = int(max_epochs)
        self.timeout_s = float(timeout_s)
        # the plan's folds, when it has some, are the folds the bundle trains and reports out of fold
        plan_folds = TrainingPlan.load(self.bundle_dir).num_folds
        self.num_folds = plan_folds if plan_folds >= 2 else int(num_folds)
        super().__init__(self.metadata.get("description") or self.name)

    def _read_contract(self) -> tuple[Target, InputSpec]:
        """The target and inputs ``inference.json`` declares: what a record needs to be trainable."""
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        if parser.get("target") is None:
            raise ValueError(f"{self.bundle_dir.name}: configs/inference.json declares no 'target'")
        inputs = parser.get_parsed_content("inputs") if parser.get("inputs") is not None else InputSpec()
        return parser.get_parsed_content("target"), inputs

    # -- MONAI Label interface -----------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        info = super().info()
        info["version"] = str(self.metadata.get("version", ""))
        return info

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.max_epochs, "timeout_s": self.timeout_s}

    def stats(self) -> dict[str, Any]:
        """Status of the latest run (shown by MONAI Label under ``train_stats``)."""
        runs = sorted(self.runs_dir.glob(f"*/{STATUS_FILE}")) if self.runs_dir.is_dir() else []
        if not runs:
            return {}
        try:
            return json.loads(runs[-1].read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        die_with_parent()  # this process is MONAI Label's task runner: it goes when the server goes
        max_epochs = self._positive_int(request.get("max_epochs", self.max_epochs), "max_epochs")
        timeout_s = float(request.get("timeout_s", self.timeout_s))
        records = self.check(datastore, with_world=True)

        run_dir = self.runs_dir / time.strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while run_dir.exists():
            run_dir = self.runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
            suffix += 1
        run_dir.mkdir(parents=True)
        datalist_file = run_dir / "datalist.json"
        manifest = {
            "description": f"{self.name}: labelled studies of the MONAI Label datastore",
            "num_folds": self.num_folds,
            "cases": records,
        }
        datalist_file.write_text(json.dumps(manifest, indent=2))

        cmd = [
            sys.executable, "-m", "oncofusion.cli", "train",
            "--bundle", str(self.bundle_dir),
            "--datalist-file", str(datalist_file),
            "--max-epochs", str(max_epochs),
            "--output-dir", str(run_dir),
            "--ckpt-dir", str(run_dir / "models"),
        ]  # fmt: skip
        status = {
            "model": self.name,
            "run_dir": str(run_dir),
            "records": len(records),
            "strata": {str(k): n for k, n in Counter(self.target.stratum(r) for r in records).items()},
            "max_epochs": max_epochs,
            "status": "RUNNING",
            "start_ts": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._write_status(run_dir, status)
        logger.info(
            "%s: training on %d records, %d epochs, in %s", self.name, len(records), max_epochs, run_dir
        )

        returncode, timed_out, tail = self._run(cmd, run_dir / "train.log", timeout_s)
        status.update(
            {
                "status": "DONE" if returncode == 0 else ("TIMEOUT" if timed_out else "ERROR"),
                "returncode": returncode,
                "end_ts": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        if returncode == 0:
            status["published"] = self._publish(run_dir / "models")
        self._write_status(run_dir, status)
        if returncode != 0:
            # raising makes MONAI Label's background task end as ERROR with this message in its details
            why = f"timed out after {timeout_s:g}s" if timed_out else f"exited with code {returncode}"
            raise RuntimeError(
                f"training {self.name} {why}; see {run_dir / 'train.log'}:\n" + "\n".join(tail)
            )
        return status

    def _publish(self, models_dir: Path) -> str:
        """Serve the run's checkpoints if a predictor builds from them; say what happened."""
        if not models_dir.is_dir() or not any(p.is_file() for p in models_dir.rglob("*")):
            return "no: the run wrote no checkpoints"
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser.update({"bundle_root": str(self.bundle_dir), "ckpt_dir": str(models_dir),
                       "device": torch.device("cpu")})
        try:
            parser.get_parsed_content("predictor")
        except Exception as e:  # the served model stays as it was
            logger.error("%s: not publishing %s: no predictor builds from it (%s)", self.name, models_dir, e)
            return f"no: no predictor builds from the checkpoints ({type(e).__name__})"
        publish(models_dir, self.runs_dir / PUBLISHED_LINK)
        logger.info("%s: published %s", self.name, models_dir)
        return "yes"

    # -- datalist ------------------------------------------------------------------------------------
    def _lesion(self, image_id: str, sidecar: dict[str, Any], image: str, with_world: bool) -> dict[str, Any] | None:
        """``center_ijk`` (and ``center_mm``) of the recorded lesion; None when the sidecar records none."""
        try:
            center_ijk = sidecar_center_ijk(sidecar, self.inputs.dimension)
        except InvalidRequest as e:
            raise InvalidRequest(f"sidecar of '{image_id}': {e}") from e
        if center_ijk is None:
            return None
        lesion = {"center_ijk": [float(v) for v in center_ijk]}
        if with_world:
            # recomputed even when the sidecar has one: the image on disk is the reference
            primary = self.inputs.primary
            affine = (image_affine(image) if primary.reader == "volume"
                      else np.asarray(read_image(image, primary.reader).affine, dtype=np.float64))
            lesion["center_mm"] = [float(v) for v in (affine @ np.append(center_ijk, 1.0))[:-1]]
        return lesion

    def records(self, datastore: Datastore, with_world: bool = True) -> list[dict[str, Any]]:
        """One record per study whose sidecar holds the target (and a lesion position, for a prompted model).

        ``with_world`` adds ``center_mm`` (image affine applied to ``center_ijk``, MONAI's RAS world), which
        reads each image header; the quick pre-check of a train request skips it.
        """
        records: list[dict[str, Any]] = []
        for image_id in sorted(datastore.list_images()):
            sidecar = read_sidecar(self.sidecar_dir, image_id)
            if not belongs_to(sidecar, self.name) or any(sidecar.get(key) is None for key in self.target.keys):
                continue  # another bundle's study, or not labelled
            try:
                truth = self.target.parse({"case_id": image_id, **sidecar})
            except ValueError as e:
                raise InvalidRequest(f"sidecar of '{image_id}': {e}") from e
            image = datastore.get_image_uri(image_id)
            record = {k: v for k, v in sidecar.items() if k not in ("roi", "foreground", "bundle")}
            lesion = self._lesion(image_id, sidecar, image, with_world)
            if lesion is None and self.inputs.prompt:
                logger.warning("%s: sidecar has a target but no center_ijk/roi; skipped", image_id)
                continue
            record.update({
                "image": image,
                **truth,
                **(lesion or {}),
                "case_id": sidecar.get("case_id", image_id),
                "patient_id": sidecar.get("patient_id", sidecar.get("case_id", image_id)),
            })
            records.append(record)
        try:
            return assign_missing_folds(records, self.num_folds, self.target)
        except ValueError as e:
            raise InvalidRequest(f"cannot assign folds for {self.name}: {e}") from e

    def check(self, datastore: Datastore, with_world: bool = False) -> list[dict[str, Any]]:
        """Refuse to train on fewer than two labelled studies or on a single stratum (class, or event)."""
        records = self.records(datastore, with_world=with_world)
        needed = ", ".join(f"'{k}'" for k in self.target.keys) + (" and 'center_ijk'" if self.inputs.prompt else "")
        if len(records) < 2:
            raise InvalidRequest(
                f"cannot train {self.name}: {len(records)} labelled studies found, at least 2 are needed; add "
                f"{needed} to {self.sidecar_dir}/<image_id>.json",
                422,
            )
        strata = Counter(self.target.stratum(r) for r in records)
        if len(strata) < 2:
            raise InvalidRequest(
                f"cannot train {self.name}: all {len(records)} labelled studies fall in one {self.target.kind} "
                f"stratum ({next(iter(strata))}); at least 2 are needed",
                422,
            )
        return records

    # -- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _positive_int(value: Any, name: str) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"'{name}' must be a positive integer, got {value!r}") from None
        if number < 1 or isinstance(value, bool):
            raise InvalidRequest(f"'{name}' must be a positive integer, got {value!r}")
        return number

    @staticmethod
    def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
        (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))

    def _run(self, cmd: list[str], log_file: Path, timeout_s: float) -> tuple[int, bool, list[str]]:
        """Run ``cmd``, mirroring its output to the log (MONAI Label shows it as task details)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(self.bundle_dir)) if p)
        logger.info("running: %s", " ".join(cmd))
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(self.bundle_dir),
            preexec_fn=die_with_parent,
        )
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            logger.error("%s: training exceeded %ss; killing it", self.name, timeout_s)
            process.kill()

        timer = threading.Timer(timeout_s, _kill)
        timer.daemon = True
        timer.start()
        tail: list[str] = []
        try:
            with open(log_file, "w") as log:
                assert process.stdout is not None
                for line in process.stdout:
                    log.write(line)
                    line = line.rstrip()
                    if line:
                        logger.info("[%s] %s", self.name, line)
                        tail = (tail + [line])[-20:]
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
        return returncode, timed_out.is_set(), tail
