"""The nine views: the bundle's preprocessing against an independent re-implementation of the authors'
recipe on an asymmetric phantom, where they land anatomically, and the geometry of the direct sampling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Orientation, Transpose
from scipy.ndimage import gaussian_filter, rotate, zoom

from oncofusion.models.lung_nodule.nine_views import (
    NUM_VIEWS,
    NineViewsd,
    extract_nine_views,
    reference_nine_views,
)

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "lung_nodule_clip" / "configs"
SIZE = 64
C = SIZE // 2

# --- the authors' recipe, step by step as their code runs it ------------------------------------------
AUTHORS_CUBE = 100  # their crop, in 1 mm voxels
AUTHORS_VIEW = 50  # their 2D crop


def _authors_cube(scan: MetaTensor, center_ras: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Orientationd(axcodes="LPS") -> seed crop zero-padded in HU -> Transposed(0, 3, 2, 1) -> clip and scale.

    The phantom is already 1 mm isotropic, so their Spacingd(pixdim=1) is the identity and left out.
    """
    image = Orientation(axcodes="LPS")(scan)
    voxel = np.linalg.inv(image.affine.numpy()) @ np.append(center_ras, 1.0)
    center = [int(x) for x in voxel[:3]]
    starts = [c - AUTHORS_CUBE // 2 for c in center]
    ends = [c + (AUTHORS_CUBE + 1) // 2 for c in center]
    lows = [max(s, 0) for s in starts]
    highs = [min(e, n) for e, n in zip(ends, image.shape[1:], strict=True)]
    patch = image[:, lows[0] : highs[0], lows[1] : highs[1], lows[2] : highs[2]].numpy()
    pad = [(0, 0)] + [(lo - s, e - hi) for s, e, lo, hi in zip(starts, ends, lows, highs, strict=True)]
    patch = np.pad(patch, pad, mode="constant", constant_values=0)  # 0 HU, before the window
    cube = Transpose(indices=(0, 3, 2, 1))(patch)[0]  # (C, L, P, S) -> (S, P, L)
    low, high = hu_window
    return (np.clip(cube, low, high) - low) / (high - low)


def _authors_planes(img: np.ndarray) -> list[np.ndarray]:
    """Their nine uncropped planes: the three axis planes, then the cube rotated by 45 degrees three times."""
    c = img.shape[0] // 2
    rotated_02 = rotate(img, 45, axes=(0, 2), reshape=False)
    rotated_12 = rotate(img, 45, axes=(1, 2), reshape=False)
    rotated_01 = rotate(img, 45, axes=(0, 1), reshape=False)
    return [
        img[c, :, :], img[:, c, :], img[:, :, c],
        rotated_02[c, :, :], rotated_02[:, :, c],
        rotated_01[c, :, :], rotated_01[:, c, :],
        rotated_12[:, c, :], rotated_12[:, :, c],
    ]  # fmt: skip


def _authors_crop_and_resize(plane: np.ndarray, shift: tuple[int, int], output_size: int) -> np.ndarray:
    """Their 2D crop (centre - 25, moved by the training jitter) and linear ``zoom`` to the output size."""
    start = np.array(plane.shape) // 2 - AUTHORS_VIEW // 2 + np.asarray(shift)
    crop = plane[start[0] : start[0] + AUTHORS_VIEW, start[1] : start[1] + AUTHORS_VIEW]
    return zoom(crop, [output_size / AUTHORS_VIEW] * 2, order=1)


# --- an asymmetric phantom: textured lung with a nodule and three blobs at known L, P, S offsets -----------
SCAN_SHAPE = (80, 80, 80)  # stored R-A-S, as NIfTI usually is
SCAN_ORIGIN = np.array([-40.0, -40.0, -120.0])
NODULE_INDEX = np.array([40, 44, 60])  # 20 mm below the top of the scan: the views reach past it
BLOBS_LPS_MM = {"left": ((12, 0, 0), 300.0), "posterior": ((0, 8, 0), 100.0), "superior": ((0, 0, 16), 200.0)}
LPS_TO_RAS = np.array([-1, -1, 1])


def _ball(shape, center, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(center), axis=-1) <= radius


@pytest.fixture(scope="module")
def phantom():
    noise = gaussian_filter(np.random.default_rng(0).normal(size=SCAN_SHAPE), 2.0)
    hu = -700.0 + 150.0 * noise / noise.std()
    hu[_ball(SCAN_SHAPE, NODULE_INDEX, 4)] = 40.0
    for offset_lps, value in BLOBS_LPS_MM.values():
        hu[_ball(SCAN_SHAPE, NODULE_INDEX + LPS_TO_RAS * np.asarray(offset_lps), 3)] = value
    affine = np.eye(4)
    affine[:3, 3] = SCAN_ORIGIN
    scan = MetaTensor(torch.from_numpy(hu.astype(np.float32))[None], affine=torch.from_numpy(affine))
    return scan, SCAN_ORIGIN + NODULE_INDEX


def _bundle(config: str, sections: dict, target: str, overrides: dict | None = None) -> object:
    """Instantiate ``target`` from a bundle config's numeric settings plus ``sections`` (no model imports)."""
    full = json.loads((CONFIGS / config).read_text())
    numbers = {
        key: value for key, value in full.items()
        if isinstance(value, (int, float)) or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))
    }  # fmt: skip
    return ConfigParser(numbers | sections | (overrides or {})).get_parsed_content(target)


