"""SMuRF explanations: integrated gradients of the log-hazard over the CT sub-volumes and the slide grid.

Integrated gradients (Sundararajan et al. 2017, captum's ``IntegratedGradients``) attribute
``f(x) - f(0)`` to every input element, ``f`` the log-hazard (output column 1) of the fold ensemble's
mean and ``0`` the baseline of every input: an all-zero CT sub-volume is air after the soft-tissue window
(nothing there), an all-zero grid cell is a cell without region. Integrated gradients are linear in
``f``, so those of the ensemble mean are the mean of each member's, and completeness holds for the
mean: the attributions add up to the log-hazard difference up to captum's convergence delta, which
shrinks with ``n_steps`` (Gauss-Legendre nodes). What each input's sum says: how much the tumor, the
nodes and the slide moved this patient's log-hazard away from the "nothing seen" baseline.

Where the attributions are drawn:

- **CT** (:func:`ct_overlay`): each region's ``(4, X, Y, D)`` attribution is placed back at the four
  sub-volumes' footprints on the 1 mm grid the sub-volumes were cut from (centres from
  :class:`~oncofusion.models.opscc_smurf.subvolumes.QuartileSubVolumesd`, the same centring as the
  inference crop), ``|attribution|`` summed where footprints overlap, kept only inside the regions'
  boxes (mask + ring). The voxels in the top ``top_fraction`` of what is left become label value 1, carried
  to the CT's own grid through the two affines: a CT voxel is marked when the 1 mm voxel at its centre
  is, and the CT voxel nearest each marked 1 mm voxel is marked too, so a coarse CT (3 mm slices)
  loses no marked voxel and a fine one gets no holes.
- **Slide** (:func:`slide_heatmap_png`): each grid cell's attribution summed over its 192 embedding
  features is the region's contribution; the regions' level-0 squares (from
  :func:`~oncofusion.data.slide_grids.plan_fragment_grids`, the plan the grid was built from) are
  coloured over the slide's thumbnail, red raising the risk, blue lowering it. Without the plan the
  fragments' grids themselves are drawn (:func:`grid_heatmap_png`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from oncofusion.io.atomic import atomic_write_bytes
from oncofusion.models.opscc_smurf.network import LOG_HAZARD
from oncofusion.models.opscc_smurf.subvolumes import QuartileSubVolumesd

#: integration steps by default: enough for a CPU answer in seconds; raise it where completeness matters
DEFAULT_STEPS = 8
#: share of the in-box voxels the CT overlay marks
DEFAULT_TOP_FRACTION = 0.05


# -- integrated gradients -------------------------------------------------------------------------------
def log_hazard_function(models: Sequence[nn.Module]) -> Callable[..., torch.Tensor]:
    """``f(*inputs) -> (B,)``: the members' mean log-hazard (members in eval mode)."""
    members = list(models)
    if not members:
        raise ValueError("no model to explain")

    def log_hazard(*inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(*inputs)[:, LOG_HAZARD] for member in members]).mean(0)

    return log_hazard


def integrated_gradients(function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                         n_steps: int = DEFAULT_STEPS, internal_batch_size: int | None = None
                         ) -> tuple[tuple[torch.Tensor, ...], float, float, float]:
    """Attributions of ``function(*inputs) - function(*zeros)`` to each input, one case (``B = 1``).

    Returns ``(attributions, delta, output, baseline_output)``: attributions in the inputs' shapes, captum's
    convergence delta (their sum minus the output difference) and the two outputs.
    """
    if isinstance(n_steps, bool) or int(n_steps) < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    inputs = tuple(x.detach().float() for x in inputs)
    if any(x.shape[0] != 1 for x in inputs):
        raise ValueError(f"one case at a time: batch sizes {[int(x.shape[0]) for x in inputs]}")
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    with torch.enable_grad():
        attributions, delta = IntegratedGradients(function).attribute(
            inputs, baselines=baselines, n_steps=int(n_steps), internal_batch_size=internal_batch_size,
            return_convergence_delta=True)
    with torch.no_grad():
        output, baseline_output = float(function(*inputs)[0]), float(function(*baselines)[0])
    attributions = tuple(a.detach() for a in (attributions if isinstance(attributions, tuple) else (attributions,)))
    return attributions, float(delta.reshape(-1)[0]), output, baseline_output


