"""2D radiomics of one image inside an ROI mask: first-order, shape, GLCM, GLRLM and GLSZM features.

Why here: the papers compare their models with a hand-crafted radiomics baseline (features from the
tumour ROI, then a linear or tree classifier). ``pyradiomics`` does not install on this stack, so the
features it is known for are re-implemented on numpy, scipy and scikit-image.

Definitions follow pyradiomics (van Griethuysen et al., Cancer Research 2017;
https://pyradiomics.readthedocs.io/en/latest/features.html), which follows the Image Biomarker
Standardisation Initiative (IBSI; Zwanenburg et al., Radiology 2020) except where pyradiomics says
otherwise. Names are pyradiomics' ``<class>_<Feature>`` (``firstorder_Mean``, ``shape2D_PixelSurface``,
``glcm_Contrast``, ``glrlm_RunLengthNonUniformity``, ``glszm_SmallAreaEmphasis``).

Where this differs from pyradiomics (or chooses among its options):

- 2D only. ``spacing`` is (row, column) in mm, in the array's axis order; shape features are in mm / mm².
- Discretisation is pyradiomics' fixed bin width relative to the ROI minimum:
  ``level = floor(x / w) - floor(min_ROI / w) + 1``, so levels start at 1. Grey levels absent from the
  ROI are dropped from the matrices (as pyradiomics does); features use the level values themselves, so
  the drop changes no value. More than :data:`MAX_GRAY_LEVELS` distinct levels is refused (raise the
  bin width) rather than building huge matrices.
- GLCM: ``skimage.feature.graycomatrix``, symmetric, one matrix per (distance, angle). Pixels outside
  the ROI get level 0 and row/column 0 is dropped, so a pair with a pixel outside the ROI is never
  counted. Features are computed per matrix and averaged over the matrices that hold a pair
  (pyradiomics' default); an ROI with no pair at any offset gives NaN GLCM features.
- GLRLM: runs along the same ``angles``; an angle ``a`` steps ``(round(sin a), round(cos a))`` pixels
  (row, column), scikit-image's convention for distance 1. Features per angle, then averaged.
- GLSZM: zones are 8-connected (pyradiomics' 2D default too).
- Shape: perimeter and mesh surface from marching squares on the zero-padded mask
  (``skimage.measure.find_contours``, foreground 8-connected), as pyradiomics' 2D mesh; holes count in
  the perimeter and are subtracted from the mesh surface. The marching-squares boundary of a binary mask
  is ~6 % longer than the smooth curve, so a digitised disc has ``Sphericity`` ~0.93, not 1 (the same
  bias as pyradiomics). Maximum diameter is over contour vertices.
  Axis lengths and elongation come from the population covariance of pixel centres (pyradiomics):
  ``4 sqrt(lambda)`` and ``Elongation = sqrt(lambda_minor / lambda_major)`` in (0, 1] (a 2:1 ellipse
  gives 0.5).
- First-order: no ``voxelArrayShift`` (``Energy`` is ``sum x²`` of the raw values); ``Kurtosis`` is
  Pearson's (3 for a normal, not the excess), ``Skewness`` and ``Kurtosis`` are 0 for a constant ROI, as
  pyradiomics. ``Entropy`` and ``Uniformity`` use the discretised values. ``RobustMeanAbsoluteDeviation``
  is NaN when no value lies between the 10th and 90th percentiles (an ROI of two values).
- Entropies are in bits and skip empty cells instead of adding pyradiomics' ``eps``.
- Not implemented: NGTDM, GLDM, filtered images (wavelet, LoG), resampling.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist
from skimage.feature import graycomatrix
from skimage.measure import find_contours

logger = logging.getLogger(__name__)

__all__ = ["MAX_GRAY_LEVELS", "feature_matrix", "feature_names", "radiomics_features"]

MAX_GRAY_LEVELS = 512
"""Most distinct grey levels in one ROI: a GLCM is levels² per offset; radiomics uses ~16-128 bins."""

DEFAULT_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)

FIRST_ORDER = ("Energy", "TotalEnergy", "Entropy", "Minimum", "10Percentile", "90Percentile", "Maximum",
               "Mean", "Median", "InterquartileRange", "Range", "MeanAbsoluteDeviation",
               "RobustMeanAbsoluteDeviation", "RootMeanSquared", "StandardDeviation", "Skewness", "Kurtosis",
               "Variance", "Uniformity")
SHAPE_2D = ("MeshSurface", "PixelSurface", "Perimeter", "PerimeterSurfaceRatio", "Sphericity",
            "SphericalDisproportion", "MaximumDiameter", "MajorAxisLength", "MinorAxisLength", "Elongation")
GLCM = ("Contrast", "DifferenceAverage", "Id", "Idm", "JointEnergy", "Correlation", "JointEntropy",
        "ClusterShade", "ClusterProminence", "InverseVariance", "MaximumProbability", "JointAverage")
# GLRLM and GLSZM share one set of statistics of a (grey level, size) count matrix; names per class
_SIZE_STATISTICS = ("short", "long", "gln", "glnn", "sn", "snn", "percentage", "low_gray", "high_gray",
                    "entropy")
GLRLM = dict(zip(_SIZE_STATISTICS, (
    "ShortRunEmphasis", "LongRunEmphasis", "GrayLevelNonUniformity", "GrayLevelNonUniformityNormalized",
    "RunLengthNonUniformity", "RunLengthNonUniformityNormalized", "RunPercentage", "LowGrayLevelRunEmphasis",
    "HighGrayLevelRunEmphasis", "RunEntropy"), strict=True))
GLSZM = dict(zip(_SIZE_STATISTICS, (
    "SmallAreaEmphasis", "LargeAreaEmphasis", "GrayLevelNonUniformity", "GrayLevelNonUniformityNormalized",
    "SizeZoneNonUniformity", "SizeZoneNonUniformityNormalized", "ZonePercentage", "LowGrayLevelZoneEmphasis",
    "HighGrayLevelZoneEmphasis", "ZoneEntropy"), strict=True))

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def feature_names() -> list[str]:
    """Every feature's name, in the order :func:`radiomics_features` returns them (the same for any case)."""
    return ([f"firstorder_{n}" for n in FIRST_ORDER] + [f"shape2D_{n}" for n in SHAPE_2D]
            + [f"glcm_{n}" for n in GLCM] + [f"glrlm_{n}" for n in GLRLM.values()]
            + [f"glszm_{n}" for n in GLSZM.values()])


