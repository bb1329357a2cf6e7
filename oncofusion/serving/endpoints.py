"""The app's own answers for the MONAI Label routes it uses, placed ahead of the stock ones.

Stock ``/infer`` ran inference inside the event loop (``/info`` waited up to 15 s behind 32 clicks),
let ``params`` override the image and read any server path as a study or mask, answered 500 to
``params`` that were not a JSON object, logged every parameter, and left uploads in the temp folder when
a request failed. The datastore routes joined unchecked ids onto paths and returned absolute server
paths. These routes keep the stock request and response formats (the 0.8.5 client, 3D Slicer and OHIF
read them unchanged) and change only those behaviours.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import nibabel as nib
import nrrd
from fastapi import APIRouter, BackgroundTasks, HTTPException, Request
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.interfaces.utils.app import app_instance
from starlette.datastructures import UploadFile

from oncofusion.contract import InvalidRequest
from oncofusion.io.readers import is_nifti, read_volume
from oncofusion.serving.forms import check_text_sizes, json_object, read_form
from oncofusion.serving.identifiers import check_identifier

#: request keys only the server sets: a client naming them in ``params`` would redirect the request
SERVER_KEYS = ("image", "image_id", "image_upload", "session", "file", "model_file")
#: datastore image info the models write; a client may not forge it
PROTECTED_INFO_KEYS = ("oncofusion_predictions",)


@dataclass(frozen=True)
class EndpointLimits:
    """``infer_workers``: inferences run at once, off the event loop. ``max_field_bytes``: largest form
    field (``params``). ``max_text_chars``: largest text value inside ``params`` (a report)."""

    infer_workers: int = 1
    max_field_bytes: int = 256 * 1024
    max_text_chars: int = 20_000


def _http(error: InvalidRequest) -> HTTPException:
    return HTTPException(status_code=error.status_code, detail=str(error))


def scrub_paths(value: Any) -> Any:
    """Replace every absolute server path in a JSON answer by its file name."""
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(value.rstrip("/"))
    return value


_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,8}){1,2}$")


@contextlib.contextmanager
def saved_upload(upload: UploadFile, default_suffix: str = ".nii.gz") -> Iterator[str]:
    """Copy an uploaded file to a private temp file (suffix kept for the readers); removed on every path."""
    match = _SUFFIX.search(Path(upload.filename or "").name)
    fd, path = tempfile.mkstemp(suffix=match.group(0) if match else default_suffix, prefix="oncofusion_upload_")
    try:
        with os.fdopen(fd, "wb") as out:
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _read_form(request: Request, max_field_bytes: int) -> Any:
    try:
        return await read_form(request, max_field_bytes)
    except InvalidRequest as e:
        raise _http(e) from e


def _study_shape(image_uri: str) -> tuple[int, ...] | None:
    """The study's voxel grid from its header (NIfTI, NRRD); None for other kinds (not checked)."""
    if is_nifti(image_uri):
        return tuple(int(n) for n in nib.load(image_uri).shape[:3])
    if image_uri.lower().endswith(".nrrd"):
        return tuple(int(n) for n in nrrd.read_header(image_uri)["sizes"][:3])
    return None


def check_label_grid(label_path: str, image_uri: str) -> None:
    """A submitted label must be a readable volume on its study's grid: a label of another size was stored
    as it came and broke training later."""
    shape = _study_shape(image_uri)
    if shape is None:
        return
    label_shape = tuple(read_volume(label_path, "label").shape[1:])
    if label_shape != shape:
        raise InvalidRequest(f"the label is {'x'.join(map(str, label_shape))} but its study is "
                             f"{'x'.join(map(str, shape))}: send a label on the study's grid")


def _uploads(form: Any, names: tuple[str, ...]) -> dict[str, UploadFile]:
    unknown = sorted(set(form.keys()) - {"params", "info", *names})
    if unknown:
        raise InvalidRequest(f"unknown form field(s) {unknown}: send 'params' and the file(s) {list(names)}")
    return {name: form[name] for name in names if isinstance(form.get(name), UploadFile)}


def _infer_request(model: str, params: dict[str, Any]) -> dict[str, Any]:
    named = sorted(k for k in params if k in SERVER_KEYS)
    if named:
        raise InvalidRequest(f"'params' may not set {named}: name the image in the URL (?image=<id>) or upload it")
    if params.get("model") not in (None, "", model):
        raise InvalidRequest(f"'params.model' is '{params['model']}' but the URL asks for model '{model}'")
    if params.get("label_tag"):
        check_identifier(params["label_tag"], "'label_tag'")
    request = {k: v for k, v in params.items() if k != "model"}
    # the segment's *name* as Slicer sends it; only an uploaded file is a mask
    segment = request.pop("label", None)
    if isinstance(segment, str) and segment:
        request["label_name"] = segment
    return {**request, "model": model}


