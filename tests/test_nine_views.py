"""Geometry of the nine views, on analytic phantoms and against the authors' rotate-and-slice recipe."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from oncofusion.models.lung_nodule.nine_views import (
    NUM_VIEWS,
    NineViewsd,
    extract_nine_views,
    reference_nine_views,
)

SIZE = 64
C = SIZE // 2


def _line_phantom(direction: tuple[int, int, int]) -> np.ndarray:
    """A one-voxel-wide bright line through the cube centre along an integer direction."""
    cube = np.zeros((SIZE, SIZE, SIZE), np.float32)
    step = np.asarray(direction)
    for t in range(-20, 21):
        i, j, k = np.array([C, C, C]) + t * step
        cube[i, j, k] = 1.0
    return cube


def test_axis_line_is_a_point_in_its_normal_plane_and_a_line_in_the_others():
    views = extract_nine_views(_line_phantom((1, 0, 0)), view_size=40, output_size=40, order=1)
    c = 20
    # the plane normal to axis 0 cuts the line in one voxel, at the view centre
    assert views[0][c, c] == pytest.approx(1.0)
    assert views[0].sum() == pytest.approx(1.0)
    # planes normal to axes 1 and 2 contain it: a full column (axis 0 is their first in-plane axis)
    for view in (views[1], views[2]):
        assert np.allclose(view[:, c], 1.0)
        assert view.sum() == pytest.approx(40.0)


@pytest.mark.parametrize(
    ("direction", "view_with_line", "line_axis"),
    [((1, 0, -1), 4, 0), ((1, -1, 0), 6, 0), ((0, 1, -1), 8, 1)],
)
def test_diagonal_line_is_straightened_by_its_45_degree_rotation(direction, view_with_line, line_axis):
    """A 45-degree line in an axis plane becomes axis-aligned in that plane's rotated views."""
    views = extract_nine_views(_line_phantom(direction), view_size=40, output_size=40, order=1)
    profile = views[view_with_line].take(20, axis=1 - line_axis)
    # bright all along the centre line of the view (linear interpolation of a sqrt(2)-spaced voxel line)
    assert profile[5:35].min() > 0.4
    # and dark away from it
    off_line = views[view_with_line].take(5, axis=1 - line_axis)
    assert off_line.max() < 0.05
    # in the unrotated orthogonal planes the same line is never seen as a full line
    for orthogonal in views[:3]:
        assert (orthogonal > 0.4).sum(axis=line_axis).max() < 30


@pytest.mark.parametrize("order", [1, 3])
def test_direct_sampling_equals_rotate_and_slice_reference(order):
    rng = np.random.default_rng(0)
    cube = gaussian_filter(rng.normal(size=(SIZE, SIZE, SIZE)), 2).astype(np.float32)
    fast = extract_nine_views(cube, view_size=32, output_size=32, order=order)
    reference = reference_nine_views(cube, view_size=32, order=order)
    assert fast.shape == (NUM_VIEWS, 32, 32)
    np.testing.assert_allclose(fast, reference, atol=1e-5)


def test_resize_keeps_corners_and_output_shape():
    cube = gaussian_filter(np.random.default_rng(1).normal(size=(SIZE,) * 3), 2).astype(np.float32)
    small = extract_nine_views(cube, view_size=32, output_size=32, order=1)
    large = extract_nine_views(cube, view_size=32, output_size=63, order=1)
    assert large.shape == (NUM_VIEWS, 63, 63)
    np.testing.assert_allclose(large[:, 0, 0], small[:, 0, 0], atol=1e-6)
    np.testing.assert_allclose(large[:, -1, -1], small[:, -1, -1], atol=1e-6)
    np.testing.assert_allclose(large[:, 32, 32], small[:, 16, 16], atol=1e-6)


def test_training_shifts_move_the_views_and_are_seeded():
    cube = gaussian_filter(np.random.default_rng(2).normal(size=(SIZE,) * 3), 2).astype(np.float32)
    data = {"image": torch.from_numpy(cube)[None]}
    still = NineViewsd("image", view_size=32, output_size=32, order=1)(data)["image"]
    moving = NineViewsd("image", view_size=32, output_size=32, order=1, max_shift=5, max_slice_shift=3)
    first = moving.set_random_state(seed=7)(data)["image"]
    again = moving.set_random_state(seed=7)(data)["image"]
    assert still.shape == (NUM_VIEWS, 32, 32)
    assert torch.equal(first, again)
    assert not torch.allclose(first, still)


@pytest.mark.parametrize(("order", "tolerance"), [(1, 1e-6), (3, 2e-3)])
def test_a_64_mm_cube_holds_every_sample_the_shifted_views_reach(order, tolerance):
    """The bundles crop 64 mm instead of the authors' 100 mm: the nine views must not notice."""
    rng = np.random.default_rng(3)
    large = gaussian_filter(rng.normal(size=(100, 100, 100)), 2).astype(np.float32)
    small = large[18:82, 18:82, 18:82]
    shifts = np.array([[-5, 4]] * 9)
    offsets = np.array([-3, 2, -3, 2, -3, 2, -3, 2, -3])
    from_large = extract_nine_views(large, 50, 50, order, offsets, shifts)
    from_small = extract_nine_views(small, 50, 50, order, offsets, shifts)
    np.testing.assert_allclose(from_small, from_large, atol=tolerance * np.abs(large).max())
