"""From a thyroid ultrasound frame and its nodule ROI to LLNM-Net's inputs, the same way in training and
at inference.

``configs/train.json`` composes them after reading the frame; the predictor runs the config's
``preprocessing`` (the same transforms) on the frame the server read and the ROI the user drew, so the
network sees the same crop and the same scalar values from both:

- :class:`NoduleRoid`: a record's ROI (an inclusive box ``[[i0, j0], [i1, j1]]`` or a mask file) as a
  boolean ``(W, H)`` mask on the frame grid (training; the predictor builds it from the user's prompt);
- :class:`NoduleScalarsd`: the values of the network's scalar tokens: nodule morphology measured on the
  frame (:mod:`~oncofusion.models.thyroid_llnm.morphology`) and clinical fields, NaN where missing;
- :class:`NoduleCropd` / :class:`RandNoduleCropd`: the square crop around the ROI's bounding box with a
  margin in mm, resampled to the network's image size, 3 channels.

Two training helpers sit beside them: :func:`memoize_frozen_text_encoder` (the frozen report encoder
runs once per report, as the authors precompute their report embeddings) and
:class:`HalfPrecisionWeights` (fold checkpoints stored in float16).

Axes are :func:`~oncofusion.io.frames.read_frame`'s: a frame is ``(C, W, H)``, spatial axis 0 the column
``x`` (across the beam), axis 1 the row ``y`` (depth); a crop keeps that orientation.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage
from torch import nn

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.data.clinical import BooleanField, CategoricalField, ClinicalSchema, NumericField
from oncofusion.io.readers import read_image
from oncofusion.models.thyroid_llnm.morphology import (
    DEFAULT_RING_MM,
    aspect_ratio,
    capsule_distance_mm,
    echogenicity_contrast,
    frame_spacing_mm,
    lobe_position,
    luminance,
    nodule_extent_mm,
    roi_mask,
)
from oncofusion.networks.trainable import TrainableWeights

#: scalars measured on the frame from the ROI (mm, ratios, 0-255 intensity units)
MORPHOLOGY_SCALARS = ("aspect_ratio", "echogenicity_contrast", "width_mm", "depth_mm")
#: scalars measured from the ROI and a thyroid lobe mask; missing (NaN) without one
LOBE_SCALARS = ("capsule_distance_mm", "lobe_position")
#: the data key that may carry a pixel size given by the user for a frame without calibration
SPACING_KEY = "spacing_mm"


def uncalibrated(needed_for: str) -> InvalidRequest:
    """The 422 for a frame without pixel size when ``needed_for`` is in mm, naming the fixes."""
    return InvalidRequest(
        f"{needed_for}: measured in mm, but the frame has no pixel calibration (no SequenceOfUltrasoundRegions in cm and "
        "no PixelSpacing; PNG/JPEG exports never carry one): send the DICOM from the scanner, or give the pixel "
        "size as pixel_size_mm (e.g. 0.1 or 0.1,0.12 for x,y)",
        422,
    )


def data_spacing(data: Mapping[Hashable, Any], image: Any, needed_for: str, spacing_key: str = SPACING_KEY
                 ) -> tuple[float, float]:
    """The ``(x, y)`` pixel size in mm: ``data[spacing_key]`` when given, else the frame's calibration."""
    given = data.get(spacing_key)
    spacing = frame_spacing_mm(image) if given is None else tuple(float(v) for v in given)
    if spacing is None:
        raise uncalibrated(needed_for)
    if len(spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InvalidRequest(f"pixel size must be two positive numbers of mm (x, y), got {spacing!r}", 422)
    return float(spacing[0]), float(spacing[1])


def _mask_array(value: Any) -> np.ndarray:
    array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _any_channel(value: Any) -> np.ndarray:
    """A mask read as an image ``(C, W, H)`` (a PNG, a DICOM) -> ``(W, H)``: any channel above 0 is inside."""
    array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    return (array > 0).any(axis=0) if array.ndim == 3 else array > 0


# -- the ROI -----------------------------------------------------------------------------------------
class NoduleRoid(MapTransform):
    """A record's nodule ROI under ``keys`` -> boolean ``(W, H)`` mask on the frame under ``output_key``.

    ``kind="box"``: an inclusive pixel box ``[[i0, j0], [i1, j1]]`` (the sample sidecars' ``roi``);
    ``kind="mask"``: a mask file (PNG/DICOM, read onto the frame grid as the server reads a label) or array.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", output_key: str = "roi_mask",
                 kind: str = "box"):
        super().__init__(keys)
        if kind not in ("box", "mask"):
            raise ValueError(f"kind must be 'box' or 'mask', got {kind!r}")
        self.image_key = image_key
        self.output_key = output_key
        self.kind = kind

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = tuple(int(s) for s in d[self.image_key].shape[1:])
        for key in self.key_iterator(d):
            value = d[key]
            if self.kind == "box":
                lo, hi = (tuple(float(v) for v in corner) for corner in value)
                d[self.output_key] = roi_mask(Roi(box=(lo, hi)), shape, None)
            else:
                array = read_image(value, "frame", what="nodule mask") if isinstance(value, str) else value
                d[self.output_key] = roi_mask(Roi(mask=_mask_array(array)), shape, None)
        return d


# -- the scalar tokens -------------------------------------------------------------------------------
def field_scalar(field: Any, value: Any) -> float:
    """A validated clinical value as one scalar token value: a number as is, yes/no as 1/0, a two-choice
    category as the index of its choice (sex: female 0, male 1); NaN when missing."""
    if value is None:
        return math.nan
    if isinstance(field, NumericField):
        return float(value)
    if isinstance(field, BooleanField):
        return 1.0 if value else 0.0
    return float(field.values.index(value))


class NoduleScalarsd(MapTransform):
    """The frame under ``keys`` and the ROI mask under ``roi_key`` (+ the record's clinical values) ->
    ``(S,)`` float32 under ``output_key``, column ``s`` being ``scalar_names[s]``, NaN where missing.

    Morphology scalars (:data:`MORPHOLOGY_SCALARS`) are measured on the frame inside the ROI; the lobe
    scalars (:data:`LOBE_SCALARS`: the distance from the ROI to the lobe's capsule, the paper's strongest
    sonographic finding, and the ROI's position along the lobe, 0 cranial .. 1 caudal, ``cranial`` being
    the image side of the upper pole) need the thyroid lobe mask under ``lobe_key`` and are NaN (the
    token's "missing" embedding) without one. Each other name must be a field of ``schema`` (numeric,
    yes/no, or a category of two choices), validated from the record (a bad value is an
    :class:`~oncofusion.contract.InvalidRequest` naming it). The measurements are also kept, as plain
    numbers (None when not measured), under ``morphology_key``.
    """

    def __init__(self, keys: KeysCollection, scalar_names: Sequence[str], schema: ClinicalSchema | None = None,
                 roi_key: str = "roi_mask", ring_mm: float = DEFAULT_RING_MM, spacing_key: str = SPACING_KEY,
                 output_key: str = "scalars", morphology_key: str = "nodule_morphology",
                 lobe_key: str = "lobe_mask", cranial: str = "left"):
        super().__init__(keys)
        self.scalar_names = tuple(scalar_names)
        self.schema = schema or ClinicalSchema([])
        for name in self.scalar_names:
            if name in MORPHOLOGY_SCALARS or name in LOBE_SCALARS:
                continue
            if name not in self.schema.names:
                raise ValueError(f"scalar '{name}' is neither a morphology scalar "
                                 f"{list(MORPHOLOGY_SCALARS + LOBE_SCALARS)} nor a "
                                 f"clinical field {self.schema.names}")
            field = self.schema.field(name)
            if isinstance(field, CategoricalField) and len(field.values) != 2:
                raise ValueError(f"scalar '{name}' is a category of {len(field.values)} choices: one scalar token "
                                 "holds a number, a yes/no or one of two choices")
        self.roi_key = roi_key
        self.ring_mm = float(ring_mm)
        self.spacing_key = spacing_key
        self.output_key = output_key
        self.morphology_key = morphology_key
        self.lobe_key = lobe_key
        self.cranial = cranial

    def morphology(self, image: Any, region: np.ndarray, spacing: tuple[float, float],
                   lobe: Any = None) -> dict[str, float | None]:
        width, depth = nodule_extent_mm(region, spacing)
        measured: dict[str, float | None] = {
            "aspect_ratio": aspect_ratio(region, spacing),
            "echogenicity_contrast": echogenicity_contrast(luminance(image), region, spacing, self.ring_mm),
            "width_mm": width,
            "depth_mm": depth,
            "capsule_distance_mm": None,
            "lobe_position": None,
        }
        if lobe is not None:
            lobe = _any_channel(lobe)
            measured["capsule_distance_mm"] = capsule_distance_mm(region, lobe, spacing)
            measured["lobe_position"] = lobe_position(region, lobe, spacing, self.cranial)
        return measured

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        clinical = self.schema.validate(d)
        for key in self.key_iterator(d):
            image = d[key]
            region = _mask_array(d[self.roi_key]).astype(bool)
            spacing = data_spacing(d, image, "the nodule morphology (size, echogenicity ring)", self.spacing_key)
            measured = self.morphology(image, region, spacing, d.get(self.lobe_key))
            values = [(math.nan if measured[n] is None else measured[n]) if n in measured
                      else field_scalar(self.schema.field(n), clinical[n]) for n in self.scalar_names]
            d[self.output_key] = np.asarray(values, dtype=np.float32)
            d[self.morphology_key] = measured
        return d


class RandMissingScalarsd(RandomizableTransform, MapTransform):
    """Training only: each group of scalar columns becomes NaN (missing) together with probability ``prob``.

    A scalar token takes a learned "missing" embedding when its value is unknown, but the embedding only
    learns from cases that lack the value; the sample data lack none. ``groups`` name the columns that go
    missing together (the capsule distance and the lobe position both come from one lobe mask).
    """

    def __init__(self, keys: KeysCollection, scalar_names: Sequence[str], groups: Sequence[Sequence[str]],
                 prob: float = 0.2):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        names = list(scalar_names)
        unknown = sorted({n for group in groups for n in group} - set(names))
        if unknown:
            raise ValueError(f"groups name {unknown}, which are not scalars {names}")
        self.columns = [[names.index(n) for n in group] for group in groups]
        self._missing: list[bool] = []

    def randomize(self, data: Any = None) -> None:
        self._missing = [self.R.random_sample() < self.prob for _ in self.columns]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            values = np.array(d[key], dtype=np.float32, copy=True)
            for columns, missing in zip(self.columns, self._missing, strict=True):
                if missing:
                    values[columns] = np.nan
            d[key] = values
        return d


# -- the crop ----------------------------------------------------------------------------------------
def crop_geometry(region: np.ndarray, spacing: Sequence[float], margin_mm: float, size: int,
                  shift_mm: Sequence[float] = (0.0, 0.0), zoom: float = 1.0) -> tuple[np.ndarray, float]:
    """The 3x3 map from crop pixel ``(u, v)`` to frame pixel ``(i, j)`` and the crop's side in mm.

    The crop is square in mm, centred on the ROI's bounding box (moved by ``shift_mm``), its side the
    box's longer side plus ``margin_mm`` on each end (times ``zoom``), cut into ``size`` x ``size`` pixels.
    """
    points = np.argwhere(region)
    if points.size == 0:
        raise InvalidRequest("the nodule ROI is empty: draw the nodule or send a box")
    spacing = np.asarray(spacing, float)
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre = (lo + hi) / 2.0 + np.asarray(shift_mm, float) / spacing
    side_mm = (float(((hi - lo + 1) * spacing).max()) + 2.0 * float(margin_mm)) * float(zoom)
    step = side_mm / spacing / size  # frame pixels per crop pixel
    origin = centre - side_mm / spacing / 2.0 + step / 2.0  # frame position of crop pixel 0's centre
    return np.array([[step[0], 0.0, origin[0]], [0.0, step[1], origin[1]], [0.0, 0.0, 1.0]]), side_mm


def sample_crop(channels: np.ndarray, to_frame: np.ndarray, size: int) -> np.ndarray:
    """``(C, W, H)`` frame values at the crop's pixels (bilinear, 0 outside the frame), ``(C, size, size)``.

    A crop coarser than the frame is low-pass filtered first (Gaussian, sigma half the step beyond 1), so
    a large nodule on a fine frame is not aliased.
    """
    step = np.diag(to_frame)[:2]
    grid = np.arange(size, dtype=np.float64)
    coords = [to_frame[a, 2] + grid * step[a] for a in (0, 1)]
    # the part of the frame the crop reads, with room for the filter
    reach = 3.0 * np.maximum(step, 1.0)
    lo = [max(int(math.floor(c[0] - r)), 0) for c, r in zip(coords, reach, strict=True)]
    hi = [min(int(math.ceil(c[-1] + r)) + 1, n) for c, r, n in zip(coords, reach, channels.shape[1:], strict=True)]
    out = np.zeros((channels.shape[0], size, size), np.float32)
    if hi[0] <= lo[0] or hi[1] <= lo[1]:
        return out
    window = channels[:, lo[0]:hi[0], lo[1]:hi[1]].astype(np.float32)
    sigma = [0.5 * math.sqrt(s * s - 1.0) if s > 1.0 else 0.0 for s in step]
    u, v = np.meshgrid(coords[0] - lo[0], coords[1] - lo[1], indexing="ij")
    for c in range(window.shape[0]):
        plane = ndimage.gaussian_filter(window[c], sigma, mode="nearest") if max(sigma) > 0 else window[c]
        out[c] = ndimage.map_coordinates(plane, [u, v], order=1, mode="constant", cval=0.0)
    return out


def to_channels(values: np.ndarray, channels: int) -> np.ndarray:
    """Grey replicated to 3 channels, RGB kept (alpha dropped), or luminance for ``channels=1``."""
    if channels == 1:
        return luminance(values)[None].astype(np.float32)
    if values.shape[0] == 1:
        return np.repeat(values, 3, axis=0)
    return values[:3]


class NoduleCropd(MapTransform):
    """The frame under ``keys`` -> the square nodule crop ``(channels, size, size)`` (see
    :func:`crop_geometry`), a ``MetaTensor`` whose affine maps crop pixels to the frame's world (its
    affine composed with the crop's); the crop's side in mm goes under ``side_key``.

    Values keep the frame's range (0-255 for ultrasound); intensity normalisation is the config's.
    """

    def __init__(self, keys: KeysCollection, roi_key: str = "roi_mask", margin_mm: float = 4.0, size: int = 128,
                 channels: int = 3, spacing_key: str = SPACING_KEY, side_key: str = "crop_side_mm"):
        super().__init__(keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not margin_mm >= 0:
            raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
        self.roi_key = roi_key
        self.margin_mm = float(margin_mm)
        self.size = int(size)
        self.channels = channels
        self.spacing_key = spacing_key
        self.side_key = side_key

    def jitter(self) -> tuple[tuple[float, float], float]:
        """Shift (mm) and zoom of this call's crop: none here, random in :class:`RandNoduleCropd`."""
        return (0.0, 0.0), 1.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shift, zoom = self.jitter()
        for key in self.key_iterator(d):
            image = d[key]
            region = _mask_array(d[self.roi_key]).astype(bool)
            spacing = data_spacing(d, image, f"the crop margin ({self.margin_mm:g} mm)", self.spacing_key)
            to_frame, side_mm = crop_geometry(region, spacing, self.margin_mm, self.size, shift, zoom)
            values = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, np.float32)
            crop = to_channels(sample_crop(values, to_frame, self.size), self.channels)
            frame_affine = np.asarray(getattr(image, "affine", np.eye(3)), np.float64)
            meta = dict(getattr(image, "meta", {}) or {})
            meta.pop("affine", None)
            meta["spatial_shape"] = (self.size, self.size)
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(crop)),
                                affine=torch.from_numpy(frame_affine @ to_frame), meta=meta)
            d[self.side_key] = side_mm
        return d