def _run_infer(model: str, image: str, session_id: str, params: dict[str, Any], uploads: dict[str, UploadFile],
               output: ResultType | None, background_tasks: BackgroundTasks) -> Any:
    instance = app_instance()
    request = _infer_request(model, params)
    with contextlib.ExitStack() as stack:
        if "file" in uploads:
            request["image_upload"] = stack.enter_context(saved_upload(uploads["file"]))
        elif session_id:
            session = instance.sessions().get_session(check_identifier(session_id, "'session_id'")) \
                if instance.sessions() else None
            if session is None:
                raise InvalidRequest(f"session '{session_id}' not found (expired?): upload the image again", 404)
            request["image_upload"] = session.image
        else:
            request["image"] = image
        if "label" in uploads:
            request["label"] = stack.enter_context(saved_upload(uploads["label"]))
        result = instance.infer(request)
        return send_response(instance.datastore(), result, output.value if output else None, background_tasks)


def build_router(limits: EndpointLimits) -> APIRouter:
    """Routes that replace their stock namesakes (the caller puts them first)."""
    router = APIRouter()
    state: dict[str, anyio.CapacityLimiter] = {}

    def limiter() -> anyio.CapacityLimiter:
        if "infer" not in state:  # created on the server's event loop
            state["infer"] = anyio.CapacityLimiter(limits.infer_workers)
        return state["infer"]

    @router.post("/infer/{model}", summary="Run a model on a study (image id, upload or session)")
    async def infer(request: Request, background_tasks: BackgroundTasks, model: str, image: str = "",
                    session_id: str = "", output: ResultType | None = None):
        form = await _read_form(request, limits.max_field_bytes)
        try:
            params = json_object(form.get("params"), "params")
            check_text_sizes(params, limits.max_text_chars)
            uploads = _uploads(form, ("file", "label"))
            if not (image or session_id or "file" in uploads):
                raise InvalidRequest("no image given: pass ?image=<image id>, a session_id or upload a 'file'")
            return await anyio.to_thread.run_sync(
                partial(_run_infer, model, image, session_id, params, uploads, output, background_tasks),
                limiter=limiter())
        except InvalidRequest as e:
            raise _http(e) from e
        finally:
            await form.close()

    @router.get("/datastore/image/info", summary="Image info (no server paths)")
    async def image_info(image: str):
        datastore = app_instance().datastore()
        if not datastore.get_image_uri(image):
            raise HTTPException(404, f"image '{image}' is not in the datastore")
        return scrub_paths(datastore.get_image_info(image))

    @router.put("/datastore/image/info", summary="Update image info (models' predictions are read-only)")
    async def put_image_info(request: Request, image: str):
        form = await _read_form(request, limits.max_field_bytes)
        try:
            info = json_object(form.get("info"), "info")
            forged = [k for k in PROTECTED_INFO_KEYS if k in info]
            if forged:
                raise InvalidRequest(f"{forged} are written by the models only", 403)
            datastore = app_instance().datastore()
            if not datastore.get_image_uri(image):
                raise InvalidRequest(f"image '{image}' is not in the datastore", 404)
            datastore.update_image_info(image, info)
            return {}
        except InvalidRequest as e:
            raise _http(e) from e
        finally:
            await form.close()

    @router.put("/datastore/label", summary="Save a finished label")
    async def save_label(request: Request, image: str, tag: str = "final"):
        form = await _read_form(request, limits.max_field_bytes)
        try:
            params = json_object(form.get("params"), "params")
            uploads = _uploads(form, ("label",))
            if "label" not in uploads:
                raise InvalidRequest("no 'label' file uploaded")
            instance = app_instance()
            if not instance.datastore().get_image_uri(image):
                raise InvalidRequest(f"image '{image}' is not in the datastore", 404)
            with saved_upload(uploads["label"]) as path:
                check_label_grid(path, instance.datastore().get_image_uri(image))
                label_id = instance.datastore().save_label(image, path, check_identifier(tag, "'tag'"), params)
            return {**(instance.on_save_label(image, label_id) or {}), "image": image, "label": label_id}
        except InvalidRequest as e:
            raise _http(e) from e
        finally:
            await form.close()

    @router.put("/datastore/image", summary="Add a study")
    async def add_image(request: Request, image: str = ""):
        form = await _read_form(request, limits.max_field_bytes)
        try:
            params = json_object(form.get("params"), "params")
            uploads = _uploads(form, ("file",))
            if "file" not in uploads:
                raise InvalidRequest("no 'file' uploaded")
            name = Path(uploads["file"].filename or "").name
            image_id = check_identifier(image or _SUFFIX.sub("", name), "'image'")
            with saved_upload(uploads["file"]) as path:
                return {"image": app_instance().datastore().add_image(image_id, path, params)}
        except InvalidRequest as e:
            raise _http(e) from e
        finally:
            await form.close()

    @router.get("/datastore/", summary="Datastore listing (no server paths)")
    async def listing(output: str = "stats"):
        datastore = app_instance().datastore()
        answers = {"stats": datastore.status, "all": datastore.json, "train": datastore.datalist}
        if output not in answers:
            raise HTTPException(400, f"output must be one of {sorted(answers)}")
        return scrub_paths(answers[output]())

    @router.post("/activelearning/{strategy}", summary="Next study to read (no server paths)")
    async def next_sample(strategy: str, params: dict[str, Any] | None = None):
        from monailabel.endpoints.activelearning import sample

        return scrub_paths(sample(check_identifier(strategy, "'strategy'"), params))

    return router