# ---------------------------------------------------------------------------------------------- inputs


def _check_mask(mask: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """The mask as bool; refuses label maps, other shapes and ROIs too small for texture."""
    mask = np.asarray(mask)
    if mask.shape != image_shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image_shape}; "
                         "resample the mask onto the image grid")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"mask must be binary (bool or 0/1); got values {np.unique(mask)[:6].tolist()}: "
                             "select one label first (mask == label)")
        mask = mask.astype(bool)
    count = int(mask.sum())
    if count == 0:
        raise ValueError("ROI mask is empty (no nonzero pixel): there is nothing to describe; "
                         "check the segmentation or drop the case")
    if count == 1:
        raise ValueError("ROI mask has a single pixel: shape and texture (GLCM, GLRLM, GLSZM) are undefined "
                         "for one pixel; check the segmentation or drop the case")
    return mask


def _check_inputs(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float], bin_width: float,
                  distances: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image (float64) and mask (bool) cropped to the ROI's bounding box; every argument checked."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image must be 2D (H, W); got shape {image.shape}: pass one slice or frame")
    mask = _check_mask(mask, image.shape)
    if len(spacing) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be two positive (row, column) sizes in mm; got {tuple(spacing)}")
    if not (np.isfinite(bin_width) and bin_width > 0):
        raise ValueError(f"bin_width must be a positive number; got {bin_width}")
    if not distances or any(int(d) != d or d < 1 for d in distances):
        raise ValueError(f"distances must be positive whole pixel counts; got {tuple(distances)}")
    bad = int((~np.isfinite(image[mask])).sum())
    if bad:
        raise ValueError(f"image has {bad} non-finite values (NaN or inf) inside the ROI; "
                         "fix or exclude those pixels from the mask")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return np.where(mask[box], image[box], 0.0), mask[box]