class RandNoduleCropd(RandomizableTransform, NoduleCropd):
    """:class:`NoduleCropd` with, for training, the centre moved up to ``max_shift_mm`` along each axis and
    the side scaled by a factor drawn from ``zoom_range`` (the box a user draws is never the same twice)."""

    def __init__(self, keys: KeysCollection, roi_key: str = "roi_mask", margin_mm: float = 4.0, size: int = 128,
                 channels: int = 3, spacing_key: str = SPACING_KEY, side_key: str = "crop_side_mm",
                 max_shift_mm: float = 1.0, zoom_range: Sequence[float] = (0.9, 1.1), prob: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        NoduleCropd.__init__(self, keys, roi_key, margin_mm, size, channels, spacing_key, side_key)
        self.max_shift_mm = float(max_shift_mm)
        self.zoom_range = (float(zoom_range[0]), float(zoom_range[1]))

    def jitter(self) -> tuple[tuple[float, float], float]:
        self.randomize(None)
        if not self._do_transform:
            return (0.0, 0.0), 1.0
        shift = self.R.uniform(-self.max_shift_mm, self.max_shift_mm, 2)
        return (float(shift[0]), float(shift[1])), float(self.R.uniform(*self.zoom_range))


# -- training helpers --------------------------------------------------------------------------------
def memoize_frozen_text_encoder(network: nn.Module) -> nn.Module:
    """Let a network's frozen report encoder run once per distinct report; returns ``network``.

    LLNM-Net's default text encoder is frozen (the authors feed precomputed BERT report embeddings), so
    its token features are a fixed function of the report. Training runs the same reports every epoch;
    this remembers each report's features (keyed by its token ids) and runs the encoder only for reports
    it has not seen, which makes a CPU epoch several times faster. The features of padding positions are
    zeros here (they are masked everywhere in the network). Nothing changes in the network's weights or
    state dict. A trainable encoder (LoRA, full) is refused: its features change as it trains.
    """
    tower = getattr(network, "text_tower", None)
    if tower is None:
        return network
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("the text encoder trains (tuning is not 'frozen'): its features cannot be memoised")
    encoder = tower.encoder
    original = encoder.forward
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        if input_ids is None or kwargs or encoder.training:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        lengths = [int(n) for n in mask.sum(dim=1)]
        if not all(bool(mask[i, :n].all()) for i, n in enumerate(lengths)):  # not right-padded: no memo
            return original(input_ids=input_ids, attention_mask=attention_mask)
        keys = [tuple(input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        missing = sorted({i for i, k in enumerate(keys) if k not in cache})
        if missing:
            longest = max(lengths[i] for i in missing)
            with torch.no_grad():
                hidden = original(input_ids=input_ids[missing, :longest],
                                  attention_mask=mask[missing, :longest]).last_hidden_state
            for row, i in enumerate(missing):
                cache[keys[i]] = hidden[row, : lengths[i]].detach()
        width = next(iter(cache.values())).shape[-1]
        out = torch.zeros(*input_ids.shape, width, device=input_ids.device, dtype=next(iter(cache.values())).dtype)
        for i, key in enumerate(keys):
            out[i, : lengths[i]] = cache[key]
        return SimpleNamespace(last_hidden_state=out)

    encoder.forward = forward  # an instance attribute: the module's __call__ finds it before the class's
    encoder.memoized_features = cache
    return network


class HalfPrecisionWeights(TrainableWeights):
    """:class:`~oncofusion.networks.trainable.TrainableWeights` stored in float16 (half the file size);
    loading copies them back into the network's float32 parameters."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.half() if v.is_floating_point() else v for k, v in super().state_dict().items()}
