"""OncoFusion MONAI Label app: one infer task and one train task per bundle under ``bundles/``.

This file only wires; the tasks live in :mod:`oncofusion.serving`. Configuration (``--conf key value``):

- ``bundles``: directory holding the bundles (default: ``<repo>/bundles``)
- ``models``: ``all`` or a comma list of bundle names (default: ``all``)
- ``image_cache_mb``: memory budget of the decoded studies kept between clicks, in MiB (default: 2048;
  0 keeps nothing)
- ``device``: ``cpu`` / ``cuda`` / ``cuda:1`` (default: cuda when available)
- ``max_epochs``: default epochs of a ``/train`` request (default: 50)
- ``train_timeout``: seconds after which a training run is killed (default: 86400)
- ``num_folds``: patient-level folds given to studies whose sidecar has no ``fold``, for bundles whose
  training plan names none (default: 5; a plan's ``num_folds`` wins)
- ``runs``: where training runs are written (default: ``<app>/model/<bundle>/<timestamp>``)
- ``always_label``: answer with an empty label when a model draws nothing (default: true; the 0.8.5
  client and Slicer cannot read a JSON-only answer)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parent.parent


def _ensure_importable(root: Path) -> None:
    """Serve from a checkout without installing: the app, its train subprocesses and the bundles'
    ``_target_`` references all need ``oncofusion`` on the path."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *paths])


_ensure_importable(REPO_ROOT)

from oncofusion.contract import InvalidRequest  # noqa: E402
from oncofusion.io.cache import ImageCache  # noqa: E402
from oncofusion.serving.discovery import discover_bundles  # noqa: E402
from oncofusion.serving.infer_task import BundleInferTask  # noqa: E402
from oncofusion.serving.train_task import BundleTrainTask  # noqa: E402
from oncofusion.training import TrainingPlan  # noqa: E402

logger = logging.getLogger(__name__)


def _stay_offline() -> None:
    """Nothing in this app may reach the network: the server runs next to patient data, often air-gapped.

    MONAI Label itself downloads only on request paths this app does not use (zoo bundles, SAM2
    weights, DICOMweb's dcmqi tools, MLflow tracking); these settings and variables keep it, and the
    libraries bundles load (Hugging Face), from trying.
    """
    settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    settings.MONAI_LABEL_TRACKING_ENABLED = False
    settings.MONAI_LABEL_TRACKING_URI = ""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")


class OncoFusionApp(MONAILabelApp):
    """Every bundle under ``--conf bundles`` as a deepgrow infer task and a train task, named after its
    directory; the study sidecars in ``<studies>/sidecars`` supply the non-image fields."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        _stay_offline()
        conf = conf or {}
        self.bundles = discover_bundles(conf.get("bundles", REPO_ROOT / "bundles"), conf.get("models", "all"))
        self.image_cache = ImageCache(max_bytes=int(float(conf.get("image_cache_mb", 2048)) * 2**20))
        # One click is a handful of small tensors: on a few CPU cores, intra-op threads spend more on
        # synchronisation than they save (measured: 5 ms on one thread vs 100-200 ms on two for the
        # lung image tower while another process loads the machine). Training runs in its own process.
        torch.set_num_threads(int(conf.get("infer_threads", 1)))
        local = not studies.startswith(("http://", "https://"))
        self.sidecar_dir = Path(studies) / "sidecars" if local else None
        logger.info("serving bundles: %s", ", ".join(self.bundles) or "none")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="OncoFusion",
            description="Multimodal cancer prediction (image + report + clinical fields) from a click",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {
            name: BundleInferTask(
                path,
                image_cache=self.image_cache,
                sidecar_dir=self.sidecar_dir,
                datastore=self.datastore(),
                device=self.conf.get("device"),
                name=name,
                always_label=self.conf.get("always_label", "true").lower() in ("1", "true", "yes"),
            )
            for name, path in self.bundles.items()
            if (path / "configs" / "inference.json").is_file()
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        if self.sidecar_dir is None:
            return {}
        runs = Path(self.conf["runs"]) if self.conf.get("runs") else Path(self.app_dir) / "model"
        return {
            name: BundleTrainTask(
                path,
                sidecar_dir=self.sidecar_dir,
                runs_dir=runs / name,
                max_epochs=int(self.conf.get("max_epochs", 50)),
                timeout_s=float(self.conf.get("train_timeout", 24 * 3600)),
                num_folds=int(self.conf.get("num_folds", 5)),
                name=name,
            )
            for name, path in self.bundles.items()
            if TrainingPlan.load(path).is_complete(path)
        }

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """Stock inference, with the user's mistakes answered as 4xx naming the problem.

        Nothing is written to the datastore unless the prediction succeeded: stock MONAI Label saves
        only after the task returns, and the task persists its JSON as its very last step.
        """
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(
                404, f"unknown model '{model}'; available: {', '.join(self._infers) or 'none'}"
            )
        image = request.get("image")
        if isinstance(image, str):
            datastore = datastore or self.datastore()
            if not image:
                raise HTTPException(400, "no image given: pass ?image=<image id>")
            if not os.path.exists(image) and not datastore.get_image_uri(image):
                logger.info("rejected %s request: unknown image id", model)
                raise HTTPException(404, f"image '{image}' is not in the datastore")
            # the task needs the id the client used (sidecar, persisted prediction); stock replaces it
            request = {**request, "image_id": image}
        try:
            return super().infer(request, datastore)
        except InvalidRequest as e:
            logger.info("rejected %s request: %s", model, e)
            raise HTTPException(status_code=e.status_code, detail=str(e)) from e

    def bundle_path(self, model: str | None) -> str | None:
        """Refuse a train request that cannot work, before MONAI Label starts its background run.

        ``AsyncTask.run`` asks for the bundle path in the server process right before it spawns the
        training subprocess: the one place a ``/train`` request can still get a 4xx naming the problem
        instead of a background task that fails later.
        """
        task = self._trainers.get(model) if model else None
        if not isinstance(task, BundleTrainTask):
            return None
        try:
            task.check(self.datastore())
        except InvalidRequest as e:
            raise HTTPException(status_code=e.status_code, detail=str(e)) from e
        return str(task.bundle_dir)

    def _download_dcmqi_tools(self) -> None:
        """Stock downloads dcmqi from GitHub for a DICOMweb datastore; this app never goes online."""
        logger.warning("not downloading dcmqi tools (offline app); DICOM SEG export needs them on PATH")
