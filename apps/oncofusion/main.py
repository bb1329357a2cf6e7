"""OncoFusion MONAI Label app: one infer task and one train task per bundle under ``bundles/``.

This file only wires; the tasks live in :mod:`oncofusion.serving`. Configuration (``--conf key value``):

- ``bundles``: directory holding the bundles (default: ``<repo>/bundles``)
- ``models``: ``all`` or a comma list of bundle names (default: ``all``)
- ``image_cache_mb``: memory budget of the decoded studies kept between clicks, in MiB (default: 2048;
  0 keeps nothing)
- ``max_image_voxels`` / ``max_image_mb``: the most one image may cost to decode, judged from its header
  before decoding (defaults: 268435456 voxels, 2048 MiB; 413 above)
- ``device``: ``cpu`` / ``cuda`` / ``cuda:1`` (default: cuda when available)
- ``max_epochs``: default epochs of a ``/train`` request (default: 50)
- ``train_timeout``: seconds after which a training run is killed (default: 86400)
- ``num_folds``: patient-level folds given to studies whose sidecar has no ``fold``, for bundles whose
  training plan names none (default: 5; a plan's ``num_folds`` wins)
- ``runs``: where training runs are written (default: ``<app>/model/<bundle>/<timestamp>``)
- ``always_label``: answer with an empty label when a model draws nothing (default: true; the 0.8.5
  client and Slicer cannot read a JSON-only answer)
- ``infer_workers``: inferences run at once, off the event loop (default: 1)
- ``max_upload_mb``: largest request body, an uploaded study included (default: 1024)
- ``max_params_kb`` / ``max_text_chars``: largest ``params`` form field (256) and text value in it (20000)
- ``cors_origins``: comma list of origins a browser page served elsewhere may call from (default: none)
- ``auth_public_key``: PEM file of the token-signing key, with ``MONAI_LABEL_AUTH_ENABLE=true``
  (default: none; see README.md)
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
from monailabel.interfaces.datastore import Datastore
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
from oncofusion.io.limits import ImageLimits  # noqa: E402
from oncofusion.serving.datastore import DurableLocalDatastore, with_single_file_dicom  # noqa: E402
from oncofusion.serving.discovery import discover_bundles  # noqa: E402
from oncofusion.serving.hardening import harden, settings_from_conf  # noqa: E402
from oncofusion.serving.identifiers import check_identifier  # noqa: E402
from oncofusion.serving.infer_task import BundleInferTask  # noqa: E402
from oncofusion.serving.prefetch import VolumePrefetcher  # noqa: E402
from oncofusion.serving.summary_task import BundleSummaryTask  # noqa: E402
from oncofusion.serving.train_task import PUBLISHED_LINK, BundleTrainTask  # noqa: E402
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
        self.image_cache = ImageCache(max_bytes=int(float(conf.get("image_cache_mb", 2048)) * 2**20),
                                      limits=ImageLimits.from_conf(conf))
        # One click is a handful of small tensors: on a few CPU cores, intra-op threads spend more on
        # synchronisation than they save (measured: 5 ms on one thread vs 100-200 ms on two for the
        # lung image tower while another process loads the machine). Training runs in its own process.
        torch.set_num_threads(int(conf.get("infer_threads", 1)))
        local = not studies.startswith(("http://", "https://"))
        self.sidecar_dir = Path(studies) / "sidecars" if local else None
        logger.info("serving bundles: %s", ", ".join(self.bundles) or "none")
        self._hardened = False
        self.prefetcher: VolumePrefetcher | None = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="OncoFusion",
            description="Multimodal cancer prediction (image + report + clinical fields) from a click",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        """Stock's local datastore with crash-safe writes (a kill mid-save used to leave the datastore file
        empty and the server unable to start); remote (DICOMweb, XNAT, DSA) studies stay stock. A study a
        client asks for is decoded in the background (``prefetch``, default on), before its first click."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        datastore = DurableLocalDatastore(
            self.studies,
            extensions=with_single_file_dicom(settings.MONAI_LABEL_DATASTORE_FILE_EXT),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        if self.conf.get("prefetch", "true").lower() in ("1", "true", "yes"):
            self.prefetcher = VolumePrefetcher(self.image_cache)
            datastore.on_image_requested = self.prefetcher.request
        return datastore

    def _runs_dir(self) -> Path:
        return Path(self.conf["runs"]) if self.conf.get("runs") else Path(self.app_dir) / "model"

    def init_infers(self) -> dict[str, InferTask]:
        """Per bundle: the deepgrow task (clicks) and its segmentation-type companion ``<bundle>_summary``
        (the same model on the study's known lesion; stock Slicer names its segment after the summary)."""
        tasks: dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            if not (path / "configs" / "inference.json").is_file():
                continue
            task = BundleInferTask(
                path,
                image_cache=self.image_cache,
                sidecar_dir=self.sidecar_dir,
                datastore=self.datastore(),
                device=self.conf.get("device"),
                name=name,
                always_label=self.conf.get("always_label", "true").lower() in ("1", "true", "yes"),
                published=self._runs_dir() / name / PUBLISHED_LINK,
            )
            summary = BundleSummaryTask(task)
            tasks.update({name: task, summary.name: summary})
        return tasks

    def init_trainers(self) -> dict[str, TrainTask]:
        if self.sidecar_dir is None:
            return {}
        runs = self._runs_dir()
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

    def server_mode(self, mode: bool) -> None:
        """MONAI Label calls this once the app serves HTTP: put the guard and the app's own routes in front
        of the stock endpoints (train subprocesses re-create the app without serving, and skip this)."""
        super().server_mode(mode)
        if mode and not self._hardened:
            from monailabel.app import app as fastapi_app
            from monailabel.config import settings as monailabel_settings

            hardening = settings_from_conf(self.conf, monailabel_settings.MONAI_LABEL_AUTH_ENABLE)
            harden(fastapi_app, hardening, private_roots=[self.studies] if self.sidecar_dir else [])
            self._hardened = True

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """Run one model on one study; the user's mistakes are answered as 4xx naming the problem.

        Replaces the stock method, which took any existing server path for a study and any string for a
        label tag. ``image`` is a datastore id; ``image_upload`` a file the endpoint received (an upload or
        a session), never a path a client chose. Nothing is written unless the prediction succeeded.
        """
        model = request.get("model")
        task = self._infers.get(model)
        if task is None:
            raise HTTPException(404, f"unknown model '{model}'; available: {', '.join(self._infers) or 'none'}")
        datastore = datastore or self.datastore()
        request = dict(request)
        upload = request.pop("image_upload", None)
        try:
            tag = check_identifier(request.get("label_tag") or "original", "'label_tag'")
            if upload:
                request.update(image=upload, image_id=None, save_label=False)
            else:
                image_id = check_identifier(request.get("image") or "", "'image'") if request.get("image") else ""
                if not image_id:
                    raise InvalidRequest("no image given: pass ?image=<image id>")
                uri = datastore.get_image_uri(image_id)
                if not uri:
                    raise InvalidRequest(f"image '{image_id}' is not in the datastore", 404)
                request.update(image=uri, image_id=image_id)
            label_file, result = task(request)
        except InvalidRequest as e:
            raise HTTPException(status_code=e.status_code, detail=str(e)) from e
        label_id = label_file
        if label_file and request.get("save_label") and not upload:
            label_id = datastore.save_label(request["image_id"], label_file, tag, {"model": model, "params": result})
        return {"label": label_id, "tag": tag, "file": label_file, "params": result}

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
