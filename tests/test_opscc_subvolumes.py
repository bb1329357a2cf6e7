"""SMuRF's CT sub-volumes: boxes with a ring in mm, quartile centres, padding, window, flips, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate

from oncofusion.contract import InvalidRequest
from oncofusion.models.opscc_smurf.subvolumes import (
    SOFT_TISSUE_WINDOW_HU,
    CheckRegionMasksd,
    QuartileSubVolumesd,
    RandQuartileSubVolumesd,
    RegionBoxd,
    extract_subvolume,
    quartile_ranges,
    subvolume_transforms,
)

ANISOTROPIC = (0.5, 0.5, 3.0)


def volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> MetaTensor:
    """A channel-first ``(1, X, Y, Z)`` MetaTensor with a diagonal affine."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return MetaTensor(torch.as_tensor(np.asarray(array)[None]), affine=torch.as_tensor(affine))


def box_mask(shape, lo, hi, value=1) -> np.ndarray:
    """A uint8 mask with ``value`` in the inclusive box ``[lo, hi]``."""
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b + 1) for a, b in zip(lo, hi, strict=True))] = value
    return mask


def record(ct_hu=50.0, shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0), tumor=((10, 10, 10), (13, 13, 13)),
           nodes=None) -> dict:
    ct = np.full(shape, ct_hu, np.float32) if np.isscalar(ct_hu) else np.asarray(ct_hu, np.float32)
    data = {"image": volume(ct, spacing), "tumor_mask": volume(box_mask(shape, *tumor), spacing)}
    data["node_mask"] = None if nodes is None else volume(box_mask(shape, *nodes, value=2), spacing)
    return data


