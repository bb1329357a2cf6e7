"""What every bundle and the server agree on: named inputs, the prompt, the prediction.

A bundle's ``configs/inference.json`` declares its ``inputs`` (:class:`InputSpec`) and defines a
``predictor`` (:class:`Predictor`). The server knows nothing else about a model: it reads each declared
image with the declared reader, turns the user's clicks, box or mask into a :class:`Roi` of the
primary image's dimension, merges the request's fields with the study's sidecar, and calls
``predictor.predict``. A new model is served by writing a predictor and a config, not server code.

This module imports nothing else of the package, so every layer may depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

#: reader kinds an image input may declare, with the spatial dimension each one yields
READER_DIMS: dict[str, int] = {"volume": 3, "frame": 2, "slide": 2}

#: how a user may point at the lesion: clicks, a box, a mask; ``background``: negative clicks (only a model
#: that uses them declares it, for the others they are refused rather than ignored)
PROMPT_KINDS = ("points", "box", "mask", "background")


class InvalidRequest(ValueError):
    """A request the user can fix (bad point, missing field...). The server answers it with HTTP 4xx."""

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class ImageInput:
    """One named image a model reads, e.g. ``ct`` (a 3D volume) or ``slide`` (a whole-slide image).

    ``reader`` names the reader kind (:data:`READER_DIMS`): ``volume`` (NIfTI, NRRD, DICOM series),
    ``frame`` (2D ultrasound DICOM, PNG/JPEG) or ``slide`` (whole-slide image, opened lazily).
    ``saved_label`` names a label tag of the served study (e.g. ``"final"``, what 3D Slicer's "Submit
    Label" and OHIF save): when neither the request nor the study's sidecar names this input, the
    study's label of that tag is read, so that what a user drew and saved is what the model reads.
    """

    name: str = "image"
    reader: str = "volume"
    required: bool = True
    description: str = ""
    saved_label: str | None = None

    def __post_init__(self) -> None:
        if self.reader not in READER_DIMS:
            raise ValueError(f"image input '{self.name}': reader '{self.reader}' is not one of {sorted(READER_DIMS)}")
        if self.saved_label is not None and (self.required or not str(self.saved_label).strip()):
            raise ValueError(f"image input '{self.name}': a saved label ({self.saved_label!r}) is a non-empty tag "
                             "of an optional input (a study may have none)")

    @property
    def spatial_dims(self) -> int:
        return READER_DIMS[self.reader]


@dataclass(frozen=True)
class InputSpec:
    """Everything a model reads, declared once in its bundle.

    ``images``: the image inputs, the first one is the *primary* image, on which the user clicks and on
    whose grid a label is drawn. ``prompt``: the prompt kinds accepted (a subset of
    :data:`PROMPT_KINDS`), empty for a model that reads whole images. ``texts``: names of free-text
    fields (e.g. a report). ``fields``: an object with ``names``, ``validate(values)`` and
    ``config_options()`` (e.g. :class:`~oncofusion.data.clinical.ClinicalSchema`), or None.
    """

    images: Sequence[ImageInput] = (ImageInput(),)
    prompt: Sequence[str] = PROMPT_KINDS
    texts: Sequence[str] = ()
    fields: Any = None

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("a model needs at least one image input")
        names = [image.name for image in self.images]
        if len(set(names)) != len(names):
            raise ValueError(f"image input names must be unique, got {names}")
        unknown = [kind for kind in self.prompt if kind not in PROMPT_KINDS]
        if unknown:
            raise ValueError(f"unknown prompt kind(s) {unknown}: use {list(PROMPT_KINDS)}")

    @property
    def primary(self) -> ImageInput:
        return self.images[0]

    @property
    def dimension(self) -> int:
        """Spatial dimension of the primary image: what MONAI Label reports as the model's dimension."""
        return self.primary.spatial_dims

    def image(self, name: str) -> ImageInput:
        for image in self.images:
            if image.name == name:
                return image
        raise KeyError(f"no image input '{name}' (have {[i.name for i in self.images]})")


Point = tuple[float, ...]


@dataclass
class Roi:
    """Where the lesion is, in voxel/pixel indices of the primary image as loaded (no reorientation).

    Indices have the image's spatial dimension: (i, j, k) on a volume, (i, j) on a 2D frame. Exactly one
    of ``mask``, ``box``, ``points`` locates the lesion, in this order of preference; ``background``
    holds negative clicks for models that use them.

    Of several clicks the **last** is the lesion: 3D Slicer and OHIF send every click placed on the
    segment so far, and the latest is the one the user just made (two clicks on two lesions must not be
    averaged to a point between them).
    """

    points: list[Point] = field(default_factory=list)
    box: tuple[Point, Point] | None = None
    mask: np.ndarray | None = None
    background: list[Point] = field(default_factory=list)

    @property
    def spatial_dims(self) -> int | None:
        if self.mask is not None:
            return int(self.mask.ndim)
        if self.box is not None:
            return len(self.box[0])
        if self.points:
            return len(self.points[0])
        return None

    def center(self) -> np.ndarray:
        """The lesion centre in index coordinates: mask centroid, box centre, or the last click."""
        if self.mask is not None:
            idx = np.argwhere(self.mask > 0)
            if idx.size == 0:
                raise InvalidRequest("ROI label mask is empty: draw the lesion or send a foreground point")
            return idx.mean(axis=0)
        if self.box is not None:
            return (np.asarray(self.box[0], float) + np.asarray(self.box[1], float)) / 2.0
        if self.points:
            return np.asarray(self.points[-1], float)
        raise InvalidRequest("no lesion given: send a 'foreground' point, an 'roi' box or a label mask")


@dataclass
class Prediction:
    """What a predictor returns: JSON for the client and, optionally, a label on the primary image grid."""

    result: dict[str, Any]
    label: np.ndarray | None = None
    label_names: dict[str, int] = field(default_factory=dict)


class Predictor(Protocol):
    """Implemented once per model family (see :class:`oncofusion.predictor.PredictorTemplate`)."""

    #: the inputs the model reads; the server takes its dimension and readers from here
    inputs: InputSpec
    #: typed options shown in ``/info`` (Slicer shows them as an editable table), name -> default
    config_options: dict[str, Any]

    def predict(self, images: Mapping[str, Any], roi: Roi, fields: Mapping[str, Any]) -> Prediction:
        """``images``: input name -> decoded image (a MONAI ``MetaTensor`` (C, *spatial) with its affine,
        or a lazily opened slide); ``fields``: text and clinical values merged from request and sidecar."""
        ...
