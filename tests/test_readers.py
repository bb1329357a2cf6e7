"""Readers on inputs as users have them: DICOM series in any slice order, NRRD, real ultrasound DICOM from
several vendors and encodings, PNG/JPEG exports and pyramidal whole-slide TIFFs.

Every expectation is a known pixel value or a known world position, never the reader's own output.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)
from scipy import ndimage

from oncofusion.contract import InvalidRequest
from oncofusion.io.readers import READERS, image_affine, read_frame, read_image, read_volume
from oncofusion.io.slides import DEFAULT_TILE_CACHE_BYTES, SlideImage, open_slide
from tests.dicom_series import (
    COL_SPACING,
    LPS_TO_RAS,
    MARKER_COL,
    MARKER_ROW,
    MARKER_STORED,
    ROW_SPACING,
    SERIES_CASES,
    TAG_STORED,
    marker_world_ras,
    orientation,
    shipped_file,
    write_marker_series,
)
from tests.slides import write_pyramid


def raw_pixels(name: str) -> tuple[pydicom.Dataset, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(shipped_file(name))
        return ds, ds.pixel_array


# -- DICOM series: order by position along the normal ------------------------------------------------
@pytest.mark.parametrize("case", list(SERIES_CASES))
def test_dicom_series_marker_lands_at_its_world_position(tmp_path, case):
    spec = SERIES_CASES[case]
    row_cos, col_cos = orientation(*spec["angles"])
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-158.1, -179.0, -75.7])
    steps = np.asarray(spec["steps"], float)
    positions = origin + steps[:, None] * normal + (steps[:, None] / 2.5) * spec["tilt"] * col_cos
    write_marker_series(tmp_path, positions, spec["numbers"], spec["marker"], row_cos, col_cos)

    volume = read_volume(tmp_path)
    assert tuple(volume.shape) == (1, 128, 128, 5)  # (1, columns, rows, slices)
    array = volume[0].numpy()
    i, j, k = np.unravel_index(np.argmax(array), array.shape)
    assert (i, j) == (MARKER_COL, MARKER_ROW)
    assert array[i, j, k] == pytest.approx(MARKER_STORED - 1024)  # rescale intercept -1024 applied
    affine = volume.affine.numpy()
    world = (affine @ [i, j, k, 1.0])[:3]
    np.testing.assert_allclose(
        world, marker_world_ras(positions[spec["marker"]], row_cos, col_cos), atol=1e-3
    )
    # every slice sits at its rank along the normal, and K runs along +normal
    np.testing.assert_array_equal(array[0, 0, :], TAG_STORED - 1024 + np.arange(5))
    assert float((LPS_TO_RAS[:3, :3] @ affine[:3, 2]) @ normal) > 0
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :2], axis=0), [COL_SPACING, ROW_SPACING], rtol=1e-6)
    # the header-only affine used for datalists agrees
    np.testing.assert_allclose(image_affine(tmp_path), affine, atol=1e-9)


def _axial_series(folder: Path, z: list[float]) -> None:
    row_cos, col_cos = orientation()
    positions = np.array([[-10.0, -20.0, v] for v in z])
    write_marker_series(folder, positions, list(range(1, len(z) + 1)), 0, row_cos, col_cos)


def _edit_one(folder: Path, edit) -> None:
    """Edit the slice with InstanceNumber 2 (at z = 2.5 mm)."""
    for file in folder.glob("*.dcm"):
        ds = pydicom.dcmread(file)
        if ds.InstanceNumber == 2:
            edit(ds)
            ds.save_as(file)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
            "mixes 2 slice orientations",
        ),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "has no ImagePositionPatient"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", generate_uid()), "mixes 2 DICOM series"),
        (lambda ds: setattr(ds, "ImagePositionPatient", [-10.0, -20.0, 0.0]), "lie at the same position"),
    ],
)
def test_dicom_series_mixed_is_422(tmp_path, edit, message):
    _axial_series(tmp_path, [0.0, 2.5, 5.0, 7.5])
    _edit_one(tmp_path, edit)
    with pytest.raises(InvalidRequest, match=message) as e:
        read_volume(tmp_path)
    assert e.value.status_code == 422
    assert f"image '{tmp_path.name}'" in str(e.value) and str(tmp_path.parent) not in str(e.value)


def test_dicom_series_missing_slice_is_422(tmp_path):
    _axial_series(tmp_path, [0.0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(InvalidRequest, match="unevenly spaced .* a slice is missing") as e:
        read_volume(tmp_path)
    assert e.value.status_code == 422


def test_dicom_series_skips_other_files(tmp_path):
    _axial_series(tmp_path, [0.0, 2.5, 5.0])
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert tuple(read_volume(tmp_path).shape) == (1, 128, 128, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    with pytest.raises(InvalidRequest, match="holds no DICOM image files") as e:
        read_volume(empty)
    assert e.value.status_code == 415


# -- NRRD ----------------------------------------------------------------------------------------------
DIRECTIONS = np.array([[0.7, 0.0, 0.0], [0.0, 0.8, 0.1], [0.0, 0.0, 2.0]])  # one row per axis
ORIGIN = np.array([10.0, 20.0, 30.0])


def _nrrd_volume() -> np.ndarray:
    return np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)


@pytest.mark.parametrize(
    "space, flip",
    [
        ("left-posterior-superior", (-1, -1, 1)),
        ("right-anterior-superior", (1, 1, 1)),
        ("left-anterior-superior", (-1, 1, 1)),
    ],
)
def test_nrrd_affine_maps_ijk_to_ras(tmp_path, space, flip):
    path = tmp_path / "ct.nrrd"
    nrrd.write(
        str(path), _nrrd_volume(), {"space": space, "space directions": DIRECTIONS, "space origin": ORIGIN}
    )
    image = read_volume(path)
    assert tuple(image.shape) == (1, 4, 5, 6)
    assert float(image[0, 1, 2, 3]) == float(_nrrd_volume()[1, 2, 3])  # no reorientation
    world_in_space = ORIGIN + np.array([1, 2, 3]) @ DIRECTIONS
    expected = np.asarray(flip) * world_in_space
    np.testing.assert_allclose((image.affine.numpy() @ [1, 2, 3, 1])[:3], expected, atol=1e-9)
    np.testing.assert_allclose(image_affine(path), image.affine.numpy())


def test_nrrd_lps_agrees_with_monai_and_detached_header(tmp_path):
    from monai.data import NrrdReader

    header = {"space": "left-posterior-superior", "space directions": DIRECTIONS, "space origin": ORIGIN}
    nrrd.write(str(tmp_path / "a.nrrd"), _nrrd_volume(), header)
    reader = NrrdReader()
    _, meta = reader.get_data(reader.read(str(tmp_path / "a.nrrd")))
    np.testing.assert_allclose(read_volume(tmp_path / "a.nrrd").affine.numpy(), meta["affine"], atol=1e-9)
    nrrd.write(str(tmp_path / "b.nhdr"), _nrrd_volume(), header, detached_header=True)
    np.testing.assert_array_equal(read_volume(tmp_path / "b.nhdr")[0].numpy(), _nrrd_volume())


def test_nrrd_bad_inputs(tmp_path):
    vector = np.zeros((3, 4, 5, 6), np.float32)
    directions = np.vstack([np.full(3, np.nan), DIRECTIONS])
    nrrd.write(
        str(tmp_path / "rgb.nrrd"),
        vector,
        {"space": "LPS", "space directions": directions, "kinds": ["vector", "domain", "domain", "domain"]},
    )
    with pytest.raises(InvalidRequest, match="'rgb.nrrd' has shape 4x5x6x3: a 3D volume") as e:
        read_volume(tmp_path / "rgb.nrrd")
    assert e.value.status_code == 422
    (tmp_path / "broken.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    with pytest.raises(InvalidRequest, match="cannot read image 'broken.nrrd' as NRRD") as e:
        read_volume(tmp_path / "broken.nrrd")
    assert e.value.status_code == 415


def test_volume_formats_message(tmp_path):
    (tmp_path / "scan.mha").write_bytes(b"ObjectType = Image\n")
    with pytest.raises(InvalidRequest, match="NIfTI file .* NRRD file .* DICOM series folder") as e:
        read_volume(tmp_path / "scan.mha")
    assert e.value.status_code == 415


# -- 2D frames: real DICOM ultrasound and secondary captures ------------------------------------------
SC_STRIPES = [
    (255, 0, 0),
    (255, 128, 128),
    (0, 255, 0),
    (128, 255, 128),
    (0, 0, 255),
    (128, 128, 255),
    (0, 0, 0),
    (64, 64, 64),
    (192, 192, 192),
    (255, 255, 255),
]  # rows 5, 15, ... 95 of SC_rgb


@pytest.mark.parametrize(
    "name, tolerance",
    [
        ("SC_rgb.dcm", 0),
        ("SC_rgb_expb_16bit.dcm", 0),  # 16-bit big endian
        ("SC_rgb_rle.dcm", 0),
        ("SC_rgb_gdcm_KY.dcm", 0),  # JPEG 2000
        ("SC_ybr_full_uncompressed.dcm", 6),
        ("SC_ybr_full_422_uncompressed.dcm", 6),
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 6),  # JPEG baseline, YBR_FULL_422
        ("SC_rgb_jpeg_dcmtk.dcm", 6),  # JPEG baseline, YBR_FULL
    ],
)
def test_frame_colour_encodings_give_the_same_rgb(name, tolerance):
    image = read_frame(shipped_file(name))
    assert tuple(image.shape) == (3, 100, 100) and image.dtype == torch.float32
    got = np.array([image[:, 50, row].tolist() for row in range(5, 100, 10)])
    np.testing.assert_allclose(got, np.array(SC_STRIPES, float), atol=tolerance)


def test_frame_requested_from_real_two_frame_file():
    image = read_frame(shipped_file("SC_rgb_2frame.dcm"), frame=1)
    got = np.array([image[:, 50, row].tolist() for row in range(5, 100, 10)])
    np.testing.assert_allclose(got, 255 - np.array(SC_STRIPES, float), atol=1)  # frame 1 is the inverse
    assert (image.meta["frame_index"], image.meta["frame_choice"], image.meta["num_frames"]) == (
        1,
        "requested",
        2,
    )
    with pytest.raises(
        InvalidRequest,
        match=r"frame 2 is out of range for image 'SC_rgb_2frame.dcm': it has "
        r"2 frames \(0-1\)",
    ) as e:
        read_frame(shipped_file("SC_rgb_2frame.dcm"), frame=2)
    assert e.value.status_code == 422


def test_frame_real_small_parts_rgb_axes_and_lossless_jpeg2000():
    ds, raw = raw_pixels("US1_UNCR.dcm")
    image = read_frame(shipped_file("US1_UNCR.dcm"))
    assert tuple(image.shape) == (3, 640, 480)  # (C, W = columns, H = rows)
    for row, col in [(100, 200), (300, 500), (479, 0)]:
        np.testing.assert_array_equal(image[:, col, row].numpy(), raw[row, col].astype(np.float32))
    assert image.meta["spacing_source"] == "none" and image.meta["spacing_unit"] == "pixel"
    np.testing.assert_array_equal(image.affine.numpy(), np.eye(3))
    torch.testing.assert_close(read_frame(shipped_file("US1_J2KR.dcm")), image)  # YBR_RCT, lossless
    lossy = read_frame(shipped_file("US1_J2KI.dcm"))  # YBR_ICT, lossy
    assert float((lossy - image).abs().mean()) < 3.0


def test_frame_real_palette_obstetric_with_region_calibration():
    ds, raw = raw_pixels("OBXXXX1A.dcm")
    image = read_frame(shipped_file("OBXXXX1A.dcm"))
    assert tuple(image.shape) == (3, 800, 600)
    # the palette looked up by hand: 16-bit entries, first mapped value 0, shown by their high byte
    luts = [
        np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2") for c in ("Red", "Green", "Blue")
    ]
    for row, col in [(300, 400), (100, 600), (550, 150)]:
        expected = [int(lut[raw[row, col]]) >> 8 for lut in luts]
        np.testing.assert_array_equal(image[:, col, row].numpy(), expected)
    # region 0 (2D tissue, cm) covers the centre: 0.02622878766 cm per pixel
    np.testing.assert_allclose(image.affine.numpy(), np.diag([0.2622878766, 0.2622878766, 1.0]), rtol=1e-8)
    assert image.meta["spacing_source"] == "ultrasound_region" and image.meta["ultrasound_region"] == 0
    for variant in ("OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"):
        torch.testing.assert_close(read_frame(shipped_file(variant)), image)


def test_frame_real_16bit_palette():
    ds, raw = raw_pixels("gdcm-US-ALOKA-16.dcm")
    from pydicom.pixel_data_handlers.util import apply_color_lut

    image = read_frame(shipped_file("gdcm-US-ALOKA-16.dcm"))
    assert tuple(image.shape) == (3, 640, 480)
    assert 200 < float(image.max()) <= 255.0  # 16-bit palette entries shown as 8-bit
    rgb = apply_color_lut(raw, ds)
    np.testing.assert_array_equal(image[:, 32, 40].numpy(), (rgb[40, 32] >> 8).astype(np.float32))
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:2], [0.3826530650, 0.3826530650], rtol=1e-8)


def test_frame_real_cine_ybr_jpeg_picks_a_frame_and_converts_colour():
    image = read_frame(shipped_file("color3d_jpeg_baseline.dcm"))
    assert tuple(image.shape) == (3, 640, 480)
    assert image.meta["num_frames"] == 120 and image.meta["frame_choice"] == "sharpest"
    assert 0 <= image.meta["frame_index"] < 120
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:2], [0.5104970559, 0.5104970559], rtol=1e-8)
    # the B-mode region is grey: after YCbCr -> RGB its three channels agree (YCbCr left as is would
    # give (Y, ~128, ~128))
    sector = image[:, 84:596, 31:415]
    grey = (sector.max(dim=0).values - sector.min(dim=0).values) <= 8
    assert float(grey.float().mean()) > 0.95


@pytest.mark.skipif(importlib.util.find_spec("pylibjpeg") is not None, reason="pylibjpeg decodes it")
def test_frame_undecodable_transfer_syntax_is_415():
    with pytest.raises(
        InvalidRequest, match=r"its transfer syntax 'JPEG Lossless.*' could not be decoded"
    ) as e:
        read_frame(shipped_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert e.value.status_code == 415


def test_frame_real_ct_slice_keeps_hounsfield_units_and_pixel_spacing():
    ds, raw = raw_pixels("CT_small.dcm")
    image = read_frame(shipped_file("CT_small.dcm"))
    assert tuple(image.shape) == (1, 128, 128)
    assert float(image[0, 70, 40]) == float(raw[40, 70]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.meta["spacing_source"] == "pixel_spacing"
    assert image.meta["frame_choice"] == "only"


def test_frame_dicom_without_image_is_415():
    with pytest.raises(InvalidRequest, match="without an image") as e:
        read_frame(shipped_file("test-SR.dcm"))
    assert e.value.status_code == 415


# -- 2D frames: synthetic ultrasound with known content ----------------------------------------------
def write_us(path: Path, frames: np.ndarray, photometric: str = "MONOCHROME2", **attributes) -> Path:
    """An ultrasound DICOM file (8-bit, (F, rows, cols) monochrome or (F, rows, cols, 3) RGB)."""
    multi = frames.shape[0] > 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if multi:
        ds.NumberOfFrames = frames.shape[0]
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
    return path


def _region(x0: int, y0: int, x1: int, y1: int, dx_cm: float, dy_cm: float, units: int = 3, fmt: int = 1):
    region = pydicom.Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = fmt, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x1, y1
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = units, units
    region.PhysicalDeltaX, region.PhysicalDeltaY = dx_cm, dy_cm
    return region


def _checkerboard(rows: int = 48, cols: int = 64, square: int = 4) -> np.ndarray:
    r, c = np.indices((rows, cols))
    return np.where(((r // square) + (c // square)) % 2 == 0, 40.0, 220.0)


@pytest.fixture()
def cine(tmp_path) -> tuple[Path, np.ndarray]:
    """Five frames of the same pattern: all blurred except frame 3 (neither the first nor the middle)."""
    sharp = _checkerboard()
    frames = np.stack([ndimage.gaussian_filter(sharp, s) if s else sharp for s in (2.0, 1.5, 2.5, 0, 3.0)])
    frames = np.clip(np.rint(frames + np.arange(5)[:, None, None]), 0, 255).astype(np.uint8)
    return write_us(tmp_path / "cine.dcm", frames), frames


def test_cine_default_is_the_sharpest_frame(cine):
    path, frames = cine
    image = read_frame(path)
    assert (image.meta["frame_index"], image.meta["frame_choice"], image.meta["num_frames"]) == (
        3,
        "sharpest",
        5,
    )
    np.testing.assert_array_equal(image[0].numpy(), frames[3].T.astype(np.float32))


@pytest.mark.parametrize("frame", [1, "1"])
def test_cine_requested_frame(cine, frame):
    path, frames = cine
    image = read_frame(path, frame=frame)
    assert (image.meta["frame_index"], image.meta["frame_choice"]) == (1, "requested")
    np.testing.assert_array_equal(image[0].numpy(), frames[1].T.astype(np.float32))


@pytest.mark.parametrize(
    "frame, message",
    [
        (5, r"frame 5 is out of range for image 'cine.dcm': it has 5 frames \(0-4\)"),
        (-1, r"frame -1 is out of range"),
        ("last", "frame must be an integer frame index"),
        (True, "frame must be an integer"),
    ],
)
def test_cine_bad_frame_is_422(cine, frame, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        read_frame(cine[0], frame=frame)
    assert e.value.status_code == 422


def test_frame_monochrome1_is_inverted(tmp_path):
    pixels = np.arange(48 * 64, dtype=np.uint32).reshape(1, 48, 64) % 256
    image = read_frame(write_us(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(image[0].numpy(), (255 - pixels[0]).T.astype(np.float32))


def test_frame_region_covering_the_centre_gives_the_spacing(tmp_path):
    frame = _checkerboard()[None]
    regions = [
        _region(41, 0, 63, 47, 0.05, 0.05),  # a larger side view, away from the centre
        _region(25, 0, 40, 47, 0.02, 0.03),  # the view covering the centre (31.5, 23.5)
        _region(0, 0, 63, 47, 0.5, 0.0, units=4, fmt=3),  # a Doppler strip in seconds: not a length
    ]
    image = read_frame(write_us(tmp_path / "us.dcm", frame, SequenceOfUltrasoundRegions=regions))
    np.testing.assert_allclose(image.affine.numpy(), np.diag([0.2, 0.3, 1.0]), rtol=1e-9)  # x from DeltaX
    assert image.meta["ultrasound_region"] == 1


def test_frame_pixel_spacing_is_row_then_column(tmp_path):
    image = read_frame(write_us(tmp_path / "us.dcm", _checkerboard()[None], PixelSpacing=[0.5, 0.8]))
    np.testing.assert_allclose(image.affine.numpy(), np.diag([0.8, 0.5, 1.0]))  # x = column spacing
    assert image.meta["spacing_source"] == "pixel_spacing" and image.meta["spacing_unit"] == "mm"


def test_frame_rgb_us_without_calibration(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (1, 6, 8, 3)).astype(np.uint8)
    image = read_frame(write_us(tmp_path / "rgb.dcm", rgb, "RGB"))
    np.testing.assert_array_equal(image.numpy(), rgb[0].transpose(2, 1, 0).astype(np.float32))
    assert image.meta["spacing_source"] == "none"


# -- 2D frames: PNG / JPEG -----------------------------------------------------------------------------
@pytest.fixture()
def photo() -> np.ndarray:
    rows, cols = np.indices((30, 40))
    return np.stack([rows * 8, cols * 6, (rows + cols) * 3], axis=-1).astype(np.uint8)


def test_png_rgb_grey_rgba_palette(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "rgb.png")
    image = read_frame(tmp_path / "rgb.png")
    assert tuple(image.shape) == (3, 40, 30)
    np.testing.assert_array_equal(image[:, 7, 3].numpy(), photo[3, 7])  # column 7, row 3
    assert image.meta["spacing_source"] == "none" and image.meta["frame_choice"] == "only"
    np.testing.assert_array_equal(image.affine.numpy(), np.eye(3))

    Image.fromarray(photo[..., 0]).save(tmp_path / "grey.png")
    grey = read_frame(tmp_path / "grey.png")
    assert tuple(grey.shape) == (1, 40, 30)
    np.testing.assert_array_equal(grey[0].numpy(), photo[..., 0].T)

    alpha = np.where(np.indices((30, 40))[1] < 20, 0, 255).astype(np.uint8)  # left half transparent
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(tmp_path / "rgba.png")
    torch.testing.assert_close(read_frame(tmp_path / "rgba.png"), image, check_stride=False)

    four = np.zeros((30, 40, 3), np.uint8)
    four[:, 10:] = (200, 30, 30)
    four[15:, :] = (10, 220, 90)
    Image.fromarray(four).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_frame(tmp_path / "pal.png").numpy(), four.transpose(2, 1, 0))


def test_png_16bit_keeps_its_values(tmp_path):
    values = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)  # up to 59950
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_frame(tmp_path / "deep.png")
    assert tuple(image.shape) == (1, 40, 30)
    np.testing.assert_array_equal(image[0].numpy(), values.T.astype(np.float32))


def test_jpeg_rgb_and_grey(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "export.jpg", quality=95)
    image = read_frame(tmp_path / "export.jpg")
    assert tuple(image.shape) == (3, 40, 30)
    assert float((image - torch.from_numpy(photo.transpose(2, 1, 0).astype(np.float32))).abs().mean()) < 3
    Image.fromarray(photo[..., 1]).save(tmp_path / "grey.jpeg")
    assert tuple(read_frame(tmp_path / "grey.jpeg").shape) == (1, 40, 30)


def test_frame_bad_inputs(tmp_path):
    with pytest.raises(InvalidRequest, match="image 'missing.png' not found") as e:
        read_frame(tmp_path / "missing.png")
    assert e.value.status_code == 400
    (tmp_path / "fake.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(InvalidRequest, match="cannot read image 'fake.png' as PNG/JPEG") as e:
        read_frame(tmp_path / "fake.png")
    assert e.value.status_code == 415
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidRequest, match="unsupported image format for 'notes.txt'") as e:
        read_frame(tmp_path / "notes.txt")
    assert e.value.status_code == 415
    with pytest.raises(InvalidRequest, match="is a folder of 2 files") as e:
        read_frame(tmp_path)
    assert e.value.status_code == 415
    Image.fromarray(np.zeros((1, 5), np.uint8)).save(tmp_path / "line.png")
    with pytest.raises(InvalidRequest, match="'line.png' is 5x1 pixels") as e:
        read_frame(tmp_path / "line.png")
    assert e.value.status_code == 422


# -- whole-slide images ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """A real immunohistochemistry image (scikit-image), tiled to 768 x 1024."""
    import skimage.data as ski_data
    return np.ascontiguousarray(np.tile(ski_data.immunohistochemistry(), (2, 2, 1))[:768])


@pytest.fixture()
def slide_path(tmp_path, tissue) -> Path:
    return write_pyramid(tmp_path / "tissue.tiff", tissue)


def test_slide_levels_mpp_and_regions(slide_path, tissue):
    with open_slide(slide_path) as slide:
        assert isinstance(slide, SlideImage)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((1024, 768), (512, 384), (256, 192))  # (width, height)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx((0.5, 0.5))
        assert slide.nbytes == DEFAULT_TILE_CACHE_BYTES  # a handle, not pixels
        region = slide.read_region((100, 200), 0, (50, 40))
        assert region.shape == (40, 50, 3) and region.dtype == np.uint8
        np.testing.assert_array_equal(region, tissue[200:240, 100:150])
        # location is in level-0 pixels; (100, 200) is (50, 100) at level 1
        np.testing.assert_array_equal(
            slide.read_region((100, 200), 1, (64, 32)), tissue[::2, ::2][100:132, 50:114]
        )
        np.testing.assert_array_equal(slide.read_region((0, 0), 2, (256, 192)), tissue[::4, ::4])
        # beyond the edge: the slide background (white)
        edge = slide.read_region((1000, 750), 0, (40, 30))
        np.testing.assert_array_equal(edge[:18, :24], tissue[750:, 1000:])
        assert (edge[18:] == 255).all() and (edge[:, 24:] == 255).all()
        thumb = slide.thumbnail(128)
        assert thumb.dtype == np.uint8 and thumb.shape[2] == 3 and max(thumb.shape[:2]) == 128
        assert thumb.shape[1] > thumb.shape[0]  # landscape kept


def test_slide_mpp_from_inch_resolution_or_absent(tmp_path, tissue):
    with open_slide(write_pyramid(tmp_path / "inch.tiff", tissue, levels=2, mpp=0.25, unit="INCH")) as slide:
        assert slide.mpp == pytest.approx((0.25, 0.25), rel=1e-6)
    with open_slide(write_pyramid(tmp_path / "none.tiff", tissue, levels=2, mpp=None)) as slide:
        assert slide.mpp is None and slide.mpp_source == "none"
    # formats whose vendor metadata OpenSlide does not turn into openslide.mpp-x/y
    tiff_only = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": "101600", "tiff.YResolution": "50800"}
    assert SlideImage._microns_per_pixel(tiff_only) == (pytest.approx((0.25, 0.5)), "tiff_resolution")
    assert SlideImage._microns_per_pixel({**tiff_only, "tiff.ResolutionUnit": "none"}) == (None, "none")


@pytest.mark.parametrize(
    "location, level, size, message",
    [
        ((0, 0), 3, (10, 10), r"level 3 is out of range for slide 'tissue.tiff': it has 3 levels \(0-2\)"),
        ((0, 0), 0, (0, 10), "size must be positive"),
        ((0, 0), 0, (10000, 10000), "larger than the .* pixels one read may decode"),
        ((2000, 0), 0, (10, 10), "lies outside slide 'tissue.tiff' \\(1024x768 at level 0\\)"),
    ],
)
def test_slide_bad_region_is_422(slide_path, location, level, size, message):
    slide = open_slide(slide_path)
    with pytest.raises(InvalidRequest, match=message) as e:
        slide.read_region(location, level, size)
    assert e.value.status_code == 422


def test_slide_unsupported_or_corrupt_is_415(tmp_path, slide_path, tissue):
    import tifffile

    Image.fromarray(tissue[:64, :64]).save(tmp_path / "tile.png")
    tifffile.imwrite(tmp_path / "strips.tiff", tissue[:64, :64], photometric="rgb")  # not tiled
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(slide_path.read_bytes()[:300])
    (tmp_path / "text.svs").write_text("not a slide")
    for name in ("tile.png", "strips.tiff", "truncated.tiff", "text.svs"):
        with pytest.raises(InvalidRequest, match=f"'{name}'") as e:
            open_slide(tmp_path / name)
        assert e.value.status_code == 415, name
        assert str(tmp_path) not in str(e.value)
    with pytest.raises(InvalidRequest, match="slide 'gone.svs' not found") as e:
        open_slide(tmp_path / "gone.svs")
    assert e.value.status_code == 400


# -- registry ------------------------------------------------------------------------------------------------
def test_read_image_dispatches_by_kind(tmp_path, cine, slide_path):
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert set(READERS) == {"volume", "frame", "slide"}
    np.testing.assert_array_equal(read_image(tmp_path / "v.nii.gz", "volume")[0].numpy(), volume)
    assert read_image(cine[0], "frame", frame=2).meta["frame_index"] == 2
    assert read_image(slide_path, "slide").level_count == 3
    with pytest.raises(
        ValueError, match="unknown image reader kind 'video': use one of frame, slide, volume"
    ):
        read_image(cine[0], "video")
    with pytest.raises(InvalidRequest, match="unsupported image format for 'cine.dcm'"):
        read_image(cine[0], "volume")  # one DICOM file is not a series


def test_a_one_instance_series_folder_is_read_as_its_file(tmp_path):
    """A DICOMweb datastore downloads an ultrasound series as a folder holding its one instance."""
    series = tmp_path / "1.2.840.series"
    series.mkdir()
    shutil.copy(shipped_file("OBXXXX1A.dcm"), series / "instance.dcm")
    torch.testing.assert_close(read_frame(series), read_frame(shipped_file("OBXXXX1A.dcm")))


# -- NIfTI: one streaming pass (ISA-L gzip, file order kept) -------------------------------------------
NIFTI_AFFINE = np.array([[0.7, 0.0, 0.0, -90.0], [0.0, -0.8, 0.0, 40.0], [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1.0]])


def _ramp(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Voxel (i, j, k) = i + 100 j + 1000 k - 2000: every position tells its own index."""
    i, j, k = np.indices(shape[:3])
    values = (i + 100 * j + 1000 * k - 2000).astype(dtype)
    return values.reshape(shape)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, ">f4", "<f8"])