def coordinate_ct(shape, axis: int) -> np.ndarray:
    """A CT whose value at each voxel is its index along ``axis``: a sub-volume then shows where it was cut."""
    index = np.arange(shape[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    return np.broadcast_to(index, shape).copy()


# -- the box and its ring ------------------------------------------------------------------------------
def test_ring_is_in_millimetres_on_an_anisotropic_grid():
    shape = (80, 80, 12)
    mask = volume(box_mask(shape, (36, 38, 5), (40, 41, 6)), ANISOTROPIC)
    out = RegionBoxd(keys="tumor_mask", ring_mm=6.0)({"tumor_mask": mask})
    box = out["tumor_mask_box"]
    spacing = np.array(ANISOTROPIC)
    np.testing.assert_allclose((np.array([36, 38, 5]) - box[0]) * spacing, [6.0, 6.0, 6.0])  # 12, 12, 2 voxels
    np.testing.assert_allclose((box[1] - np.array([40, 41, 6])) * spacing, [6.0, 6.0, 6.0])


def test_box_is_clipped_to_the_image():
    shape = (30, 30, 10)
    mask = volume(box_mask(shape, (1, 20, 0), (4, 28, 9)))
    box = RegionBoxd(keys="tumor_mask", ring_mm=15.0)({"tumor_mask": mask})["tumor_mask_box"]
    np.testing.assert_array_equal(box, [[0, 5, 0], [19, 29, 9]])


def test_after_resampling_to_1_mm_the_box_is_the_tumor_extent_in_mm_plus_the_ring():
    shape, (lo, hi), ring = (80, 80, 40), ((36, 38, 17), (41, 43, 18)), 10.0
    data = record(shape=shape, spacing=ANISOTROPIC, tumor=(lo, hi))
    out = subvolume_transforms(False, ring_mm=ring, roi_size=(8, 8), keep_inputs=True)(data)
    affine = np.asarray(out["tumor_mask"].affine)
    np.testing.assert_allclose(np.diag(affine)[:3], [1.0, 1.0, 1.0])
    spacing, origin = np.array(ANISOTROPIC), affine[:3, 3]
    # the tumor voxels cover lo - s/2 .. hi + s/2 mm; the 1 mm voxels whose centres lie in there are the tumor
    first = np.ceil(np.array(lo) * spacing - spacing / 2 - origin)
    last = np.floor(np.array(hi) * spacing + spacing / 2 - origin)
    np.testing.assert_array_equal(out["tumor_mask_box"], [first - ring, last + ring])


@pytest.mark.parametrize("train", [False, True])
def test_cropping_before_resampling_changes_nothing_but_the_size_of_what_is_resampled(train):
    # whole-mm in-plane spacing and 3 mm slices: the cropped 1 mm grid lies on the uncropped one
    shape = (110, 110, 40)
    data = record(ct_hu=np.random.default_rng(2).uniform(-300, 400, shape), shape=shape, spacing=(1.0, 1.0, 3.0),
                  tumor=((50, 52, 18), (54, 56, 19)), nodes=((20, 80, 30), (24, 85, 31)))
    out = {crop: subvolume_transforms(train, roi_size=(64, 48), crop_first=crop, keep_inputs=True, seed=5)(dict(data))
           for crop in (False, True)}
    assert all(a < b for a, b in zip(out[True]["image"].shape[1:], out[False]["image"].shape[1:], strict=True))
    for key in ("ct_tumor", "ct_nodes"):  # sub-volumes reaching past the ring are not cut by the crop
        np.testing.assert_allclose(np.asarray(out[True][key]), np.asarray(out[False][key]), atol=1e-4)
    for key in ("tumor_mask_box", "node_mask_box"):  # the same boxes, in mm
        corners = [np.asarray(o[key]) + np.asarray(o["image"].affine)[:3, 3] for o in out.values()]
        np.testing.assert_allclose(corners[0], corners[1])


def test_labelled_node_mask_with_several_components_gets_one_box_around_all():
    shape = (40, 40, 20)
    nodes = box_mask(shape, (2, 3, 4), (4, 5, 6), value=1) + box_mask(shape, (30, 31, 12), (33, 35, 14), value=3)
    box = RegionBoxd(keys="node_mask", ring_mm=1.0)({"node_mask": volume(nodes)})["node_mask_box"]
    np.testing.assert_array_equal(box, [[1, 2, 3], [34, 36, 15]])


# -- the sub-volumes -----------------------------------------------------------------------------------
def test_inference_centres_are_the_box_centre_and_the_quartile_centres():
    shape, (z0, z1) = (20, 20, 100), (8, 88)
    box = np.array([[4, 6, z0], [9, 13, z1]])
    crop = QuartileSubVolumesd(keys="image", box_key="box", output_key="out", roi_size=(4, 6), depth=4)
    z = crop({"image": volume(coordinate_ct(shape, 2)), "box": box})["out"].numpy()
    x = crop({"image": volume(coordinate_ct(shape, 0)), "box": box})["out"].numpy()
    y = crop({"image": volume(coordinate_ct(shape, 1)), "box": box})["out"].numpy()
    assert z.shape == (4, 4, 6, 4)
    for k in range(4):
        centre = z0 + (z1 - z0) * (2 * k + 1) / 8  # the middle of the k-th quarter
        np.testing.assert_array_equal(z[k, 0, 0], centre + np.arange(-2, 2))  # slices z-2 .. z+1, the authors'
        assert x[k, 4 // 2, 0, 0] == (4 + 9 + 1) // 2 and y[k, 0, 6 // 2, 0] == (6 + 13 + 1) // 2


def test_quartiles_cover_the_box_z_range():
    ranges = quartile_ranges(3, 40)
    assert ranges[0][0] == 3 and ranges[-1][1] == 40
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_training_draws_z_within_each_quartile_and_keeps_a_fitting_sub_volume_in_the_box():
    shape, box = (60, 60, 90), np.array([[10, 20, 5], [41, 45, 85]])
    crop = RandQuartileSubVolumesd(keys="image", box_key="box", output_key="out", roi_size=(16, 8), depth=4)
    crop.set_random_state(seed=0)
    ranges = quartile_ranges(5, 85)
    seen_z = [set() for _ in range(4)]
    for _ in range(25):
        z = crop({"image": volume(coordinate_ct(shape, 2)), "box": box})["out"].numpy()[:, 0, 0, 2]
        x = crop({"image": volume(coordinate_ct(shape, 0)), "box": box})["out"].numpy()[:, :, 0, 0]
        for k, (lo, hi) in enumerate(ranges):
            assert lo <= z[k] <= hi
            seen_z[k].add(int(z[k]))
        assert x.min() >= box[0, 0] and x.max() <= box[1, 0]  # the 16-wide sub-volume stays inside x 10..41
    assert all(len(s) > 3 for s in seen_z)


def test_outside_the_image_is_padded_with_the_pad_value():
    out = extract_subvolume(np.ones((5, 6, 7), np.float32), (1, 5, 0), (4, 4, 4), pad_value=-7.0)
    inside = np.zeros((4, 4, 4), bool)
    inside[1:, :3, 2:] = True  # x -1..2, y 3..6, z -2..1 of which x 0..2, y 3..5, z 0..1 lie in the image
    np.testing.assert_array_equal(out[inside], 1.0)
    np.testing.assert_array_equal(out[~inside], -7.0)


def test_a_tumor_at_the_image_edge_is_padded_with_air():
    shape = (12, 12, 12)
    data = record(ct_hu=50.0, shape=shape, tumor=((0, 0, 0), (1, 1, 1)))
    out = subvolume_transforms(False, ring_mm=0.0, roi_size=(8, 8), depth=4)(data)["ct_tumor"].numpy()
    # box 0..1, centre 1: x and y run -3..4, so 3 of 8 columns are outside; quartile centres z=0 or 1
    outside = np.zeros(out.shape[1:3], bool)
    outside[:3, :] = outside[:, :3] = True
    assert np.all(out[:, outside] == 0.0)  # air, below the window
    assert np.all(out[:, ~outside][..., 2:] == pytest.approx((50 + 150) / 400))


# -- the whole pipeline --------------------------------------------------------------------------------
def test_output_keys_shapes_and_types():
    data = record(shape=(20, 20, 12), spacing=(0.8, 0.8, 2.0), nodes=((2, 2, 2), (4, 4, 3)))
    out = subvolume_transforms(False)(data)
    assert set(out) == {"ct_tumor", "ct_nodes", "ct_nodes_present"}
    for key in ("ct_tumor", "ct_nodes"):
        assert tuple(out[key].shape) == (4, 128, 128, 4) and out[key].dtype == torch.float32
    assert out["ct_nodes_present"] == 1.0
    batch = list_data_collate([out, subvolume_transforms(True, seed=1)(record(shape=(20, 20, 12)))])
    assert tuple(batch["ct_nodes"].shape) == (2, 4, 128, 128, 4)
    np.testing.assert_array_equal(batch["ct_nodes_present"].numpy(), [1.0, 0.0])


@pytest.mark.parametrize("hu", [-1000.0, -150.0, 50.0, 249.0, 250.0, 3000.0])
def test_soft_tissue_window(hu):
    low, high = SOFT_TISSUE_WINDOW_HU
    out = subvolume_transforms(False, roi_size=(4, 4))(record(ct_hu=hu))["ct_tumor"].numpy()
    np.testing.assert_allclose(out, min(max((hu - low) / (high - low), 0.0), 1.0), atol=1e-6)


def test_window_maps_its_ends_to_0_and_1():
    out = subvolume_transforms(False, roi_size=(4, 4), window_hu=(-100.0, 300.0))(record(ct_hu=-100.0))
    assert float(out["ct_tumor"].max()) == 0.0
    out = subvolume_transforms(False, roi_size=(4, 4), window_hu=(-100.0, 300.0))(record(ct_hu=300.0))
    assert float(out["ct_tumor"].min()) == 1.0


@pytest.mark.parametrize("nodes", ["none", "missing", "empty"])
def test_absent_nodes_give_zeros_and_a_presence_flag_of_0(nodes):
    shape = (24, 24, 24)
    data = record(ct_hu=50.0, shape=shape)
    if nodes == "missing":
        del data["node_mask"]
    elif nodes == "empty":
        data["node_mask"] = volume(np.zeros(shape, np.uint8))
    out = subvolume_transforms(False, roi_size=(6, 6))(data)
    assert float(out["ct_nodes"].abs().max()) == 0.0 and out["ct_nodes_present"] == 0.0
    assert float(out["ct_tumor"].min()) > 0.0  # the tumor still reads the CT


def test_inference_is_deterministic_and_training_varies_with_a_seed():
    shape = (40, 40, 40)
    data = record(ct_hu=np.random.default_rng(0).uniform(-150, 250, shape), shape=shape,
                  tumor=((15, 15, 10), (24, 24, 30)), nodes=((2, 2, 2), (8, 8, 8)))
    infer = subvolume_transforms(False, roi_size=(6, 6))
    first, second = infer(dict(data)), infer(dict(data))
    for key in ("ct_tumor", "ct_nodes"):
        torch.testing.assert_close(first[key], second[key])
    # no flips: what varies is where the sub-volumes are cut
    train_a, train_b = (subvolume_transforms(True, roi_size=(6, 6), flip_prob=0.0, seed=3) for _ in range(2))
    a1, b1, a2 = train_a(dict(data)), train_b(dict(data)), train_a(dict(data))
    for key in ("ct_tumor", "ct_nodes"):
        torch.testing.assert_close(a1[key], b1[key])  # same seed, same draws
        assert not torch.equal(a1[key], a2[key])  # the next draw differs
        assert not torch.equal(a1[key], first[key])


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_training_flips_in_plane_the_four_channels_together(flip_prob):
    shape = (30, 30, 20)
    ct = np.random.default_rng(1).uniform(-150, 250, shape)
    # a one-voxel tumor and no ring: the training centres cannot move, only the flips differ
    data = record(ct_hu=ct, shape=shape, tumor=((14, 15, 9), (14, 15, 9)))
    expected = subvolume_transforms(False, ring_mm=0.0, roi_size=(6, 8))(dict(data))["ct_tumor"]
    out = subvolume_transforms(True, ring_mm=0.0, roi_size=(6, 8), flip_prob=flip_prob, seed=0)(dict(data))
    expected = np.asarray(expected)
    np.testing.assert_array_equal(np.asarray(out["ct_tumor"]), np.flip(expected, (1, 2)) if flip_prob else expected)


def test_the_pipeline_can_be_built_from_a_bundle_config():
    parser = ConfigParser({"pre": {"_target_": "oncofusion.models.opscc_smurf.subvolumes.subvolume_transforms",
                                   "train": False, "roi_size": [4, 4]}})
    out = parser.get_parsed_content("pre")(record())
    assert tuple(out["ct_tumor"].shape) == (4, 4, 4, 4)


# -- bad input -----------------------------------------------------------------------------------------
def check(data):
    return CheckRegionMasksd(keys=("tumor_mask", "node_mask"))(data)


def invalid_request(transform, data) -> InvalidRequest:
    """The :class:`InvalidRequest` ``transform(data)`` raises, also from inside MONAI's ``Compose``, which wraps
    it in a ``RuntimeError`` (the server unwraps the cause the same way)."""
    with pytest.raises(Exception) as raised:
        transform(data)
    error = raised.value
    while not isinstance(error, InvalidRequest) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, InvalidRequest), repr(raised.value)
    return error


def test_empty_tumor_mask_is_refused():
    data = record()
    data["tumor_mask"] = volume(np.zeros((24, 24, 24), np.uint8))
    assert "tumor mask 'tumor_mask' is empty" in str(invalid_request(check, data))
    error = invalid_request(subvolume_transforms(False), data)
    assert "tumor mask 'tumor_mask' is empty: draw the primary tumor" in str(error) and error.status_code == 422
    with pytest.raises(InvalidRequest, match="is empty: draw the primary tumor"):
        RegionBoxd(keys="tumor_mask")({"tumor_mask": data["tumor_mask"]})
    del data["tumor_mask"]
    with pytest.raises(InvalidRequest, match="no mask under 'tumor_mask'"):
        check(data)


def test_mask_of_another_shape_is_refused_naming_both_grids():
    data = record(shape=(24, 24, 24))
    data["node_mask"] = volume(box_mask((24, 24, 20), (1, 1, 1), (2, 2, 2)))
    with pytest.raises(InvalidRequest, match=r"'node_mask' is not on the CT's grid: mask 24x24x20 .* CT 24x24x24"):
        check(data)


def test_mask_of_another_spacing_or_origin_is_refused_naming_both():
    data = record(shape=(24, 24, 24))
    data["tumor_mask"] = volume(box_mask((24, 24, 24), (1, 1, 1), (2, 2, 2)), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(InvalidRequest, match=r"mask 24x24x24 voxels of \(1, 1, 3\) mm .* CT 24x24x24 voxels of "
                                             r"\(1, 1, 1\) mm"):
        check(data)
    data["tumor_mask"] = volume(box_mask((24, 24, 24), (1, 1, 1), (2, 2, 2)), origin=(0.0, 0.5, 0.0))
    with pytest.raises(InvalidRequest, match=r"at \(0, 0.5, 0\).* at \(0, 0, 0\)"):
        check(data)
    data["tumor_mask"] = volume(box_mask((24, 24, 24), (1, 1, 1), (2, 2, 2)), origin=(0.0, 1e-5, 0.0))
    check(data)  # float rounding of an exported header is within tolerance


@pytest.mark.parametrize("shape", [(1, 24, 24), (24, 24, 24), (2, 24, 24, 24), (1, 1, 24, 24, 24)])
def test_a_ct_that_is_not_one_3d_volume_is_refused(shape):
    data = record()
    data["image"] = MetaTensor(torch.zeros(shape))
    with pytest.raises(InvalidRequest, match=r"must be one 3D volume, channel first \(1, X, Y, Z\), got shape"):
        check(data)


def test_a_mask_that_is_not_3d_or_a_ct_without_affine_is_refused():
    data = record()
    data["tumor_mask"] = MetaTensor(torch.ones((1, 24, 24)))
    with pytest.raises(InvalidRequest, match=r"mask 'tumor_mask' must be one 3D volume"):
        check(data)
    data = record()
    data["image"] = torch.zeros((1, 24, 24, 24))
    with pytest.raises(InvalidRequest, match="carries no affine"):
        check(data)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ring_mm must be >= 0"):
        RegionBoxd(keys="tumor_mask", ring_mm=-1.0)
    with pytest.raises(ValueError, match="roi_size must be two positive"):
        QuartileSubVolumesd(keys="ct", box_key="b", output_key="o", roi_size=(4, 4, 4))
