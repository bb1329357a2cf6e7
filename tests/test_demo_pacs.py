"""The demo PACS's NIfTI -> DICOM conversion keeps every voxel where it was (read back by position)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from oncofusion.io.readers import read_volume
from oncofusion.serving.demo_pacs import nifti_to_dicom_series


def test_series_read_back_is_the_nifti(tmp_path):
    angle = np.radians(20)
    affine = np.array([[-0.7 * np.cos(angle), 0.8 * np.sin(angle), 0.0, 90.0],
                       [-0.7 * np.sin(angle), -0.8 * np.cos(angle), 0.0, 110.0],
                       [0.0, 0.0, 2.5, -40.0],
                       [0.0, 0.0, 0.0, 1.0]])
    volume = np.random.default_rng(0).integers(-1000, 1000, (9, 7, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    nifti_to_dicom_series(tmp_path / "ct.nii.gz", tmp_path / "series", patient_id="SYNTHETIC-ct")
    series = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(series[0].numpy(), volume)
    np.testing.assert_allclose(series.affine.numpy(), affine, atol=1e-5)
