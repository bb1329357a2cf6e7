"""The contract between a bundle's inference config and the MONAI Label app.

A bundle's ``configs/inference.json`` defines a ``predictor`` object. The app knows nothing about
the bundle beyond this contract, so a new model is served by writing a predictor, not app code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


class InvalidRequest(ValueError):
    """A request the user can fix (bad point, missing field...). The server answers it with HTTP 4xx."""

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code


@dataclass
class Roi:
    """Where the lesion is, in voxel (IJK) indices of the image as loaded (no reorientation).

    Exactly one of the three is used, in this order of preference: ``mask``, ``box``, ``points``.
    """

    points: list[tuple[float, float, float]] = field(default_factory=list)
    box: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    mask: np.ndarray | None = None

    def center_ijk(self) -> np.ndarray:
        """The lesion centre in voxel coordinates: mask centroid, box centre, or mean of the clicks."""
        if self.mask is not None:
            idx = np.argwhere(self.mask > 0)
            if idx.size == 0:
                raise InvalidRequest("ROI label mask is empty: draw the lesion or send a foreground point")
            return idx.mean(axis=0)
        if self.box is not None:
            return (np.asarray(self.box[0], float) + np.asarray(self.box[1], float)) / 2.0
        if self.points:
            return np.asarray(self.points, float).mean(axis=0)
        raise InvalidRequest("no lesion given: send a 'foreground' point, an 'roi' box or a label mask")


@dataclass
class Prediction:
    """What a predictor returns: JSON for the client and, optionally, a label volume to draw."""

    result: dict[str, Any]
    label: np.ndarray | None = None
    label_names: dict[str, int] = field(default_factory=dict)


class Predictor(Protocol):
    """Implemented once per model family (e.g. the nine-view CLIP classifier)."""

    #: typed options shown in ``/info`` (Slicer shows them as an editable table), name -> default
    config_options: dict[str, Any]

    def predict(self, image: torch.Tensor, roi: Roi, fields: dict[str, Any]) -> Prediction:
        """``image``: MONAI ``MetaTensor`` (1, I, J, K) with its affine; ``fields``: request params."""
        ...