def _discretise(values: np.ndarray, bin_width: float) -> np.ndarray:
    """Fixed-bin-width levels from 1, bins anchored at the ROI minimum as in pyradiomics."""
    return (np.floor(values / bin_width) - np.floor(values.min() / bin_width) + 1).astype(np.int64)


def _level_index(levels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index image: 0 outside the ROI, 1..n inside; the n grey levels present, as float)."""
    present = np.unique(levels[mask])
    if present.size > MAX_GRAY_LEVELS:
        raise ValueError(f"the ROI holds {present.size} grey levels at this bin width (at most "
                         f"{MAX_GRAY_LEVELS}); raise bin_width")
    index = np.zeros(mask.shape, dtype=np.uint16)
    index[mask] = np.searchsorted(present, levels[mask]) + 1
    return index, present.astype(np.float64)


# ---------------------------------------------------------------------------------------------- first order


def _entropy(probabilities: np.ndarray) -> float:
    """Shannon entropy in bits of the nonzero cells."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log2(p)).sum())


def _first_order(values: np.ndarray, levels: np.ndarray, pixel_area: float) -> list[float]:
    """Statistics of the ROI's pixel values, in :data:`FIRST_ORDER` order."""
    mean = values.mean()
    centred = values - mean
    m2, m3, m4 = (centred ** 2).mean(), (centred ** 3).mean(), (centred ** 4).mean()
    p10, p25, p50, p75, p90 = np.percentile(values, (10, 25, 50, 75, 90))
    robust = values[(values >= p10) & (values <= p90)]
    histogram = np.bincount(levels)[1:] / levels.size
    energy = float((values ** 2).sum())
    return [energy, energy * pixel_area, _entropy(histogram), values.min(), p10, p90, values.max(), mean, p50,
            p75 - p25, values.max() - values.min(), np.abs(centred).mean(),
            np.abs(robust - robust.mean()).mean() if robust.size else float("nan"), np.sqrt(energy / values.size),
            np.sqrt(m2),
            m3 / m2 ** 1.5 if m2 > 0 else 0.0, m4 / m2 ** 2 if m2 > 0 else 0.0, m2, (histogram ** 2).sum()]


# ---------------------------------------------------------------------------------------------- shape


def _contours(mask: np.ndarray, spacing: Sequence[float]) -> list[np.ndarray]:
    """Closed marching-squares boundaries of the mask in mm, (K, 2) each, last vertex not repeated."""
    padded = np.pad(mask, 1).astype(np.float64)
    out = []
    for contour in find_contours(padded, 0.5, fully_connected="high", positive_orientation="high"):
        if np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        out.append(contour * np.asarray(spacing, dtype=np.float64))
    return out


