"""Label writers: the voxel a model marks is where the viewer shows it, in NIfTI and in NRRD (OHIF)."""

from __future__ import annotations

import gzip

import nibabel as nib
import nrrd
import numpy as np
import pytest

from oncofusion.contract import InvalidRequest
from oncofusion.serving.writers import affine_4x4, label_array, label_extension, write_label
from tests.serving_fakes import read_label_file

# an oblique, anisotropic, translated grid: swapped or flipped axes cannot pass
ANGLE = np.radians(25)
AFFINE = np.array([[0.7 * np.cos(ANGLE), -0.8 * np.sin(ANGLE), 0.0, -120.0],
                   [0.7 * np.sin(ANGLE), 0.8 * np.cos(ANGLE), 0.0, 35.5],
                   [0.0, 0.0, 2.5, -60.0],
                   [0.0, 0.0, 0.0, 1.0]])
SHAPE = (9, 7, 5)
MARK = (6, 2, 3)


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[MARK] = 1
    label[0, 0, 0] = 2
    return label


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".nii"])
def test_marked_voxel_keeps_its_world_position(extension):
    path = write_label(_label(), AFFINE, SHAPE, extension)
    assert path.endswith(extension)
    data, affine = read_label_file(path)
    assert data.shape == SHAPE and data.dtype == np.uint8
    assert np.argwhere(data == 1).tolist() == [list(MARK)]
    np.testing.assert_allclose(affine @ [*MARK, 1], AFFINE @ [*MARK, 1], atol=1e-6)


def test_nrrd_is_in_lps_with_the_image_geometry():
    _, header = nrrd.read(write_label(_label(), AFFINE, SHAPE, ".nrrd", compress=False))
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "raw"
    lps = np.diag([-1, -1, 1]) @ AFFINE[:3, :3]
    np.testing.assert_allclose(np.asarray(header["space directions"]), lps.T, atol=1e-9)
    np.testing.assert_allclose(header["space origin"], [120.0, -35.5, -60.0])


def test_nrrd_compression_follows_the_request():
    path = write_label(_label(), AFFINE, SHAPE, ".nrrd", compress=True)
    _, header = nrrd.read(path)
    assert header["encoding"] == "gzip"
    raw = open(path, "rb").read()
    assert raw.startswith(b"NRRD") and gzip.decompress(raw.split(b"\n\n", 1)[1])  # header, then gzip data


def test_a_2d_label_is_written_as_2d():
    affine = np.array([[0.1, 0.0, 5.0], [0.0, 0.2, -3.0], [0.0, 0.0, 1.0]])
    label = np.zeros((6, 4), np.uint8)
    label[5, 1] = 1
    data, ras = read_label_file(write_label(label, affine, (6, 4), ".nrrd"))
    assert data.shape == (6, 4) and data[5, 1] == 1
    np.testing.assert_allclose((ras @ [5, 1, 0, 1])[:2], [5.5, -2.8])


def test_label_of_another_shape_and_unknown_formats_are_refused():
    with pytest.raises(RuntimeError, match="expected the image shape"):
        write_label(np.zeros((2, 2, 2)), AFFINE, SHAPE)
    assert label_extension({"result_extension": ".NRRD"}) == ".nrrd"
    assert label_extension({}) == ".nii.gz"
    with pytest.raises(InvalidRequest, match="'.dcm' is not offered"):
        label_extension({"result_extension": ".dcm"})


@pytest.mark.parametrize("extension", [".nii.gz", ".nii"])
@pytest.mark.parametrize("label", [_label(), (np.arange(42, dtype=np.int16).reshape(6, 7) * 40)],
                         ids=["3d_uint8", "2d_int16"])
def test_nifti_file_holds_exactly_what_nibabel_writes(tmp_path, extension, label):
    """The fast writer streams the voxels itself; the file must still be nibabel's, byte for byte."""
    affine = AFFINE if label.ndim == 3 else np.array([[0.1, 0.0, 5.0], [0.0, 0.2, -3.0], [0.0, 0.0, 1.0]])
    path = write_label(label, affine, label.shape, extension)
    reference = nib.Nifti1Image(label_array(label, label.shape), affine_4x4(affine))
    reference.set_qform(reference.affine, code=1)
    reference.set_sform(reference.affine, code=1)
    raw = open(path, "rb").read()
    assert (gzip.decompress(raw) if extension == ".nii.gz" else raw) == reference.to_bytes()
