"""One MONAI Label infer task per bundle, driven only by the bundle's declared ``inputs`` and ``predictor``.

The task is a *deepgrow* model for MONAI Label: 3D Slicer lists only segmentation, detection,
deepgrow, deepedit and scribbles models, and only deepgrow/deepedit models receive the user's
clicks. The task's dimension and readers come from the bundle's ``inputs``
(:class:`~oncofusion.contract.InputSpec`), as stock MONAI Label's bundle task takes them from
``network_data_format``. The request's image is the primary input; further images (e.g. the slide of
the same patient) are named by the request's ``images`` parameter, else by the study's sidecar, as
datastore ids. The clicks become a :class:`~oncofusion.contract.Roi`; the predictor's JSON goes back to
the client and, when it draws something, a label on the primary image's grid.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from pydicom.dataset import Dataset

from oncofusion.contract import InputSpec, InvalidRequest, Prediction, Predictor
from oncofusion.io.atomic import atomic_write_bytes
from oncofusion.io.cache import ImageCache
from oncofusion.io.readers import read_image
from oncofusion.serving import dicom_results
from oncofusion.serving.identifiers import check_identifier
from oncofusion.serving.request import (
    FRAME_OPTION,
    check_known_fields,
    contradictions,
    decode_param,
    field_sources,
    merge_fields,
    parse_roi,
    prompt_on_frame,
    read_sidecar,
)
from oncofusion.serving.writers import label_array, label_extension, write_label

logger = logging.getLogger(__name__)

#: key under the datastore's image info where every prediction's JSON is kept, per model
PREDICTIONS_KEY = "oncofusion_predictions"
#: the segment name a bundle gets when its inference.json declares no ``label_name``
DEFAULT_LABEL_NAME = "lesion"

#: a prediction's SEG + SR go back to the PACS for a DICOMweb study
PACS = "pacs"
#: the studies sub-folder holding the SEG + SR of predictions on local DICOM files
DICOM_RESULTS_DIR = "dicom_results"
DICOM_FILE_SUFFIX = ".dcm"

#: where a local datastore's volumes are kept decoded (float32 .npy), under its studies folder: MONAI
#: Label lists only the folder's own image files, and the decoded copies stay beside the studies
DECODED_DIR = Path(".oncofusion") / "decoded"

#: the folders of an absolute path in a message (answers name files, never server folders)
_ABSOLUTE_FOLDERS = re.compile(r"/(?:[^\s/'\"]+/)+")

# one datastore file is shared by every task: serialise read-merge-write of image info
_DATASTORE_LOCK = threading.Lock()


def load_metadata(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """``configs/metadata.json`` with the keys the app shows (name, version, description, task)."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    with open(path) as f:
        metadata = json.load(f)
    missing = [k for k in ("name", "version", "description", "task") if k not in metadata]
    if missing:
        logger.warning("%s lacks %s", path, ", ".join(missing))
    return metadata


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _root_cause(error: BaseException) -> str:
    """The innermost error: MONAI wraps a component's own message in 'Failed to instantiate ...'."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def to_jsonable(value: Any) -> Any:
    """Numpy/torch scalars and arrays -> plain JSON types (predictors return whatever is natural)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