def _maximum_diameter(points: np.ndarray) -> float:
    """Largest distance between two boundary vertices (over the convex hull when there is one)."""
    try:
        points = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):  # collinear or too few points: use them all
        pass
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def _shape(mask: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Shape in mm / mm², in :data:`SHAPE_2D` order."""
    contours = _contours(mask, spacing)
    perimeter, signed_area = 0.0, 0.0
    for xy in contours:
        following = np.roll(xy, -1, axis=0)
        perimeter += float(np.hypot(*(following - xy).T).sum())
        signed_area += 0.5 * float((xy[:, 0] * following[:, 1] - following[:, 0] * xy[:, 1]).sum())
    mesh = abs(signed_area)  # outer boundaries and holes wind opposite ways, so holes subtract
    coordinates = np.argwhere(mask) * np.asarray(spacing, dtype=np.float64)
    centred = coordinates - coordinates.mean(axis=0)
    minor, major = np.clip(np.linalg.eigvalsh(centred.T @ centred / len(centred)), 0.0, None)
    circle = 2.0 * np.sqrt(np.pi * mesh)  # perimeter of the circle with the ROI's area
    return [mesh, mask.sum() * spacing[0] * spacing[1], perimeter, perimeter / mesh, circle / perimeter,
            perimeter / circle, _maximum_diameter(np.concatenate(contours)), 4 * np.sqrt(major),
            4 * np.sqrt(minor), np.sqrt(minor / major)]


# ---------------------------------------------------------------------------------------------- GLCM


def _glcm(index: np.ndarray, gray: np.ndarray, distances: Sequence[int], angles: Sequence[float]
          ) -> list[float]:
    """GLCM features averaged over the (distance, angle) matrices that hold a pair, in :data:`GLCM` order."""
    counts = graycomatrix(index, distances, angles, levels=gray.size + 1, symmetric=True)[1:, 1:]
    counts = counts.reshape(gray.size, gray.size, -1).astype(np.float64)
    counts = counts[..., counts.sum(axis=(0, 1)) > 0]
    if counts.shape[-1] == 0:
        return [float("nan")] * len(GLCM)
    p = counts / counts.sum(axis=(0, 1))
    i, j = gray[:, None, None], gray[None, :, None]
    difference = np.abs(i - j)
    mean = (i * p).sum(axis=(0, 1))  # the matrix is symmetric: row and column means are equal
    variance = ((i - mean) ** 2 * p).sum(axis=(0, 1))
    covariance = (i * j * p).sum(axis=(0, 1)) - mean ** 2
    correlation = np.where(variance > 0, covariance / np.where(variance > 0, variance, 1.0), 1.0)
    cluster = i + j - 2 * mean
    off_diagonal = np.where(difference > 0, p / np.where(difference > 0, difference, 1.0) ** 2, 0.0)
    per_matrix = [
        (difference ** 2 * p).sum(axis=(0, 1)), (difference * p).sum(axis=(0, 1)),
        (p / (1 + difference)).sum(axis=(0, 1)), (p / (1 + difference ** 2)).sum(axis=(0, 1)),
        (p ** 2).sum(axis=(0, 1)), correlation, [_entropy(p[..., m]) for m in range(p.shape[-1])],
        (cluster ** 3 * p).sum(axis=(0, 1)), (cluster ** 4 * p).sum(axis=(0, 1)), off_diagonal.sum(axis=(0, 1)),
        p.max(axis=(0, 1)), mean,
    ]
    return [float(np.mean(values)) for values in per_matrix]


# ---------------------------------------------------------------------------------------------- GLRLM / GLSZM


def _size_statistics(counts: np.ndarray, gray: np.ndarray, num_pixels: int) -> list[float]:
    """Statistics of a (grey level, run length or zone size) count matrix, in ``_SIZE_STATISTICS`` order.

    ``counts[g, s - 1]`` is how many runs (zones) of level ``gray[g]`` have length (size) ``s``.
    """
    total = counts.sum()
    sizes = np.arange(1, counts.shape[1] + 1, dtype=np.float64)
    by_gray, by_size = counts.sum(axis=1), counts.sum(axis=0)
    return [(by_size / sizes ** 2).sum() / total, (by_size * sizes ** 2).sum() / total,
            (by_gray ** 2).sum() / total, (by_gray ** 2).sum() / total ** 2, (by_size ** 2).sum() / total,
            (by_size ** 2).sum() / total ** 2, total / num_pixels, (by_gray / gray ** 2).sum() / total,
            (by_gray * gray ** 2).sum() / total, _entropy(counts / total)]


def _count_matrix(levels: np.ndarray, sizes: np.ndarray, num_levels: int) -> np.ndarray:
    """``counts[g - 1, s - 1]``: how many (level g, size s) runs or zones there are."""
    counts = np.zeros((num_levels, int(sizes.max())), dtype=np.float64)
    np.add.at(counts, (levels - 1, sizes - 1), 1.0)
    return counts


def _lines(index: np.ndarray, angle: float) -> np.ndarray:
    """The image rearranged so that each row is one line of pixels along ``angle`` (0-padded)."""
    step = (int(round(np.sin(angle))), int(round(np.cos(angle))))
    if step[0] < 0 or (step[0] == 0 and step[1] < 0):  # a line and its reverse hold the same runs
        step = (-step[0], -step[1])
    if step[0] == 0:
        return index
    if step[1] == 0:
        return index.T
    image = index if step[1] > 0 else index[:, ::-1]  # an anti-diagonal is a diagonal of the mirror
    height, width = image.shape
    rows, cols = np.indices(image.shape)
    lines = np.zeros((height + width - 1, height), dtype=image.dtype)
    lines[cols - rows + height - 1, rows] = image
    return lines


def _runs(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(level, length) of every maximal run of one nonzero level along the rows of ``lines``."""
    flat = np.pad(lines, ((0, 0), (0, 1))).ravel()  # the 0 column keeps runs from joining across rows
    starts = np.r_[0, np.flatnonzero(np.diff(flat)) + 1]
    lengths = np.diff(np.r_[starts, flat.size])
    values = flat[starts].astype(np.int64)
    inside = values > 0
    return values[inside], lengths[inside]


def _glrlm(index: np.ndarray, gray: np.ndarray, angles: Sequence[float]) -> list[float]:
    """GLRLM features per angle, averaged, in ``GLRLM`` order."""
    num_pixels = int((index > 0).sum())
    per_angle = []
    for angle in angles:
        levels, lengths = _runs(_lines(index, angle))
        per_angle.append(_size_statistics(_count_matrix(levels, lengths, gray.size), gray, num_pixels))
    return [float(v) for v in np.mean(per_angle, axis=0)]


def _glszm(index: np.ndarray, gray: np.ndarray) -> list[float]:
    """GLSZM features (8-connected zones of one level), in ``GLSZM`` order."""
    levels, sizes = [], []
    for level in range(1, gray.size + 1):
        labelled, _ = ndimage.label(index == level, structure=_EIGHT_CONNECTED)
        zone_sizes = np.bincount(labelled.ravel())[1:]
        levels.append(np.full(zone_sizes.size, level))
        sizes.append(zone_sizes)
    counts = _count_matrix(np.concatenate(levels), np.concatenate(sizes), gray.size)
    return [float(v) for v in _size_statistics(counts, gray, int((index > 0).sum()))]


# ---------------------------------------------------------------------------------------------- public


def radiomics_features(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0),
                       bin_width: float = 8.0, distances: Sequence[int] = (1,),
                       angles: Sequence[float] = DEFAULT_ANGLES) -> dict[str, float]:
    """First-order, shape, GLCM, GLRLM and GLSZM features of ``image`` (H, W) inside ``mask`` (H, W).

    ``spacing`` is the (row, column) pixel size in mm; ``bin_width`` is in the image's units;
    ``distances`` (pixels) apply to the GLCM, ``angles`` (radians) to the GLCM and the GLRLM. Pixels
    outside the mask change nothing. Returns ``{name: value}`` in :func:`feature_names` order.
    """
    image, mask = _check_inputs(image, mask, spacing, bin_width, distances)
    levels = np.zeros(mask.shape, dtype=np.int64)
    levels[mask] = _discretise(image[mask], bin_width)
    index, gray = _level_index(levels, mask)
    values = (_first_order(image[mask], levels[mask], spacing[0] * spacing[1]) + _shape(mask, spacing)
              + _glcm(index, gray, [int(d) for d in distances], list(angles)) + _glrlm(index, gray, angles)
              + _glszm(index, gray))
    return dict(zip(feature_names(), (float(v) for v in values), strict=True))


def _feature_row(case: int, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                 **kwargs: object) -> list[float]:
    """One case's features; an error names the case's position in the list."""
    try:
        return list(radiomics_features(image, mask, spacing, **kwargs).values())
    except ValueError as error:
        raise ValueError(f"case {case}: {error}") from error


def feature_matrix(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   spacings: Sequence[Sequence[float]] | None = None, workers: int = 1, **kwargs: object
                   ) -> tuple[np.ndarray, list[str]]:
    """Features of many cases as an (N, F) array with the F names; ``kwargs`` go to :func:`radiomics_features`.

    ``spacings`` defaults to 1 mm pixels. ``workers > 1`` spreads cases over a process pool.
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    spacings = [(1.0, 1.0)] * len(images) if spacings is None else list(spacings)
    if len(spacings) != len(images):
        raise ValueError(f"{len(images)} images but {len(spacings)} spacings")
    job = functools.partial(_feature_row, **kwargs)
    cases = range(len(images))
    if workers > 1 and len(images) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(job, cases, images, masks, spacings))
    else:
        rows = [job(*case) for case in zip(cases, images, masks, spacings, strict=True)]
    names = feature_names()
    return np.asarray(rows, dtype=np.float64).reshape(len(images), len(names)), names