# -- CT: sub-volumes back on the grids ------------------------------------------------------------------
def subvolume_starts(box: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(4, 3)`` low corners, on the 1 mm grid, of the four inference sub-volumes of ``size`` cut from
    ``box`` (the centring of :class:`QuartileSubVolumesd`; voxel ``size // 2`` is the centre)."""
    size = tuple(int(s) for s in size)
    crop = QuartileSubVolumesd(keys="image", box_key="box", output_key="out", roi_size=size[:2], depth=size[2])
    return crop.centres(np.asarray(box)) - np.asarray(size) // 2


def attribution_volume(attributions: Mapping[str, np.ndarray], boxes: Mapping[str, np.ndarray | None],
                       shape: Sequence[int]) -> np.ndarray:
    """``|attribution|`` of each region's ``(4, X, Y, D)`` sub-volumes placed at their footprints on the 1 mm
    grid of ``shape`` (summed where they overlap), zero outside the regions' boxes. ``boxes``: region name
    -> inclusive ``(2, 3)`` box on that grid, None for an absent region (not drawn)."""
    shape = tuple(int(s) for s in shape)
    volume = np.zeros(shape, np.float32)
    inside = np.zeros(shape, bool)
    for name, values in attributions.items():
        box = boxes.get(name)
        if box is None:
            continue
        box = np.asarray(box, np.int64)
        values = np.abs(np.asarray(values, np.float32))
        if values.ndim != 4:
            raise ValueError(f"attribution of '{name}' must be (4, X, Y, D), got {values.shape}")
        inside[tuple(slice(lo, hi + 1) for lo, hi in zip(box[0], box[1], strict=True))] = True
        for channel, start in zip(values, subvolume_starts(box, values.shape[1:]), strict=True):
            lo = np.maximum(start, 0)
            hi = np.minimum(start + np.asarray(channel.shape), shape)
            if np.any(hi <= lo):
                continue
            target = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            source = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
            volume[target] += channel[source]
    volume[~inside] = 0.0
    return volume


def top_fraction_mask(volume: np.ndarray, fraction: float) -> np.ndarray:
    """The voxels whose value is among the top ``fraction`` of the positive ones (at least one voxel when
    any is positive); all False for a volume without positive value."""
    if not 0 < fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {fraction}")
    positive = volume[volume > 0]
    if positive.size == 0:
        return np.zeros(volume.shape, bool)
    threshold = np.quantile(positive, 1.0 - fraction)
    return volume >= max(float(threshold), float(positive.min()))


def to_grid(mask: np.ndarray, mask_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """A boolean ``mask`` on one grid (voxel -> world ``mask_affine``) as a uint8 label (value 1) on another
    (``shape``, ``affine``): a target voxel is 1 when the mask voxel nearest its centre is, or when it is the
    voxel nearest a mask voxel's centre. Only the target voxels around the mask are visited."""
    shape = np.asarray([int(s) for s in shape])
    label = np.zeros(tuple(shape), np.uint8)
    points = np.argwhere(mask)
    if points.size == 0:
        return label
    mask_to_target = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(mask_affine, np.float64)
    target_to_mask = np.linalg.inv(mask_to_target)

    def apply(matrix: np.ndarray, ijk: np.ndarray) -> np.ndarray:
        return ijk @ matrix[:3, :3].T + matrix[:3, 3]

    # mask voxel -> nearest target voxel
    hits = np.rint(apply(mask_to_target, points.astype(np.float64))).astype(np.int64)
    keep = np.all((hits >= 0) & (hits < shape), axis=1)
    label[tuple(hits[keep].T)] = 1
    # target voxel centre -> nearest mask voxel, over the target window around the mask's corners
    lo, hi = points.min(0) - 0.5, points.max(0) + 0.5
    corners = np.array([[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)], float)
    window = apply(mask_to_target, corners)
    start = np.clip(np.floor(window.min(0)).astype(np.int64), 0, shape)
    stop = np.clip(np.ceil(window.max(0)).astype(np.int64) + 1, 0, shape)
    if np.any(stop <= start):
        return label
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop, strict=True)), indexing="ij"), -1)
    nearest = np.rint(apply(target_to_mask, grid.reshape(-1, 3).astype(np.float64))).astype(np.int64)
    valid = np.all((nearest >= 0) & (nearest < np.asarray(mask.shape)), axis=1)
    marked = np.zeros(len(nearest), bool)
    marked[valid] = mask[tuple(nearest[valid].T)]
    block = label[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    block[marked.reshape(grid.shape[:3])] = 1
    return label


def ct_overlay(attributions: Mapping[str, np.ndarray], boxes: Mapping[str, np.ndarray | None],
               resampled_shape: Sequence[int], resampled_affine: np.ndarray, ct_shape: Sequence[int],
               ct_affine: np.ndarray, top_fraction: float = DEFAULT_TOP_FRACTION) -> tuple[np.ndarray, dict]:
    """The CT label (uint8, value 1) of the most attributed voxels inside the regions' boxes, and what it
    holds: ``{"voxels_1mm", "voxels_ct", "top_fraction", "threshold"}``.

    ``attributions``: region -> ``(4, X, Y, D)``; ``boxes``: region -> its box on the 1 mm grid
    (``resampled_shape``, ``resampled_affine``) the sub-volumes were cut from; the label is on the CT's
    grid (``ct_shape``, ``ct_affine``).
    """
    volume = attribution_volume(attributions, boxes, resampled_shape)
    top = top_fraction_mask(volume, top_fraction)
    label = to_grid(top, resampled_affine, ct_shape, ct_affine)
    threshold = float(volume[top].min()) if top.any() else None
    return label, {"voxels_1mm": int(top.sum()), "voxels_ct": int(label.sum()), "top_fraction": float(top_fraction),
                   "threshold": threshold}


# -- slide ----------------------------------------------------------------------------------------------
def region_scores(attribution: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(n, 192, S, S)`` (or ``(1, n, 192, S, S)``, or ``(1, 192, S, S)`` for one fragment) -> ``(n, S, S)``:
    each cell's attribution summed over its embedding features (signed)."""
    values = attribution.detach().cpu().numpy() if torch.is_tensor(attribution) else np.asarray(attribution)
    if values.ndim == 5:
        values = values[0]
    if values.ndim != 4:
        raise ValueError(f"slide attribution must be (n, C, S, S) or (1, n, C, S, S), got {values.shape}")
    return values.sum(axis=1).astype(np.float32)


def _colours(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values -> RGB uint8 on a blue-white-red ramp (``-scale`` blue, 0 white, ``+scale`` red)."""
    t = np.clip(values / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(values)
    red = np.where(t > 0, 1.0, 1.0 + t)
    blue = np.where(t < 0, 1.0, 1.0 - t)
    green = 1.0 - np.abs(t)
    return (np.stack([red, green, blue], -1) * 255.0 + 0.5).astype(np.uint8)


def _write_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def slide_heatmap_png(scores: np.ndarray, slide, plan, path: str | Path, thumbnail_size: int = 1024,
                      alpha: float = 0.55) -> Path:
    """Each placed region's score (``scores[fragment, row, col]``) as a coloured square over the slide's
    thumbnail, blended with ``alpha``; ``plan``: the grid's
    :class:`~oncofusion.data.slide_grids.FragmentGridPlan`, ``slide`` a
    :class:`~oncofusion.io.slides.SlideImage`. Written atomically; returns ``path``."""
    thumb = slide.thumbnail(thumbnail_size).astype(np.float32)
    width0, height0 = slide.dimensions
    sx, sy = thumb.shape[1] / width0, thumb.shape[0] / height0  # thumbnail pixels per level-0 pixel
    values = [float(scores[p.fragment, p.row, p.col]) for p in plan.placed]
    scale = max((abs(v) for v in values), default=0.0)
    for placed, value in zip(plan.placed, values, strict=True):
        region = placed.region
        span = region.size * slide.level_downsamples[region.level]
        x0, y0 = int(np.floor(region.x * sx)), int(np.floor(region.y * sy))
        x1, y1 = int(np.ceil((region.x + span) * sx)), int(np.ceil((region.y + span) * sy))
        colour = _colours(np.array([value]), scale)[0].astype(np.float32)
        block = thumb[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
        block[:] = (1 - alpha) * block + alpha * colour
    return _write_png(np.clip(thumb + 0.5, 0, 255).astype(np.uint8), path)


def grid_heatmap_png(scores: np.ndarray, path: str | Path, cell: int = 16) -> Path:
    """The fragments' ``(n, S, S)`` scores side by side, ``cell`` pixels per grid cell, a grey gap between
    fragments (the fallback when the regions' positions on the slide are not known)."""
    n, rows, cols = scores.shape
    scale = float(np.abs(scores).max()) if scores.size else 0.0
    gap = max(cell // 2, 1)
    image = np.full((rows * cell, n * cols * cell + (n - 1) * gap, 3), 128, np.uint8)
    for fragment in range(n):
        tiles = np.kron(_colours(scores[fragment], scale), np.ones((cell, cell, 1), np.uint8))
        left = fragment * (cols * cell + gap)
        image[:, left:left + cols * cell] = tiles
    return _write_png(image, path)
