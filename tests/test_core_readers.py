"""Volume reading: the geometry a MetaTensor carries, status codes and messages that name only the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from monai.utils import SpaceKeys

from oncofusion.contract import InvalidRequest
from oncofusion.io.readers import _reason, image_affine, read_image, read_volume
from tests.dicom_series import write_ct_series

AFFINE = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 5], [0, 0, 4.0, 1], [0, 0, 0, 1]])


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path




def _refusal(call, *args, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        call(*args, **kwargs)
    return e.value


def test_a_nifti_volume_carries_its_file_shape_and_no_channel(tmp_path):
    path = _nifti(tmp_path / "ct.nii.gz", np.zeros((3, 4, 5), np.int16))
    image = read_volume(path)
    assert image.meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(image.meta["spatial_shape"], [3, 4, 5])
    assert np.isnan(image.meta["original_channel_dim"])
    np.testing.assert_allclose(image.affine.numpy(), AFFINE)


def test_a_dicom_series_carries_its_affine_twice_and_ras_space(tmp_path):
    image = read_volume(write_ct_series(tmp_path / "series"))
    assert image.meta["space"] == SpaceKeys.RAS
    np.testing.assert_allclose(np.asarray(image.meta["original_affine"]), image.affine.numpy())
    np.testing.assert_array_equal(image.meta["spatial_shape"], [5, 4, 3])
    assert np.isnan(image.meta["original_channel_dim"])  # MONAI's "no channel"
    assert float(image[0, 0, 0, 2]) == 2.0


@pytest.mark.parametrize("space, expected", [("left-posterior-superior", "RAS"), ("scanner-xyz", "scanner-xyz")])
def test_an_nrrd_volume_carries_its_affine_twice_and_its_space(tmp_path, space, expected):
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), np.zeros((3, 4, 5), np.int16),
               {"space": space, "space directions": np.eye(3) * 2, "space origin": np.ones(3)})
    image = read_volume(path)
    assert image.meta["space"] == expected
    np.testing.assert_allclose(np.asarray(image.meta["original_affine"]), image.affine.numpy())


def test_reading_messages_say_what_is_read(tmp_path):
    (tmp_path / "empty").mkdir()
    error = _refusal(read_volume, tmp_path / "empty", "label mask")
    assert str(error).startswith("label mask 'empty' holds no DICOM image files")
    assert error.status_code == 415
    error = _refusal(read_volume, tmp_path / "gone.nii.gz", what="label mask")
    assert str(error) == "label mask 'gone.nii.gz' not found" and error.status_code == 400


def test_an_unreadable_nifti_gives_the_decoder_reason_without_folders(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a nifti file")
    error = _refusal(read_volume, tmp_path / "broken.nii.gz")
    assert str(error) == "cannot read image 'broken.nii.gz' with NibabelReader: File broken.nii.gz is not a gzip file"
    assert error.status_code == 415
    error = _refusal(image_affine, tmp_path / "broken.nii.gz")
    assert str(error) == "cannot read the header of 'broken.nii.gz': File broken.nii.gz is not a gzip file"
    assert error.status_code == 415


def test_an_unreadable_nrrd_gives_the_decoder_reason(tmp_path):
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    error = _refusal(read_volume, tmp_path / "broken.nrrd")
    assert str(error).startswith("cannot read image 'broken.nrrd' as NRRD: ")
    assert not str(error).endswith(": None") and error.status_code == 415
    error = _refusal(image_affine, tmp_path / "broken.nrrd")
    assert str(error) == "cannot read the header of 'broken.nrrd': 'dimension'" and error.status_code == 415


def test_the_reason_of_an_error_is_its_first_line_or_its_type(tmp_path):
    path = tmp_path / "scan.nii"
    assert _reason(ValueError(f"bad header in {path}\nmore detail"), path) == "bad header in scan.nii"
    assert _reason(KeyError(), path) == "KeyError"
    assert _reason(OSError("  \n "), path) == "OSError"


def test_voxels_that_are_no_numbers_are_415(tmp_path):
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, AFFINE), str(path))
    error = _refusal(read_volume, path, "label mask")
    assert str(error).startswith("label mask 'rgb.nii.gz' holds non-numeric voxels (Cannot cast array data from ")
    assert str(tmp_path) not in str(error) and error.status_code == 415


def test_wrong_shapes_and_nan_voxels_are_422(tmp_path):
    error = _refusal(read_volume, _nifti(tmp_path / "flat.nii.gz", np.zeros((3, 4, 1, 1), np.float32)))
    assert str(error) == ("image 'flat.nii.gz' has shape 3x4x1: a 3D volume (I, J, K) with at least 2 voxels along "
                          "each axis is required")
    assert error.status_code == 422
    volume = np.zeros((3, 4, 5), np.float32)
    volume[0, 0, 0] = np.inf
    error = _refusal(read_volume, _nifti(tmp_path / "inf.nii.gz", volume))
    assert str(error) == "image 'inf.nii.gz' contains 1 NaN/infinite voxels: re-export the volume"
    assert error.status_code == 422


def test_image_affine_of_an_unsupported_file_is_refused(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    error = _refusal(image_affine, tmp_path / "photo.png")
    assert str(error).startswith("unsupported image format for 'photo.png'") and error.status_code == 415


def test_image_affine_reads_nifti_and_nrrd_headers(tmp_path):
    affine = image_affine(_nifti(tmp_path / "ct.nii", np.zeros((3, 4, 5), np.int16)))
    assert affine.dtype == np.float64
    np.testing.assert_allclose(affine, AFFINE)
    nrrd.write(str(tmp_path / "ct.nrrd"), np.zeros((3, 4, 5), np.int16),
               {"space": "right-anterior-superior", "space directions": np.eye(3) * 2, "space origin": np.ones(3)})
    np.testing.assert_allclose(image_affine(tmp_path / "ct.nrrd"), read_volume(tmp_path / "ct.nrrd").affine.numpy())


def test_read_image_reads_a_volume_by_default(tmp_path):
    path = _nifti(tmp_path / "ct.nii.gz", np.ones((3, 4, 5), np.float32))
    image = read_image(path)
    assert tuple(image.shape) == (1, 3, 4, 5)
    assert tuple(read_image(path, what="label mask").shape) == (1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"unknown image reader kind 'mesh': use one of frame, slide, volume"):
        read_image(path, "mesh")
