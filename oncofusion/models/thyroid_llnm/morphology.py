"""Nodule morphology scalars measured on a 2D thyroid ultrasound frame, in millimetres.

LLNM-Net gives each scalar its own token: the nodule's aspect ratio (taller-than-wide), its
echogenicity contrast (ring minus inside), and, when a thyroid lobe mask is given, the distance from
the nodule to the capsule (Shen et al. 2025: nodules within 0.25 cm of the capsule carry > 72 % risk of
lateral lymph-node metastasis) and the lobe third (upper and middle thirds are high risk).

Axes. Frames are what :func:`~oncofusion.io.frames.read_frame` returns: ``(C, W, H)``, spatial axis 0
the column ``x`` (lateral, across the beam), axis 1 the row ``y`` (depth: along the beam, the
transducer at row 0). Masks are ``(W, H)`` on the same grid, ``mask[i, j]`` the pixel Slicer calls
``(i, j)``. ``spacing_mm`` is ``(x, y)``: mm per step along axis 0 and along axis 1, the diagonal of the
frame's affine (:func:`frame_spacing_mm`).

Calibration. Every length here is in mm from the frame's pixel size. A frame without one
(``spacing_source`` ``"none"``: no SequenceOfUltrasoundRegions in cm and no PixelSpacing; every
PNG/JPEG export) is passed as ``spacing_mm=None``, and whatever needs millimetres (a click radius, the
echogenicity ring, the capsule distance, the nodule's size, :func:`morphology_scalars`) is refused
with :class:`~oncofusion.contract.InvalidRequest` naming what is missing: nothing guesses a pixel size.
A caller who knows the pixel size (e.g. from the scanner's depth scale) passes it explicitly. Ratios
(:func:`aspect_ratio`, :func:`lobe_position`) accept ``None`` and then take pixels as square.

Lobe orientation. The lobe third is read on a longitudinal (sagittal) view, where the lobe's long axis
runs across the image. By default the cranial pole is on the image *left* (small ``i``), the usual
display convention for longitudinal neck scans; ``cranial`` names another side (``"right"``, ``"top"``,
``"bottom"``) for other conventions. A transverse view (a lobe that is not elongated) has no thirds and
is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.data.roi import roi_region

#: width (mm) of the ring around the nodule whose mean is compared with the inside
DEFAULT_RING_MM = 2.0
#: radius (mm) of the disc a click stands for
DEFAULT_CLICK_RADIUS_MM = 5.0
#: the paper's high-risk distance to the capsule (0.25 cm)
CAPSULE_RISK_MM = 2.5
#: image side of the cranial pole on a longitudinal view, and the directions each side names (x, y)
CRANIAL_SIDES: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0),
}
#: a lobe's long axis must be at least this much longer than its short axis to have thirds
MIN_LOBE_ELONGATION = 1.5
#: the long axis may turn at most this far (degrees) from the cranial-caudal image direction
MAX_LOBE_TILT_DEG = 45.0
LOBE_THIRDS = ("upper", "middle", "lower")
#: ITU-R BT.601 luminance weights, as the frame reader uses for sharpness
LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)

Spacing = tuple[float, float]


# -- calibration -------------------------------------------------------------------------------------
def frame_spacing_mm(frame: Any) -> Spacing | None:
    """The ``(x, y)`` pixel size in mm of a frame from :func:`~oncofusion.io.frames.read_frame`, or None
    when it has no calibration (``spacing_source`` ``"none"``: the affine's 1.0 is a pixel, not a mm)."""
    meta = getattr(frame, "meta", {}) or {}
    if meta.get("spacing_source", "none") == "none":
        return None
    affine = np.asarray(frame.affine, dtype=np.float64)
    return float(affine[0, 0]), float(affine[1, 1])


def _check_spacing(spacing_mm: Sequence[float] | None, needed_for: str) -> Spacing:
    """``spacing_mm`` as two positive floats, or :class:`InvalidRequest` saying what needs it."""
    if spacing_mm is None:
        raise InvalidRequest(
            f"{needed_for} is measured in mm, but the frame has no pixel calibration (no "
            "SequenceOfUltrasoundRegions in cm and no PixelSpacing; PNG/JPEG exports never carry one): send "
            "the DICOM from the scanner or give the pixel size in mm",
            422,
        )
    values = tuple(float(v) for v in spacing_mm)
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidRequest(f"pixel size must be two positive numbers of mm (x, y), got {spacing_mm!r}", 422)
    return values  # type: ignore[return-value]


def _pixel_spacing(spacing_mm: Sequence[float] | None, needed_for: str) -> Spacing:
    """For ratios: the pixel size, or square pixels (1, 1) when the frame has none."""
    return (1.0, 1.0) if spacing_mm is None else _check_spacing(spacing_mm, needed_for)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _as_mask(mask: Any, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """A non-empty 2D boolean mask (of ``shape`` when given)."""
    array = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    if array.ndim == 3 and array.shape[0] == 1:  # a label read as (1, W, H)
        array = array[0]
    if array.ndim != 2:
        raise InvalidRequest(f"{name} must be a 2D (W, H) mask on the frame, got shape {_shape_text(array.shape)}")
    if shape is not None and tuple(array.shape) != tuple(int(s) for s in shape):
        raise InvalidRequest(
            f"{name} is {_shape_text(array.shape)} but the frame is {_shape_text(shape)}: draw it on this frame"
        )
    region = array > 0
    if not region.any():
        raise InvalidRequest(f"{name} is empty: draw the region or send a box")
    return region


# -- the nodule region -------------------------------------------------------------------------------
def roi_mask(
    roi: Roi,
    shape: Sequence[int],
    spacing_mm: Sequence[float] | None,
    click_radius_mm: float = DEFAULT_CLICK_RADIUS_MM,
) -> np.ndarray:
    """The nodule as a boolean ``(W, H)`` mask on a frame of spatial ``shape``: the ROI's mask as drawn,
    its box (inclusive pixel indices, corners in any order, clipped to the frame), or a disc of
    ``click_radius_mm`` around each click (which needs a calibrated frame)."""
    shape = tuple(int(s) for s in shape)
    dims = roi.spatial_dims
    if dims is None:
        raise InvalidRequest("no nodule given: send a box, a click or a mask on the frame")
    if dims != 2:
        raise InvalidRequest(f"the ROI has {dims} dimensions but the frame is 2D: send (i, j) pixel indices")
    if roi.mask is not None:
        return _as_mask(roi.mask, "ROI mask", shape)
    limit = np.asarray(shape) - 1
    if roi.box is not None:
        corners = np.asarray(roi.box, dtype=float)
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        if np.any(hi < 0) or np.any(lo > limit):
            raise InvalidRequest(
                f"ROI box {lo.tolist()}-{hi.tolist()} lies outside the {_shape_text(shape)} frame"
            )
        return roi_region(Roi(box=(tuple(lo), tuple(hi))), shape, np.eye(3))
    radius = float(click_radius_mm)
    if not (math.isfinite(radius) and radius > 0):
        raise InvalidRequest(f"click radius must be a positive number of mm, got {click_radius_mm!r}")
    spacing = _check_spacing(spacing_mm, f"a click's radius ({radius:g} mm)")
    for point in roi.points:
        p = np.asarray(point, dtype=float)
        if np.any(p < 0) or np.any(p > limit):
            raise InvalidRequest(f"ROI point {tuple(p.tolist())} lies outside the {_shape_text(shape)} frame")
    affine = np.diag([spacing[0], spacing[1], 1.0])
    return roi_region(Roi(points=list(roi.points)), shape, affine, radius_mm=radius)


# -- shape -------------------------------------------------------------------------------------------
def _extent_px(mask: np.ndarray) -> tuple[int, int]:
    """Pixels covered along x (axis 0) and y (axis 1), ends included."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    return int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1)


def nodule_extent_mm(mask: Any, spacing_mm: Sequence[float] | None) -> tuple[float, float]:
    """``(width, depth)`` of the nodule's bounding box in mm: width across the beam (x, axis 0), depth
    along it (y, axis 1), from pixel edge to pixel edge."""
    spacing = _check_spacing(spacing_mm, "the nodule's size")
    width, depth = _extent_px(_as_mask(mask, "nodule mask"))
    return width * spacing[0], depth * spacing[1]


def aspect_ratio(mask: Any, spacing_mm: Sequence[float] | None) -> float:
    """Taller-than-wide ratio: the nodule box's depth extent (rows, y, axis 1 of a (W, H) mask: the beam
    direction) over its width extent (columns, x, axis 0), in mm; > 1 is "taller than wide".

    A ratio of lengths needs only the pixel aspect: with ``spacing_mm=None`` pixels are taken as square.
    """
    spacing = _pixel_spacing(spacing_mm, "the aspect ratio")
    width, depth = _extent_px(_as_mask(mask, "nodule mask"))
    return (depth * spacing[1]) / (width * spacing[0])


# -- echogenicity ------------------------------------------------------------------------------------
def luminance(image: Any) -> np.ndarray:
    """The ``(W, H)`` luminance of a ``(C, W, H)`` frame (grey: its one channel; RGB: BT.601) or of a
    ``(W, H)`` array, as float64."""
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0]
    if array.ndim == 3 and array.shape[0] in (3, 4):  # RGB, or RGBA whose alpha carries no anatomy
        return np.tensordot(np.asarray(LUMINANCE_WEIGHTS), array[:3], axes=1)
    raise InvalidRequest(
        f"image must be a (C, W, H) frame with 1 or 3 channels or a (W, H) array, got shape "
        f"{_shape_text(array.shape)}"
    )


def ring_mask(mask: Any, spacing_mm: Sequence[float] | None, ring_mm: float = DEFAULT_RING_MM) -> np.ndarray:
    """Pixels outside the nodule whose centre lies within ``ring_mm`` of a nodule pixel's centre
    (Euclidean, in mm), clipped to the frame."""
    spacing = _check_spacing(spacing_mm, "the echogenicity ring")
    if not (math.isfinite(float(ring_mm)) and float(ring_mm) > 0):
        raise InvalidRequest(f"ring width must be a positive number of mm, got {ring_mm!r}")
    region = _as_mask(mask, "nodule mask")
    distance = ndimage.distance_transform_edt(~region, sampling=spacing)
    return (~region) & (distance <= float(ring_mm))


def echogenicity_contrast(
    image: Any, mask: Any, spacing_mm: Sequence[float] | None, ring_mm: float = DEFAULT_RING_MM
) -> float:
    """Mean luminance of a ``ring_mm`` ring around the nodule minus the mean inside it, in the frame's
    intensity units (0-255 for 8-bit ultrasound): positive for a hypoechoic (darker) nodule."""
    values = luminance(image)
    region = _as_mask(mask, "nodule mask", values.shape)
    ring = ring_mask(region, spacing_mm, ring_mm)
    if not ring.any():
        raise InvalidRequest("the nodule mask covers the whole frame: there is no surrounding tissue to compare")
    return float(values[ring].mean() - values[region].mean())


# -- position in the lobe ----------------------------------------------------------------------------
def _nodule_and_lobe(mask: Any, lobe_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    region = _as_mask(mask, "nodule mask")
    lobe = _as_mask(lobe_mask, "thyroid lobe mask", region.shape)
    if not (region & lobe).any():
        raise InvalidRequest("the nodule does not overlap the thyroid lobe mask: draw the lobe that holds it")
    return region, lobe


def capsule_distance_mm(mask: Any, lobe_mask: Any, spacing_mm: Sequence[float] | None) -> float:
    """Shortest distance (mm) from the nodule to the lobe boundary (the capsule), edge to edge.

    A Euclidean distance transform of the lobe mask (``sampling=spacing_mm``) gives, for every nodule
    pixel, the nearest pixel centre outside the lobe; the gap between the two pixels' edges along that
    line is the centre distance less the part inside the two pixels (``1 / n`` of it, ``n`` the larger
    pixel step), so that a nodule with ``k`` lobe pixels between it and the outside is ``k`` pixels
    away, and one touching or crossing the boundary 0. The frame's edge is not a capsule: a lobe cut by
    the field of view is measured to its visible boundary only.
    """
    spacing = _check_spacing(spacing_mm, "the distance to the capsule")
    region, lobe = _nodule_and_lobe(mask, lobe_mask)
    if lobe.all():
        raise InvalidRequest("the thyroid lobe mask covers the whole frame: its boundary (the capsule) is not in view")
    if (region & ~lobe).any():
        return 0.0
    _, nearest = ndimage.distance_transform_edt(lobe, sampling=spacing, return_indices=True)
    inside = np.argwhere(region)
    steps = nearest[:, inside[:, 0], inside[:, 1]].T - inside  # (N, 2) pixel steps to the outside
    length_mm = np.sqrt(((steps * np.asarray(spacing)) ** 2).sum(axis=1))
    largest = np.abs(steps).max(axis=1)
    return float((length_mm * (1.0 - 1.0 / largest)).min())


def lobe_position(
    mask: Any, lobe_mask: Any, spacing_mm: Sequence[float] | None = None, cranial: str = "left"
) -> float:
    """Where the nodule's centroid lies along the lobe's long axis: 0 at the cranial pole, 1 at the caudal.

    The long axis is the lobe mask's first principal axis (in mm; square pixels without calibration),
    pointed from the ``cranial`` side of the image (see the module docstring) to the opposite one; the
    poles are the lobe's extreme pixels along it (the visible lobe, if the field of view cuts it).
    """
    if cranial not in CRANIAL_SIDES:
        raise InvalidRequest(f"cranial must be one of {list(CRANIAL_SIDES)}, got {cranial!r}")
    spacing = np.asarray(_pixel_spacing(spacing_mm, "the lobe position"))
    region, lobe = _nodule_and_lobe(mask, lobe_mask)
    points = np.argwhere(lobe) * spacing
    centred = points - points.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(points))
    short, long = np.sqrt(np.maximum(eigenvalues, 0.0))
    if long < MIN_LOBE_ELONGATION * max(short, 1e-9):
        raise InvalidRequest(
            f"the thyroid lobe mask is not elongated (long/short axis {long / max(short, 1e-9):.2f} < "
            f"{MIN_LOBE_ELONGATION}): the lobe third needs a longitudinal view of the lobe"
        )
    axis = eigenvectors[:, 1]
    caudal = -np.asarray(CRANIAL_SIDES[cranial])
    alignment = float(axis @ caudal)
    if abs(alignment) < math.cos(math.radians(MAX_LOBE_TILT_DEG)):
        raise InvalidRequest(
            f"the thyroid lobe's long axis runs {math.degrees(math.acos(min(abs(alignment), 1.0))):.0f} degrees "
            f"away from the cranial-caudal direction given (cranial = image {cranial}): say where cranial is"
        )
    axis = axis if alignment > 0 else -axis
    along = centred @ axis
    centroid = (np.argwhere(region).mean(axis=0) * spacing - points.mean(axis=0)) @ axis
    return float(np.clip((centroid - along.min()) / (along.max() - along.min()), 0.0, 1.0))


def lobe_third(
    mask: Any, lobe_mask: Any, spacing_mm: Sequence[float] | None = None, cranial: str = "left"
) -> str:
    """``"upper"``, ``"middle"`` or ``"lower"``: the third of the lobe's long axis holding the nodule's
    centroid (:func:`lobe_position` below 1/3, below 2/3, else), upper being cranial."""
    return third_of(lobe_position(mask, lobe_mask, spacing_mm, cranial))


def third_of(position: float) -> str:
    """The lobe third of a :func:`lobe_position`: below 1/3 upper, below 2/3 middle, else lower."""
    return LOBE_THIRDS[min(int(position * 3.0), 2)]


# -- all together ------------------------------------------------------------------------------------
def morphology_scalars(
    image: Any,
    roi: Roi,
    spacing_mm: Sequence[float] | None,
    lobe_mask: Any = None,
    *,
    ring_mm: float = DEFAULT_RING_MM,
    click_radius_mm: float = DEFAULT_CLICK_RADIUS_MM,
    cranial: str = "left",
    capsule_risk_mm: float = CAPSULE_RISK_MM,
) -> dict[str, float | str | bool | None]:
    """Every scalar of the nodule on a ``(C, W, H)`` frame: ``width_mm``, ``depth_mm``, ``aspect_ratio``,
    ``taller_than_wide`` (aspect ratio > 1), ``echogenicity_contrast``; with a ``lobe_mask``
    ``capsule_distance_mm``, ``capsule_within_2_5_mm`` (the paper's finding: distance <= ``capsule_risk_mm``),
    ``lobe_position`` (0 cranial .. 1 caudal) and ``lobe_third``, which are None without one.

    Needs a calibrated frame (``spacing_mm``): the size, the ring and the capsule distance are in mm.
    """
    spacing = _check_spacing(spacing_mm, "the nodule morphology (size, echogenicity ring, capsule distance)")
    values = luminance(image)
    region = roi_mask(roi, values.shape, spacing, click_radius_mm)
    width, depth = nodule_extent_mm(region, spacing)
    ratio = aspect_ratio(region, spacing)
    scalars: dict[str, float | str | bool | None] = {
        "width_mm": width,
        "depth_mm": depth,
        "aspect_ratio": ratio,
        "taller_than_wide": bool(ratio > 1.0),
        "echogenicity_contrast": echogenicity_contrast(values, region, spacing, ring_mm),
        "capsule_distance_mm": None,
        "capsule_within_2_5_mm": None,
        "lobe_position": None,
        "lobe_third": None,
    }
    if lobe_mask is not None:
        lobe = _as_mask(lobe_mask, "thyroid lobe mask", values.shape)
        distance = capsule_distance_mm(region, lobe, spacing)
        position = lobe_position(region, lobe, spacing, cranial)
        scalars.update({
            "capsule_distance_mm": distance,
            "capsule_within_2_5_mm": bool(distance <= capsule_risk_mm),
            "lobe_position": position,
            "lobe_third": third_of(position),
        })
    return scalars
