"""Inputs as users have them (a real CT DICOM series) and the command line's answers to bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from oncofusion.cli import main
from oncofusion.io.readers import read_volume
from tests.serving_fakes import make_datastore, make_fake_bundle

NUM_SLICES = 6
SLICE_STEP_MM = 2.5


def _real_ct_slice() -> Path:
    """A real 512x512 CT slice shipped by the pydicom-data package (installed as ``data_store``)."""
    spec = importlib.util.find_spec("data_store")
    assert spec is not None and spec.submodule_search_locations, "pydicom-data (dev extra) is not installed"
    return Path(spec.submodule_search_locations[0]) / "data" / "693_UNCR.dcm"


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> tuple[Path, pydicom.Dataset]:
    """A DICOM series folder: the real slice's header and pixels, restacked along z."""
    folder = tmp_path_factory.mktemp("ct_series")
    source = pydicom.dcmread(_real_ct_slice())
    series_uid = generate_uid()
    origin = [float(v) for v in source.ImagePositionPatient]
    for index in range(NUM_SLICES):
        ds = pydicom.dcmread(_real_ct_slice())
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + index * SLICE_STEP_MM]
        ds.SliceLocation = origin[2] + index * SLICE_STEP_MM
        ds.save_as(folder / f"slice_{index:03d}.dcm")
    return folder, source


def test_dicom_series_folder_reads_as_a_3d_volume_in_hounsfield_units(ct_series):
    folder, source = ct_series
    volume = read_volume(folder)
    assert volume.shape[0] == 1 and sorted(volume.shape[1:]) == sorted([source.Rows, source.Columns, NUM_SLICES])
    spacing = np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(sorted(spacing), sorted([*map(float, source.PixelSpacing), SLICE_STEP_MM]), rtol=1e-4)
    hounsfield = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    assert float(volume.min()) == pytest.approx(hounsfield.min())
    assert float(volume.max()) == pytest.approx(hounsfield.max())
    assert float(volume.mean()) == pytest.approx(hounsfield.mean(), rel=1e-4)


def test_cli_predicts_on_a_dicom_series(ct_series, tmp_path, capsys):
    folder, _ = ct_series
    bundle = make_fake_bundle(tmp_path / "bundles")
    assert main(["predict", "--bundle", str(bundle), "--image", str(folder), "--point", "256,256,3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["probability"] <= 1.0
    assert -1100.0 < result["mean_intensity"] < 3100.0  # Hounsfield units of the real slice
    assert result["roi_center_ijk"] == [256.0, 256.0, 3.0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--point", "500,40,7"], "lies outside image 24x20x16"),
        ([], "no lesion given"),
        (["--point", "1,2"], "foreground"),
    ],
)
def test_cli_names_the_problem_of_bad_input(tmp_path, capsys, arguments, message):
    bundle = make_fake_bundle(tmp_path / "bundles")
    image = make_datastore(tmp_path / "studies") / "case_bright.nii.gz"
    assert main(["predict", "--bundle", str(bundle), "--image", str(image), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert "Traceback" not in error


def test_cli_names_a_missing_image(tmp_path, capsys):
    bundle = make_fake_bundle(tmp_path / "bundles")
    assert main(["predict", "--bundle", str(bundle), "--image", str(tmp_path / "nope.nii.gz"), "--point", "1,1,1"]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err
