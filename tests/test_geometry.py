"""The 1 mm LPS cube around a world point."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from oncofusion.transforms.geometry import ResampleCube, ResampleCubed, voxel_to_world, world_to_voxel


def _image_with_blob(affine: np.ndarray, blob_ijk: tuple[int, int, int], shape=(60, 50, 40)) -> MetaTensor:
    volume = np.full(shape, -1000.0, np.float32)
    i, j, k = blob_ijk
    volume[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 500.0
    return MetaTensor(torch.from_numpy(volume)[None], affine=torch.from_numpy(affine))


def test_world_voxel_round_trip():
    affine = np.array([[0.7, 0, 0, -40], [0, -0.7, 0, 20], [0, 0, 2.5, -100], [0, 0, 0, 1]])
    points = np.array([[3.0, 4.0, 5.0], [10.5, 0.0, 7.25]])
    np.testing.assert_allclose(world_to_voxel(affine, voxel_to_world(affine, points)), points)


def test_cube_is_centred_and_runs_along_lps():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])  # RAS, 1 mm
    image = _image_with_blob(affine, (40, 25, 20))
    # the cube is centred 10 mm to the left of the blob (RAS +x points to the patient's right)
    center = voxel_to_world(affine, np.array([[30, 25, 20]]))[0]
    cube = ResampleCube(size=32, spacing=1.0)(image, center)
    assert cube.shape == (1, 32, 32, 32)
    # so along the cube's first axis, which runs towards the left (L), the blob sits 10 voxels early
    blob = np.argwhere(cube[0].numpy() > 0).mean(axis=0)
    np.testing.assert_allclose(blob, (16 - 10, 16, 16))
    # cube affine maps its centre voxel back to the requested world point
    np.testing.assert_allclose(voxel_to_world(cube.affine.numpy(), np.array([[16, 16, 16]]))[0], center)


def test_anisotropic_spacing_is_resampled_to_one_millimetre():
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    image = _image_with_blob(affine, (30, 25, 20))
    center = voxel_to_world(affine, np.array([[30, 25, 20]]))[0]
    cube = ResampleCube(size=16, spacing=1.0)(image, center)
    assert float(cube[0, 8, 8, 8]) == pytest.approx(500.0)
    # 3 voxels of 0.5 mm = 1.5 mm wide in x; 3 voxels of 2 mm = 6 mm deep in z
    assert float(cube[0, 8 + 3, 8, 8]) < -900
    assert float(cube[0, 8, 8, 8 + 2]) == pytest.approx(500.0)


def test_outside_the_scan_is_padded_with_air():
    image = _image_with_blob(np.eye(4), (30, 25, 20))
    cube = ResampleCubed("image", size=20, padding_value=-1000.0)({"image": image, "center_mm": [0.0, 0.0, 0.0]})
    assert float(cube["image"][0, 0, 0, 0]) == -1000.0


def test_rejects_bad_shapes_and_centres():
    image = _image_with_blob(np.eye(4), (30, 25, 20))
    with pytest.raises(ValueError, match="single-channel 3D"):
        ResampleCube()(image[0], [0, 0, 0])
    with pytest.raises(ValueError, match="not a finite point"):
        ResampleCube()(image, [float("nan"), 0, 0])


def test_box_label_marks_the_cube_the_views_were_cut_from():
    from oncofusion.models.lung_nodule.predictor import box_label

    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    image = _image_with_blob(affine, (30, 25, 20))
    center = voxel_to_world(affine, np.array([[30, 25, 20]]))[0]
    mask = box_label(image, center, size_mm=10.0)
    assert mask.shape == (60, 50, 40) and mask.flags.f_contiguous
    # +-5 mm: 21 voxels of 0.5 mm, 11 of 1 mm, 5 of 2 mm
    assert mask.sum() == 21 * 11 * 5
    extent = np.argwhere(mask)
    np.testing.assert_array_equal(extent.min(0), [20, 20, 18])
    np.testing.assert_array_equal(extent.max(0), [40, 30, 22])


def test_training_reads_a_nifti_as_monai_and_the_server_do(tmp_path):
    """ReadImaged (the server's reader) gives the array and affine MONAI's LoadImaged gives for NIfTI."""
    import nibabel as nib
    from monai.transforms import LoadImaged

    from oncofusion.transforms.io import ReadImaged

    affine = np.array([[-0.7, 0, 0, 90.0], [0, 0.8, 0, -20.0], [0, 0, 1.5, 33.0], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).integers(-1000, 1000, (9, 7, 5)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    ours = ReadImaged("image", kind="volume")({"image": str(path), "label": 1})
    monai_ = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": str(path)})
    assert ours["label"] == 1 and ours["image"].dtype == monai_["image"].dtype == torch.float32
    np.testing.assert_array_equal(ours["image"].numpy(), monai_["image"].numpy())
    np.testing.assert_allclose(ours["image"].affine.numpy(), monai_["image"].affine.numpy())
    np.testing.assert_array_equal(ours["image"][0].numpy(), volume)