def _bundle_inference_views(
    scan: MetaTensor, center_ras: np.ndarray, overrides: dict | None = None
) -> np.ndarray:
    inference = json.loads((CONFIGS / "inference.json").read_text())
    preprocessing = _bundle(
        "inference.json", {"preprocessing": inference["preprocessing"]}, "preprocessing", overrides
    )
    return np.asarray(preprocessing({"image": scan, "center_mm": center_ras.tolist()})["image"])


def test_bundle_inference_views_are_the_authors_views(phantom):
    """Same views, same order, same orientation as the authors' code, from the same scan and click."""
    scan, center = phantom
    ours = _bundle_inference_views(scan, center)
    hu_window = json.loads((CONFIGS / "inference.json").read_text())["hu_window"]
    planes = _authors_planes(_authors_cube(scan, center, hu_window))
    theirs = np.stack([_authors_crop_and_resize(plane, (0, 0), ours.shape[-1]) for plane in planes])
    assert ours.shape == theirs.shape == (NUM_VIEWS, ours.shape[-1], ours.shape[-1])
    # our 64 mm cube against their 100 mm one: the spline prefilter's boundary is too far away to matter
    for view, (mine, authors) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(mine, authors, atol=1e-4, err_msg=f"view {view}")


def test_training_views_are_the_authors_views_shifted_in_plane_only(phantom):
    """Training moves each view's crop by an integer in [-5, 5) in both directions, and nothing else."""
    scan, center = phantom
    train = json.loads((CONFIGS / "train.json").read_text())
    steps = [
        t for t in train["cube_transforms"] if t.get("keys") == "image" and "ReadImage" not in t["_target_"]
    ]
    pipeline = _bundle(
        "train.json",
        {"pipeline": {"_target_": "Compose", "transforms": [*steps, train["train"]["views"]]}},
        "pipeline",
        {"view_pixels": train["view_size_mm"]},  # 1 px = 1 mm
    )
    planes = _authors_planes(_authors_cube(scan, center, train["hu_window"]))
    candidates = [(rows, cols) for rows in range(-5, 5) for cols in range(-5, 5)]
    seen = set()
    for seed in range(3):
        views = pipeline.set_random_state(seed=seed)({"image": scan, "center_mm": center.tolist()})["image"]
        for view, plane in zip(np.asarray(views), planes, strict=True):
            errors = [
                np.abs(view - _authors_crop_and_resize(plane, s, AUTHORS_VIEW)).max() for s in candidates
            ]
            best = int(np.argmin(errors))
            assert errors[best] < 1e-4, (
                f"no in-plane shift in [-5, 5) reproduces this training view ({errors[best]})"
            )
            seen.add(candidates[best])
    assert len(seen) > 5  # the shifts do vary


def _pixel(view: np.ndarray, offset_rows: int, offset_cols: int) -> float:
    centre = view.shape[0] // 2
    return float(view[centre + offset_rows, centre + offset_cols])


def test_views_are_oriented_as_the_authors(phantom):
    """Axial view 0: rows run anterior -> posterior, columns right -> left (the radiological display).
    Coronal view 1: rows inferior -> superior, columns right -> left. Sagittal view 2: rows inferior ->
    superior, columns anterior -> posterior."""
    scan, center = phantom
    views = _bundle_inference_views(scan, center, {"view_pixels": 50})  # 1 px = 1 mm
    window = json.loads((CONFIGS / "inference.json").read_text())["hu_window"]
    level = {name: (value - window[0]) / (window[1] - window[0]) for name, (_, value) in BLOBS_LPS_MM.items()}
    axial, coronal, sagittal = views[:3]
    # (view, rows down, columns right from the nodule, blob seen there)
    expected = (
        (axial, 0, 12, "left"), (axial, 8, 0, "posterior"),
        (coronal, 16, 0, "superior"), (coronal, 0, 12, "left"),
        (sagittal, 16, 0, "superior"), (sagittal, 0, 8, "posterior"),
    )  # fmt: skip
    for view, rows, cols, blob in expected:
        assert _pixel(view, rows, cols) == pytest.approx(level[blob], abs=1e-3)
        # the mirrored and the transposed places hold lung, not the blob
        assert _pixel(view, -rows, -cols) < 0.5 and _pixel(view, cols, rows) < 0.5
    # 0 HU outside the scan (20 mm above the nodule), as the authors pad, not air
    assert _pixel(coronal, 22, 0) == pytest.approx(-window[0] / (window[1] - window[0]), abs=1e-3)


def test_views_refuse_a_cube_that_is_not_lps():
    cube = MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.eye(4))  # R-A-S axes
    with pytest.raises(ValueError, match="LPS"):
        NineViewsd("image", view_size=4, output_size=4)({"image": cube})


# --- geometry of the direct sampling on an (S, P, L) cube ------------------------------------------------
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
