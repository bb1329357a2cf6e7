"""Thyroid nodule morphology on drawn shapes with known answers: the ROI region, the aspect ratio, the
echogenicity contrast, the capsule distance, the lobe third, and the refusals without calibration.

Frames and masks are ``(W, H)``: axis 0 the column x, axis 1 the row y (depth). Spacings are anisotropic
so that a swapped axis or a length in pixels gives a different answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from oncofusion.contract import InvalidRequest, Roi
from oncofusion.models.thyroid_llnm.morphology import (
    aspect_ratio,
    capsule_distance_mm,
    echogenicity_contrast,
    frame_spacing_mm,
    lobe_position,
    lobe_third,
    luminance,
    morphology_scalars,
    nodule_extent_mm,
    ring_mask,
    roi_mask,
)

SHAPE = (120, 100)  # (W, H): 120 columns, 100 rows


def ellipse(shape, center, semi_mm, spacing):
    """Pixels whose centre lies in the ellipse with semi-axes (x, y) in mm."""
    i, j = np.indices(shape)
    x = (i - center[0]) * spacing[0]
    y = (j - center[1]) * spacing[1]
    return (x / semi_mm[0]) ** 2 + (y / semi_mm[1]) ** 2 <= 1.0


def rectangle(shape, columns, rows):
    """Inclusive column range x rows range as a (W, H) mask."""
    mask = np.zeros(shape, bool)
    mask[columns[0] : columns[1] + 1, rows[0] : rows[1] + 1] = True
    return mask


# -- the ROI region ----------------------------------------------------------------------------------
def test_roi_box_is_inclusive_in_any_corner_order_and_clipped():
    expected = rectangle(SHAPE, (10, 19), (30, 34))
    np.testing.assert_array_equal(roi_mask(Roi(box=((10, 30), (19, 34))), SHAPE, (0.2, 0.3)), expected)
    np.testing.assert_array_equal(roi_mask(Roi(box=((19, 34), (10, 30))), SHAPE, None), expected)
    clipped = roi_mask(Roi(box=((-5, 90), (4, 130))), SHAPE, None)
    np.testing.assert_array_equal(clipped, rectangle(SHAPE, (0, 4), (90, 99)))


def test_roi_click_is_a_disc_of_the_radius_in_mm():
    region = roi_mask(Roi(points=[(50, 40)]), SHAPE, (0.25, 0.5), click_radius_mm=1.0)
    columns, rows = np.nonzero(region)
    assert (columns.min(), columns.max()) == (46, 54)  # 1 mm = 4 columns of 0.25 mm
    assert (rows.min(), rows.max()) == (38, 42)  # 1 mm = 2 rows of 0.5 mm
    assert not region[54, 42] and region[50, 42] and region[54, 40]  # a disc, not its box


def test_roi_mask_is_taken_as_drawn():
    drawn = ellipse(SHAPE, (60, 50), (4.0, 3.0), (0.2, 0.3))
    np.testing.assert_array_equal(roi_mask(Roi(mask=drawn.astype(np.uint8)), SHAPE, None), drawn)


@pytest.mark.parametrize(
    "roi, spacing, message",
    [
        (Roi(points=[(50, 40)]), None, r"a click's radius \(5 mm\) is measured in mm, but the frame has no pixel calibration"),
        (Roi(points=[(150, 40)]), (0.2, 0.2), r"ROI point \(150.0, 40.0\) lies outside the 120x100 frame"),
        (Roi(box=((130, 10), (140, 20))), None, "lies outside the 120x100 frame"),
        (Roi(mask=np.zeros((100, 120))), None, "ROI mask is 100x120 but the frame is 120x100"),
        (Roi(mask=np.zeros(SHAPE)), None, "ROI mask is empty"),
        (Roi(points=[(1, 2, 3)]), (0.2, 0.2), "the ROI has 3 dimensions but the frame is 2D"),
        (Roi(), (0.2, 0.2), "no nodule given"),
        (Roi(points=[(50, 40)]), (0.2, 0.0), "pixel size must be two positive numbers"),
    ],
)
def test_roi_refusals_name_the_problem(roi, spacing, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        roi_mask(roi, SHAPE, spacing)
    assert e.value.status_code == 422


# -- shape -------------------------------------------------------------------------------------------
def test_aspect_ratio_of_an_ellipse_is_depth_over_width_in_mm():
    spacing = (0.2, 0.3)
    mask = ellipse(SHAPE, (60, 50), (6.0, 9.0), spacing)  # 6 mm = 30 columns, 9 mm = 30 rows each side
    assert nodule_extent_mm(mask, spacing) == pytest.approx((61 * 0.2, 61 * 0.3))
    assert aspect_ratio(mask, spacing) == pytest.approx(1.5)  # taller than wide
    assert aspect_ratio(mask, None) == pytest.approx(1.0)  # 61 x 61 pixels taken as square
    wide = ellipse(SHAPE, (60, 50), (9.0, 4.5), spacing)  # 45 columns, 15 rows each side
    assert aspect_ratio(wide, spacing) == pytest.approx((31 * 0.3) / (91 * 0.2))


def test_aspect_ratio_of_rectangles_follows_the_spacing():
    box = rectangle(SHAPE, (10, 19), (30, 49))  # 10 columns, 20 rows
    assert aspect_ratio(box, (0.5, 0.25)) == pytest.approx(1.0)
    assert aspect_ratio(box, (0.25, 0.5)) == pytest.approx(4.0)
    assert nodule_extent_mm(box, (0.25, 0.5)) == pytest.approx((2.5, 10.0))
    with pytest.raises(InvalidRequest, match="the nodule's size is measured in mm"):
        nodule_extent_mm(box, None)


# -- echogenicity ------------------------------------------------------------------------------------
def _strip_frame(value_inside: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """A nodule filling columns 0-29 of every row; column 30 + c holds 101 + c outside it."""
    image = np.zeros(SHAPE)
    image[:30] = value_inside
    image[30:] = (101.0 + np.arange(SHAPE[0] - 30))[:, None]
    return image, rectangle(SHAPE, (0, 29), (0, SHAPE[1] - 1))


def test_echogenicity_ring_width_is_in_mm_along_x():
    image, mask = _strip_frame()
    # 2 mm at 0.25 mm per column: the 8 columns 30-37 hold 101..108, mean 104.5
    assert echogenicity_contrast(image, mask, (0.25, 0.5), ring_mm=2.0) == pytest.approx(104.5 - 40.0)
    # at 0.5 mm per column the ring is 4 columns: 101..104
    assert echogenicity_contrast(image, mask, (0.5, 0.25), ring_mm=2.0) == pytest.approx(102.5 - 40.0)
    ring = ring_mask(mask, (0.25, 0.5), 2.0)
    assert ring.sum() == 8 * SHAPE[1] and ring[30:38].all()


def test_echogenicity_of_a_disc_with_known_means_and_sign():
    spacing = (0.2, 0.2)
    nodule = ellipse(SHAPE, (60, 50), (3.0, 3.0), spacing)
    near = ellipse(SHAPE, (60, 50), (6.0, 6.0), spacing)  # the ring (2 mm) lies in this disc
    image = np.where(nodule, 50.0, np.where(near, 130.0, 250.0))
    assert echogenicity_contrast(image, nodule, spacing) == pytest.approx(80.0)  # hypoechoic: positive
    bright = np.where(nodule, 200.0, np.where(near, 130.0, 0.0))
    assert echogenicity_contrast(bright, nodule, spacing) == pytest.approx(-70.0)  # hyperechoic: negative


def test_echogenicity_uses_the_luminance_of_rgb_frames():
    grey, mask = _strip_frame()
    rgb = np.stack([grey, np.zeros(SHAPE), np.zeros(SHAPE)])  # red only: luminance 0.299 R
    np.testing.assert_allclose(luminance(torch.from_numpy(rgb)), 0.299 * grey)
    assert echogenicity_contrast(rgb, mask, (0.25, 0.5)) == pytest.approx(0.299 * (104.5 - 40.0))
    assert echogenicity_contrast(grey[None], mask, (0.25, 0.5)) == pytest.approx(104.5 - 40.0)


def test_echogenicity_refusals():
    image, mask = _strip_frame()
    with pytest.raises(InvalidRequest, match="the echogenicity ring is measured in mm, but the frame has no pixel"):
        echogenicity_contrast(image, mask, None)
    with pytest.raises(InvalidRequest, match="covers the whole frame"):
        echogenicity_contrast(image, np.ones(SHAPE), (0.2, 0.2))
    with pytest.raises(InvalidRequest, match="1 or 3 channels"):
        echogenicity_contrast(np.zeros((2, *SHAPE)), mask, (0.2, 0.2))


# -- capsule -----------------------------------------------------------------------------------------
LOBE = rectangle(SHAPE, (10, 109), (20, 79))


@pytest.mark.parametrize(
    "columns, rows, expected_mm",
    [
        ((40, 59), (30, 49), 10 * 0.3),  # 10 lobe rows above the nodule (3 mm); 30 columns on the left (6 mm)
        ((12, 31), (40, 49), 2 * 0.2),  # 2 lobe columns on the left
        ((60, 69), (50, 77), 2 * 0.3),  # 2 lobe rows below
        ((40, 59), (20, 29), 0.0),  # touching the capsule
        ((40, 59), (15, 29), 0.0),  # crossing it
    ],
)
def test_capsule_distance_to_a_rectangular_lobe(columns, rows, expected_mm):
    nodule = rectangle(SHAPE, columns, rows)
    assert capsule_distance_mm(nodule, LOBE, (0.2, 0.3)) == pytest.approx(expected_mm)


def test_capsule_distance_of_a_disc_from_a_straight_edge():
    spacing = (0.2, 0.2)
    nodule = ellipse(SHAPE, (60, 45), (2.0, 2.0), spacing)  # radius 10 pixels: rows 35-55, columns 50-70
    # lobe rows 20-79: 15 lobe rows above the disc (3 mm), 24 below (4.8 mm), 40 columns left (8 mm)
    assert capsule_distance_mm(nodule, LOBE, spacing) == pytest.approx(3.0)
    # the lobe reaching the frame's top edge: the frame's edge is no capsule, the bottom one counts
    reaching = LOBE | rectangle(SHAPE, (10, 109), (0, 19))
    assert capsule_distance_mm(nodule, reaching, spacing) == pytest.approx(4.8)


def test_capsule_refusals():
    nodule = rectangle(SHAPE, (40, 59), (30, 49))
    with pytest.raises(InvalidRequest, match="the distance to the capsule is measured in mm, but the frame has no"):
        capsule_distance_mm(nodule, LOBE, None)
    with pytest.raises(InvalidRequest, match="does not overlap the thyroid lobe mask"):
        capsule_distance_mm(rectangle(SHAPE, (0, 5), (0, 5)), LOBE, (0.2, 0.2))
    with pytest.raises(InvalidRequest, match="covers the whole frame"):
        capsule_distance_mm(nodule, np.ones(SHAPE), (0.2, 0.2))
    with pytest.raises(InvalidRequest, match="thyroid lobe mask is 100x120 but"):
        capsule_distance_mm(nodule, LOBE.T, (0.2, 0.2))


# -- thirds ------------------------------------------------------------------------------------------
LONG_LOBE = rectangle(SHAPE, (10, 99), (40, 69))  # 90 columns x 30 rows


@pytest.mark.parametrize("column, left, right", [(20, "upper", "lower"), (55, "middle", "middle"), (90, "lower", "upper")])
def test_lobe_third_along_a_longitudinal_lobe(column, left, right):
    nodule = rectangle(SHAPE, (column - 2, column + 2), (50, 56))
    assert lobe_third(nodule, LONG_LOBE) == left  # cranial at the image left (default)
    assert lobe_third(nodule, LONG_LOBE, (0.2, 0.2), cranial="right") == right
    assert lobe_position(nodule, LONG_LOBE, (0.2, 0.2)) == pytest.approx((column - 10) / 89)


def test_lobe_axis_is_found_in_mm():
    nodule = rectangle(SHAPE, (53, 57), (42, 44))  # near the top rows, in the middle columns
    spacing = (0.1, 0.5)  # the lobe is 9 mm wide but 15 mm deep: its long axis runs top-bottom
    assert lobe_third(nodule, LONG_LOBE, spacing, cranial="top") == "upper"
    assert lobe_position(nodule, LONG_LOBE, spacing, cranial="bottom") == pytest.approx((69 - 43) / 29)
    with pytest.raises(InvalidRequest, match=r"runs 90 degrees away from the cranial-caudal direction given \(cranial = image left\)"):
        lobe_third(nodule, LONG_LOBE, spacing)


def test_lobe_third_refusals():
    nodule = rectangle(SHAPE, (53, 57), (50, 56))
    with pytest.raises(InvalidRequest, match="not elongated"):
        lobe_third(nodule, rectangle(SHAPE, (30, 79), (30, 79)))  # a transverse view: round
    with pytest.raises(InvalidRequest, match="cranial must be one of"):
        lobe_third(nodule, LONG_LOBE, cranial="head")


# -- together ----------------------------------------------------------------------------------------
def test_morphology_scalars_together():
    spacing = (0.2, 0.3)
    image = np.full((1, *SHAPE), 120.0)
    nodule = rectangle(SHAPE, (40, 59), (28, 49))  # 20 columns (4 mm) x 22 rows (6.6 mm)
    image[0][nodule] = 45.0
    lobe = rectangle(SHAPE, (10, 109), (20, 59))  # 20 mm x 12 mm; 8 lobe rows above the nodule, 10 below
    roi = Roi(box=((40, 28), (59, 49)))
    without = morphology_scalars(image, roi, spacing)
    assert without["width_mm"] == pytest.approx(4.0) and without["depth_mm"] == pytest.approx(6.6)
    assert without["aspect_ratio"] == pytest.approx(6.6 / 4.0) and without["taller_than_wide"] is True
    assert without["echogenicity_contrast"] == pytest.approx(75.0)
    for key in ("capsule_distance_mm", "capsule_within_2_5_mm", "lobe_position", "lobe_third"):
        assert without[key] is None
    near = morphology_scalars(image, roi, spacing, lobe)
    assert near["capsule_distance_mm"] == pytest.approx(8 * 0.3) and near["capsule_within_2_5_mm"] is True
    assert near["lobe_third"] == "middle" and near["lobe_position"] == pytest.approx((49.5 - 10) / 99)
    far = morphology_scalars(image, Roi(box=((40, 29), (59, 49))), spacing, lobe)
    assert far["capsule_distance_mm"] == pytest.approx(9 * 0.3) and far["capsule_within_2_5_mm"] is False
    upper = morphology_scalars(image, Roi(box=((12, 29), (30, 49))), spacing, lobe, cranial="left")
    assert upper["lobe_third"] == "upper" and upper["capsule_distance_mm"] == pytest.approx(2 * 0.2)
    with pytest.raises(InvalidRequest, match="the nodule morphology .* is measured in mm, but the frame has no pixel"):
        morphology_scalars(image, roi, None)


def test_frame_spacing_comes_from_the_reader_metadata():
    data = torch.zeros(1, *SHAPE)
    calibrated = MetaTensor(data, affine=torch.diag(torch.tensor([0.2, 0.3, 1.0], dtype=torch.float64)),
                            meta={"spacing_source": "ultrasound_region"})
    assert frame_spacing_mm(calibrated) == pytest.approx((0.2, 0.3))
    exported = MetaTensor(data, affine=torch.eye(3, dtype=torch.float64), meta={"spacing_source": "none"})
    assert frame_spacing_mm(exported) is None