def test_nifti_voxels_keep_their_index_and_value(tmp_path, suffix, dtype):
    # more slices than one decoding step holds, so the steps must join where they should
    from oncofusion.io import readers

    shape = (5, 4, readers.SLICES_PER_STEP * 2 + 3)
    data = _ramp(shape, np.int32)
    data = (data % 251 if np.dtype(dtype).kind == "u" else data).astype(dtype)
    path = tmp_path / f"ramp{suffix}"
    nib.save(nib.Nifti1Image(data, NIFTI_AFFINE), str(path))
    volume = read_volume(path)
    assert volume.shape == (1, *shape) and volume.dtype == torch.float32
    np.testing.assert_array_equal(volume[0].numpy(), data.astype(np.float32))
    np.testing.assert_allclose(volume.affine.numpy(), NIFTI_AFFINE)


def test_nifti_scaled_voxels_match_nibabel(tmp_path):
    data = _ramp((4, 3, 5), np.int16)
    image = nib.Nifti1Image(data, NIFTI_AFFINE)
    image.header.set_slope_inter(0.5, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, str(path))
    expected = data * 0.5 - 1024.0
    np.testing.assert_allclose(read_volume(path)[0].numpy(), expected, rtol=0, atol=1e-4)


def test_nifti_trailing_singleton_axis_and_decoding_into_given_memory(tmp_path):
    data = _ramp((4, 3, 5, 1), np.int16)
    path = tmp_path / "with_t.nii.gz"
    nib.save(nib.Nifti1Image(data, NIFTI_AFFINE), str(path))
    given: list[np.ndarray] = []

    def out(shape):
        given.append(np.full(shape, np.nan, np.float32, order="F"))
        return given[-1]

    volume = read_volume(path, out=out)
    assert volume.shape == (1, 4, 3, 5) and [g.shape for g in given] == [(4, 3, 5)]
    np.testing.assert_array_equal(given[0], data[..., 0])  # decoded into the memory handed over ...
    given[0][1, 2, 3] = -7.0
    assert volume[0, 1, 2, 3] == -7.0  # ... which the volume shares, no copy


def test_nifti_nan_voxels_and_truncated_files_are_refused(tmp_path):
    data = _ramp((4, 3, 5), np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, NIFTI_AFFINE), str(tmp_path / "nan.nii.gz"))
    error = _refusal(read_volume, tmp_path / "nan.nii.gz")
    assert error.status_code == 422 and "1 NaN/infinite voxels" in str(error)
    whole = tmp_path / "whole.nii"
    nib.save(nib.Nifti1Image(_ramp((4, 3, 5), np.int16), NIFTI_AFFINE), str(whole))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(whole.read_bytes()[:-10])
    error = _refusal(read_volume, cut)
    assert error.status_code == 415 and "'cut.nii'" in str(error) and "truncated" in str(error)


def _refusal(fn, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fn(*args)
    return info.value