class BundleInferTask(InferTask):
    """Serve ``<bundle>/configs/inference.json``'s ``predictor`` as a deepgrow model.

    The predictor is built on first use, so starting the server (and every train subprocess, which
    re-creates the app) does not load weights it may never need.

    ``published``: link to the checkpoints a training run published (see
    :mod:`~oncofusion.serving.train_task`); while it does not exist the bundle's ``models/`` are served.

    ``always_label``: answer with an empty label volume when the predictor draws nothing. The MONAI
    Label 0.8.5 client (also bundled in the Slicer plugin) parses a JSON-only ``/infer`` answer as
    bytes and fails, so a multipart answer with a label file is the one every client reads.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        image_cache: ImageCache,
        sidecar_dir: str | os.PathLike | None = None,
        datastore: Datastore | None = None,
        device: str | torch.device | None = None,
        name: str | None = None,
        always_label: bool = True,
        published: str | os.PathLike | None = None,
    ):
        self.bundle_dir = Path(bundle_dir).resolve()
        self.published = Path(published) if published else None
        self.name = name or self.bundle_dir.name
        self.metadata = load_metadata(self.bundle_dir)
        self.version = str(self.metadata.get("version", ""))
        self.config_path = self.bundle_dir / "configs" / "inference.json"
        self.device = torch.device(device) if device else default_device()
        self.sidecar_dir = Path(sidecar_dir) if sidecar_dir else None
        self.inputs, self.target_keys = self._read_contract() if self.config_path.is_file() else (InputSpec(), ())
        self.image_cache = image_cache
        self.datastore = datastore
        self.always_label = always_label
        self._spill_decoded_volumes()
        self._predictor: Predictor | None = None
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self._build_error: str | None = None
        self._lock = threading.Lock()
        description = self.metadata.get("description") or self.metadata.get("name", self.name)
        super().__init__(type=InferType.DEEPGROW, labels=[self._declared_label_name()],
                         dimension=self.inputs.dimension, description=description)

    def _spill_decoded_volumes(self) -> None:
        """Decode the local datastore's volumes once into files under it (:data:`DECODED_DIR`), mapped on
        every click and reused after a restart, instead of keeping them in memory (see
        :mod:`oncofusion.io.cache`); the first task to start sets it for the cache all tasks share."""
        studies = getattr(self.datastore, "_datastore_path", None)
        if studies and self.image_cache.spill_dir is None:
            self.image_cache.spill_to(Path(studies) / DECODED_DIR)

    # -- predictor -----------------------------------------------------------------------------------
    @property
    def predictor(self) -> Predictor:
        """The bundle's predictor, built on first use and rebuilt when ``<bundle>/models`` changes (a
        training run published new weights). A bundle that cannot load (e.g. not trained yet) answers
        503 with the root cause and is retried on the next call."""
        signature = self._models_signature()
        if self._predictor is None or signature != self._signature:
            with self._lock:
                if self._predictor is None or signature != self._signature:
                    if self._predictor is not None:
                        logger.info("%s: weights changed; reloading the predictor", self.name)
                    try:
                        self._predictor = self._build_predictor()
                    except Exception as e:
                        self._predictor = None
                        reason = _root_cause(e)
                        if reason != self._build_error:
                            logger.exception("%s: cannot build the predictor", self.name)
                        self._build_error = reason
                        raise InvalidRequest(f"model '{self.name}' is unavailable: {reason}", 503) from e
                    self._signature, self._build_error = signature, None
        return self._predictor

    def _checkpoints_dir(self) -> Path:
        """The checkpoints served: the last published training run's (a link swapped atomically), else the
        bundle's own ``models/``."""
        if self.published is not None and self.published.exists():
            return self.published.resolve()
        return self.bundle_dir / "models"

    def _models_signature(self) -> tuple[tuple[str, int, int], ...]:
        models = self._checkpoints_dir()
        if not models.is_dir():
            return ()
        files = (p for p in models.rglob("*") if p.is_file())
        return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))

    def _parser(self) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(self.config_path))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = self.device
        # the local studies folder, for bundles that read files a study's sidecar names (slides, masks)
        parser["studies_dir"] = None if self.sidecar_dir is None else str(Path(self.sidecar_dir).parent)
        if self.published is not None and self.published.exists():
            parser["ckpt_dir"] = str(self._checkpoints_dir())
        return parser

    def _declared_label_name(self) -> str:
        """``label_name`` of ``inference.json`` (default ``lesion``): the segment 3D Slicer prepares on *Next
        Sample*; without a label in ``/info`` a click only warns "Please add the required label"."""
        if not self.config_path.is_file():
            return DEFAULT_LABEL_NAME
        return str(self._parser().get("label_name") or DEFAULT_LABEL_NAME)

    def _read_contract(self) -> tuple[InputSpec, tuple[str, ...]]:
        """The bundle's declared ``inputs`` (default: one 3D image with any prompt) and its target's keys
        (cheap: no weights load)."""
        parser = self._parser()
        inputs = InputSpec() if parser.get("inputs") is None else parser.get_parsed_content("inputs")
        if not isinstance(inputs, InputSpec):
            raise TypeError(f"{self.config_path}: 'inputs' must be an oncofusion.contract.InputSpec")
        target_keys = () if parser.get("target") is None else tuple(parser.get_parsed_content("target").keys)
        return inputs, target_keys

    def _build_predictor(self) -> Predictor:
        start = time.time()
        predictor = self._parser().get_parsed_content("predictor")
        if not callable(getattr(predictor, "predict", None)):
            raise TypeError(f"{self.config_path}: 'predictor' has no predict(images, roi, fields) method")
        self.inputs = getattr(predictor, "inputs", self.inputs)
        warm_up = getattr(predictor, "warm_up", None)
        if callable(warm_up):  # here, at model load, rather than in the user's first click
            warm_up()
        labels = getattr(predictor, "label_names", None)
        if labels:
            self.labels = list(labels) if not isinstance(labels, dict) else dict(labels)
        logger.info(
            "%s: predictor %s ready on %s in %.1fs",
            self.name,
            type(predictor).__name__,
            self.device,
            time.time() - start,
        )
        return predictor

    def _try_predictor(self) -> Predictor | None:
        """For ``/info``: a bundle that cannot load is listed with the reason instead of breaking ``/info``."""
        try:
            return self.predictor
        except InvalidRequest:
            return None

    # -- MONAI Label interface -----------------------------------------------------------------------
    def is_valid(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> dict[str, Any]:
        predictor = self._try_predictor()
        if predictor is None:
            return {}
        options = copy.deepcopy(dict(getattr(predictor, "config_options", {}) or {}))
        if self.inputs.dimension == 2:  # blank: the frame the clicks were placed on, else the sharpest
            options.setdefault(FRAME_OPTION, "")
        return options

    def info(self) -> dict[str, Any]:
        info = super().info()  # calls config(), which builds the predictor and fills self.labels
        info["labels"] = self.labels
        info["version"] = self.version
        info["task"] = self.metadata.get("task", "")
        if self._predictor is None and self._build_error:
            info["description"] = f"{self.description} [unavailable: {self._build_error}]"
        return info

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Run one prediction; ``request["image"]`` is a path, ``request["image_id"]`` the datastore id."""
        start = time.time()
        extension = label_extension(request)  # refused before any work
        compress = str(request.get("result_compress", True)).lower() not in ("false", "0")
        image_id = request.get("image_id")
        inputs = self.inputs
        primary = inputs.primary
        frame_options: dict[str, Any] = {}
        if self.inputs.dimension == 2:  # a client's [i, j, k] clicks: k is the frame of the cine
            request, frame = prompt_on_frame(request)
            if frame is not None:
                frame_options[FRAME_OPTION] = frame
        predictor = self.predictor
        options = getattr(predictor, "config_options", {}) or {}
        check_known_fields(request, self._known_fields(options), self.name)  # refused before any decoding
        # an upload or a session (no datastore id) is read for this request only, never cached
        image = self.image_cache.get(request["image"], primary.reader, cache=bool(image_id), **frame_options)
        sidecar = read_sidecar(self.sidecar_dir, image_id)
        images = {primary.name: image, **self._other_images(request, sidecar, image_id)}
        loaded = time.time()

        roi = None
        ignored = [] if inputs.prompt else [k for k in ("foreground", "roi") if request.get(k) not in (None, [], "", "[]")]
        if inputs.prompt:
            roi = parse_roi(request, tuple(image.shape[1:]),
                            lambda path: read_image(path, primary.reader, limits=self.image_cache.limits),
                            inputs.prompt)
        fields = merge_fields(request, sidecar, options, self.target_keys)
        prediction: Prediction = predictor.predict(images, roi, fields)
        predicted = time.time()

        label_file = None
        label = prediction.label
        if label is None and self.always_label:
            label = np.zeros(tuple(image.shape[1:]), np.uint8)
        if label is not None:
            label_file = write_label(label, image.affine.cpu().numpy(), tuple(image.shape[1:]), extension, compress)
        written = time.time()

        result = to_jsonable(dict(prediction.result))
        result.update(
            {
                "label_names": to_jsonable(dict(prediction.label_names)),
                "model": self.name,
                "model_version": self.version,
                "roi_center_ijk": [round(float(v), 2) for v in roi.center()] if roi is not None else None,
                "field_sources": field_sources(request, sidecar, options, self.target_keys, self._known_fields(options)),
                "latencies": {
                    "load": round(loaded - start, 3),
                    "predict": round(predicted - loaded, 3),
                    "write": round(written - predicted, 3),
                    "total": round(time.time() - start, 3),
                },
            }
        )
        destination = self._dicom_destination(request["image"], image_id) if prediction.label is not None else None
        if destination is not None:
            label = label_array(prediction.label, tuple(image.shape[1:]))
            click_slice = int(round(float(roi.center()[2]))) if roi is not None and label.ndim == 3 else 0
            if label.ndim == 2:  # a 2D model: the region lies on the frame it read
                meta = getattr(image, "meta", {}) or {}
                click_slice = int(meta.get("frame_index", 0))
                label = dicom_results.on_frame(label, click_slice, int(meta.get("num_frames", 1)))
            result["dicom"] = self._store_dicom(request["image"], label, click_slice, result, predictor, destination)
        # the predictor's own warnings (a truncated report, an ignored option) come first
        warnings = [*result.get("warnings", []), *contradictions(request, sidecar, self.target_keys)]
        if roi is not None and roi.mask is None and roi.box is None and len(roi.points) > 1:
            warnings.append(f"{len(roi.points)} clicks sent: the last one, {list(roi.points[-1])}, is the lesion")
        if warnings:
            result["warnings"] = warnings
        if ignored:  # a whole-image model: say so rather than answer as if the click had been used
            result["prompt_ignored"] = f"this model reads whole images; the {' and '.join(ignored)} sent was not used"
        self._persist(image_id, result)
        logger.info(
            "%s: prediction in %.2fs (load %.2fs)",
            self.name,
            result["latencies"]["total"],
            result["latencies"]["load"],
        )
        return label_file, result

    def _dicom_destination(self, image_path: str, image_id: str | None) -> str | Path | None:
        """Where a prediction on a DICOM study goes as SEG + SR: back to the PACS for a DICOMweb study (OHIF
        shows them from there), beside the study for a DICOM file in the local datastore
        (``<studies>/dicom_results/<image id>/``, a sub-folder, so the results are not listed as studies);
        None for a NIfTI/NRRD study, an upload or a session."""
        if self.datastore is None or not image_id:
            return None
        if hasattr(getattr(self.datastore, "_client", None), "store_instances"):
            return PACS if os.path.isdir(image_path) else None
        studies = getattr(self.datastore, "_datastore_path", None)
        if studies and image_path.lower().endswith(DICOM_FILE_SUFFIX) and os.path.isfile(image_path):
            return Path(studies) / DICOM_RESULTS_DIR / image_id
        return None

    def _store_dicom(self, source: str, label: np.ndarray, click_slice: int, result: dict[str, Any],
                     predictor: Predictor, destination: str | Path) -> dict[str, Any]:
        """Write the region as DICOM SEG and the result as a TID 1500 SR and store them at ``destination``;
        a failure is reported in the answer, never fails the prediction the clinician is waiting for."""
        score_key = getattr(predictor, "score_key", None) or next(
            (k for k in result if k.endswith("probability")), None)
        class_key = "prediction" if "prediction" in result else "class"
        try:
            if score_key is None or class_key not in result:
                raise InvalidRequest("the result has no probability and class to report")
            sources = dicom_results.source_instances(source)
            summary = next((n for n, v in (result.get("label_names") or {}).items() if v == 1), self.name)
            no_seg = dicom_results.segmentation_unsupported(sources)
            seg = None if no_seg else dicom_results.region_segmentation(label, sources, summary, self.name, self.version)
            sr = dicom_results.measurement_report(result, label, sources, seg, self.name, self.version,
                                                  score_key, class_key, click_slice)
            documents = {"seg": seg, "sr": sr} if seg is not None else {"sr": sr}
            stored = {"seg_sop_instance_uid": None if seg is None else str(seg.SOPInstanceUID),
                      "sr_sop_instance_uid": str(sr.SOPInstanceUID), "study_instance_uid": str(sr.StudyInstanceUID),
                      **({"seg_not_written": no_seg} if no_seg else {})}
            if destination == PACS:
                self.datastore._client.store_instances(datasets=list(documents.values()))
            else:
                stored["files"] = self._write_beside(Path(destination), documents)
        except Exception as e:  # noqa: BLE001 - reported to the client, logged without patient data
            logger.warning("%s: SEG/SR not stored (%s)", self.name, type(e).__name__)
            return {"stored": False, "reason": _ABSOLUTE_FOLDERS.sub("", f"{type(e).__name__}: {e}")[:300]}
        return {"stored": True, **stored}

    def _write_beside(self, folder: Path, datasets: dict[str, Dataset]) -> list[str]:
        """``<folder>/<model>_<kind>.dcm``, each written atomically (this model's latest prediction replaces
        its previous one); returns the paths relative to the studies folder."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for kind, dataset in datasets.items():
            path = folder / f"{self.name}_{kind}.dcm"
            buffer = io.BytesIO()
            dataset.save_as(buffer)
            atomic_write_bytes(path, buffer.getvalue())
            written.append(f"{DICOM_RESULTS_DIR}/{folder.name}/{path.name}")
        return written

    def _known_fields(self, options: dict[str, Any]) -> set[str]:
        """Parameter names this model reads: its options, declared texts and clinical fields."""
        declared = self.inputs.fields.names if self.inputs.fields is not None else ()
        frame = (FRAME_OPTION,) if self.inputs.dimension == 2 else ()
        return {*options, *self.inputs.texts, *declared, *frame}

    def _other_images(self, request: dict[str, Any], sidecar: dict[str, Any], image_id: str | None
                      ) -> dict[str, Any]:
        """The non-primary image inputs: datastore ids from the request's ``images``, else the sidecar's,
        else (an input with a ``saved_label`` tag) the study's saved label of that tag."""
        requested = decode_param(request.get("images"), "images") or {}
        recorded = sidecar.get("images") or {}
        if not isinstance(requested, dict) or not isinstance(recorded, dict):
            raise InvalidRequest("'images' must map input names to image ids, e.g. {\"slide\": \"patient7_he\"}")
        known = {spec.name for spec in self.inputs.images[1:]}
        unknown = sorted(set(requested) - known)
        if unknown:
            raise InvalidRequest(f"'images' names unknown input(s) {unknown}; this model reads {sorted(known) or 'no other image'}")
        images: dict[str, Any] = {}
        for spec in self.inputs.images[1:]:
            ref = requested.get(spec.name) or recorded.get(spec.name)
            if ref:
                images[spec.name] = self.image_cache.get(self._resolve(str(ref), spec.name), spec.reader)
            else:
                saved = self._saved_label(image_id, spec.saved_label)
                images[spec.name] = None if saved is None else self.image_cache.get(saved, spec.reader)
        return images

    def _saved_label(self, image_id: str | None, tag: str | None) -> str | None:
        """The file of the study's label of ``tag``, None without one (or without a datastore)."""
        if not tag or not image_id or self.datastore is None:
            return None
        label_id = (self.datastore.get_labels_by_image_id(image_id) or {}).get(tag)
        return (self.datastore.get_label_uri(label_id, tag) or None) if label_id else None

    def _resolve(self, ref: str, input_name: str) -> str:
        """A datastore id -> its file; without a datastore (the command line) the reference is a path."""
        if self.datastore is None:
            return ref
        check_identifier(ref, f"image for input '{input_name}'")
        uri = self.datastore.get_image_uri(ref)
        if not uri:
            raise InvalidRequest(f"image '{ref}' for input '{input_name}' is not in the datastore", 404)
        return uri

    def _persist(self, image_id: str | None, result: dict[str, Any]) -> None:
        """Keep every prediction's JSON on its study (stock MONAI Label saves only label files).

        Read, merge, write: other models' predictions and any other image info stay intact.
        """
        if self.datastore is None or not image_id or not self.datastore.get_image_uri(image_id):
            return
        record = {**result, "ts": int(time.time())}
        try:
            with _DATASTORE_LOCK:
                stored = self.datastore.get_image_info(image_id).get(PREDICTIONS_KEY) or {}
                stored = {**stored, self.name: record}
                self.datastore.update_image_info(image_id, {PREDICTIONS_KEY: stored})
        except Exception:
            # the clinician still gets the answer; a read-only or remote datastore must not block it
            logger.exception("%s: could not store the prediction in the datastore", self.name)
