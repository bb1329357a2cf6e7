"""Every image the server reads is bounded from its header: too big (413), complex voxels (415), voxel
sizes that are zero, negative or not finite (422), and the cache keeps no upload and counts real bytes.

The "bomb" files declare a huge grid but carry almost no data: a reader that decoded them would fail
with a 415 decoding error, so a 413 proves the refusal came from the header alone. The
``no_decoding`` fixture makes that explicit by failing any pixel decode.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor, NibabelReader
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from oncofusion.contract import InvalidRequest
from oncofusion.io.cache import ImageCache, value_nbytes
from oncofusion.io.limits import DEFAULT_LIMITS, ImageHeader, ImageLimits, check_header
from oncofusion.io.readers import image_affine, read_frame, read_image, read_volume
from tests.dicom_series import write_ct_series

AFFINE = np.diag([0.8, 0.9, 1.5, 1.0])
BOMB_SHAPE = (1024, 1024, 512)
BOMB_MESSAGE = ("is 1024x1024x512 = 536,870,912 voxels; this server accepts at most 268,435,456 "
                "(--conf max_image_voxels)")


def _refusal(call, *args, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        call(*args, **kwargs)
    return e.value


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding fails the test: a refusal under this fixture was made from the header."""

    def decoded(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(NibabelReader, "get_data", decoded)
    monkeypatch.setattr(nrrd, "read_data", decoded)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(decoded))
    monkeypatch.setattr(Image.Image, "load", decoded)


# -- files that declare more than they hold ------------------------------------------------------------
def nifti_bomb(path: Path, shape=BOMB_SHAPE, dtype=np.float64, pixdim=(1.0, 1.0, 1.0)) -> Path:
    """A gzip NIfTI whose header declares ``shape`` but whose data is 64 bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["pixdim"][1:4] = pixdim
    header["vox_offset"] = 352
    header["magic"] = b"n+1"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    return path


def nrrd_bomb(path: Path, sizes=BOMB_SHAPE, kind="double") -> Path:
    text = (f"NRRD0004\ntype: {kind}\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\n"
            "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
            "endian: little\nencoding: raw\n\n")
    path.write_bytes(text.encode() + b"\0" * 64)
    return path


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width x height`` grey pixels, followed by one empty IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def dicom_frame(path: Path, rows: int, cols: int, frames: int = 1, data: bytes | None = None) -> Path:
    """An 8-bit grey ultrasound DICOM declaring ``frames`` of ``rows x cols``; ``data`` may be short."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = data if data is not None else np.zeros((frames, rows, cols), np.uint8).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
    return path


def series_bomb(folder: Path, rows: int = 16384, cols: int = 16384) -> Path:
    """A 3-slice CT series whose headers declare ``rows x cols`` slices holding 4x5 pixels each."""
    write_ct_series(folder)
    for file in sorted(folder.iterdir()):
        ds = pydicom.dcmread(file)
        ds.Rows, ds.Columns = rows, cols
        ds.save_as(file)
    return folder


# -- too big: refused from the header (413) -------------------------------------------------------------
def test_a_gzip_nifti_bomb_is_refused_from_its_header(tmp_path, no_decoding):
    path = nifti_bomb(tmp_path / "upload.nii.gz")
    error = _refusal(read_volume, path)
    assert error.status_code == 413
    assert str(error).startswith(f"image 'upload.nii.gz' {BOMB_MESSAGE}")
    assert str(tmp_path) not in str(error)
    assert _refusal(read_image, path, "volume", what="label mask").status_code == 413


def test_without_the_header_check_the_nifti_bomb_would_be_decoded(tmp_path):
    """The bomb is a real file: under limits that admit it, decoding starts and fails on its short data
    (415), so the 413 above can only come from the header."""
    path = nifti_bomb(tmp_path / "upload.nii.gz")
    error = _refusal(read_volume, path, limits=ImageLimits(max_voxels=2**40, max_bytes=2**45))
    assert error.status_code == 415


def test_the_byte_limit_refuses_wide_voxel_types(tmp_path, no_decoding):
    path = nifti_bomb(tmp_path / "wide.nii.gz", shape=(512, 512, 256), dtype=np.float64)
    limits = ImageLimits(max_voxels=2**28, max_bytes=256 * 2**20)
    error = _refusal(read_volume, path, limits=limits)
    assert error.status_code == 413
    assert str(error) == ("image 'wide.nii.gz' (512x512x256 float64) needs 512 MiB to decode; this server "
                          "accepts at most 256 MiB (--conf max_image_mb): crop it or store it with a smaller "
                          "voxel type")


def test_an_nrrd_bomb_is_refused_from_its_header(tmp_path, no_decoding):
    error = _refusal(read_volume, nrrd_bomb(tmp_path / "upload.nrrd"))
    assert error.status_code == 413 and str(error).startswith(f"image 'upload.nrrd' {BOMB_MESSAGE}")
    error = _refusal(read_volume, nrrd_bomb(tmp_path / "upload.nrrd"), limits=ImageLimits(2**40, 2**45))
    assert error.status_code == 415  # admitted, it would have been decoded (and failed on its short data)


def test_a_dicom_series_bomb_is_refused_from_its_headers(tmp_path, no_decoding):
    folder = series_bomb(tmp_path / "series")
    error = _refusal(read_volume, folder)
    assert error.status_code == 413
    assert str(error).startswith("image 'series' is 16384x16384x3 = 805,306,368 voxels; this server accepts at "
                                 "most 268,435,456 (--conf max_image_voxels)")


def test_a_dicom_series_bomb_admitted_fails_to_decode(tmp_path):
    error = _refusal(read_volume, series_bomb(tmp_path / "series"), limits=ImageLimits(2**40, 2**45))
    assert error.status_code == 415


def test_a_dicom_cine_counts_all_its_frames(tmp_path, no_decoding):
    path = dicom_frame(tmp_path / "cine.dcm", 1024, 1024, frames=300, data=b"\0" * 64)
    error = _refusal(read_frame, path)
    assert error.status_code == 413
    assert str(error).startswith("image 'cine.dcm' is 1024x1024x300 = 314,572,800 pixels; this server accepts "
                                 "at most 268,435,456")
    assert _refusal(read_frame, path, limits=ImageLimits(2**40, 2**45)).status_code == 415


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_png_bomb_is_refused_from_its_header(tmp_path, no_decoding):
    # 12000 x 12000 = 144M pixels: under Pillow's own bomb error (2 x 89M), over these limits
    path = png_bomb(tmp_path / "frame.png", 12000, 12000)
    error = _refusal(read_frame, path, limits=ImageLimits(max_voxels=2**27))
    assert error.status_code == 413
    assert str(error).startswith("image 'frame.png' is 12000x12000 = 144,000,000 pixels; this server accepts at "
                                 "most 134,217,728 (--conf max_image_voxels)")


def test_a_png_bomb_admitted_fails_to_decode(tmp_path):
    with pytest.warns(Image.DecompressionBombWarning):
        error = _refusal(read_frame, png_bomb(tmp_path / "frame.png", 12000, 12000))
    assert error.status_code == 415


def test_a_png_beyond_pillows_bomb_limit_is_413_too(tmp_path, no_decoding):
    error = _refusal(read_frame, png_bomb(tmp_path / "frame.png", 20000, 20000))
    assert error.status_code == 413
    assert str(error).startswith("image 'frame.png' is too large to decode (Image size (400000000 pixels)")


# -- voxel types and voxel sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_voxels_are_refused_not_reduced_to_their_real_part(tmp_path, dtype, no_decoding):
    path = tmp_path / "mri.nii.gz"
    nib.save(nib.Nifti1Image(np.full((3, 4, 5), 1 + 2j, dtype), AFFINE), str(path))
    error = _refusal(read_volume, path)
    assert error.status_code == 415
    assert str(error).startswith(f"image 'mri.nii.gz' has complex voxels ({np.dtype(dtype).name})")


@pytest.mark.parametrize("pixdim, shown", [((0.0, 1.5, 2.0), "0 x 1.5 x 2"), ((-0.8, 0.9, 1.5), "-0.8 x 0.9 x 1.5"),
                                           ((np.nan, 1.0, 1.0), "nan x 1 x 1")])
def test_a_nifti_voxel_size_is_never_assumed(tmp_path, pixdim, shown, no_decoding):
    image = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), None)  # no qform/sform: pixdim is the geometry
    image.header["pixdim"][1:4] = pixdim
    path = tmp_path / "ct.nii.gz"
    nib.save(image, str(path))
    error = _refusal(read_volume, path)
    assert error.status_code == 422
    assert str(error).startswith(f"image 'ct.nii.gz' has voxel size {shown} mm (NIfTI pixdim): every voxel size "
                                 "must be a positive, finite number of mm")
    assert _refusal(image_affine, path).status_code == 422  # training datalists refuse it too


def test_an_nrrd_voxel_size_is_never_assumed(tmp_path, no_decoding):
    volume = np.zeros((3, 4, 5), np.int16)
    nrrd.write(str(tmp_path / "flat.nrrd"), volume, {"space": "RAS", "space directions": np.diag([1.0, 0.0, 2.0])})
    nrrd.write(str(tmp_path / "nan.nrrd"), volume, {"spacings": [1.0, np.nan, 2.0]})
    nrrd.write(str(tmp_path / "none.nrrd"), volume)
    for name in ("flat.nrrd", "nan.nrrd", "none.nrrd"):
        error = _refusal(read_volume, tmp_path / name)
        assert error.status_code == 422 and "every voxel size must be a positive, finite number" in str(error)
        assert _refusal(image_affine, tmp_path / name).status_code == 422


def test_a_dicom_series_with_zero_pixel_spacing_is_refused(tmp_path):
    folder = write_ct_series(tmp_path / "series")
    for file in folder.iterdir():
        ds = pydicom.dcmread(file)
        ds.PixelSpacing = [0.0, 0.8]
        ds.save_as(file)
    error = _refusal(read_volume, folder)
    assert error.status_code == 422 and str(error).startswith("image 'series' has voxel size 0.8 x 0 x 2 mm")


# -- normal images pass; limits are configurable --------------------------------------------------------
def test_the_default_limits_admit_a_large_ct_and_refuse_the_bomb():
    for dtype in (np.int16, np.float32, np.float64):
        check_header(ImageHeader((512, 512, 1000), 512 * 512 * 1000 * max(np.dtype(dtype).itemsize, 4),
                                 np.dtype(dtype), (0.7, 0.7, 0.5)), "ct.nii.gz")
    check_header(ImageHeader((1024, 768, 300), 1024 * 768 * 300 * 3, unit="pixels"), "cine.dcm")  # RGB cine
    with pytest.raises(InvalidRequest, match="1024x1024x512 = 536,870,912 voxels"):
        check_header(ImageHeader(BOMB_SHAPE, 2**29 * 8, np.dtype(np.float64), (1, 1, 1)), "bomb.nii.gz")
    assert DEFAULT_LIMITS == ImageLimits()


def test_a_normal_image_is_read_under_default_and_tight_limits(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.int16), AFFINE), str(path))
    assert tuple(read_volume(path).shape) == (1, 4, 5, 6)
    assert tuple(read_volume(path, limits=ImageLimits(max_voxels=120, max_bytes=480)).shape) == (1, 4, 5, 6)
    assert _refusal(read_volume, path, limits=ImageLimits(max_voxels=119)).status_code == 413
    assert _refusal(read_volume, path, limits=ImageLimits(max_bytes=479)).status_code == 413
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "us.png")
    assert tuple(read_image(tmp_path / "us.png", "frame", limits=ImageLimits(max_voxels=1200)).shape) == (1, 40, 30)
    error = _refusal(read_image, tmp_path / "us.png", "frame", limits=ImageLimits(max_voxels=1199))
    assert error.status_code == 413 and "40x30 = 1,200 pixels" in str(error)
    frame = dicom_frame(tmp_path / "us.dcm", 30, 40)
    assert tuple(read_frame(frame, limits=ImageLimits(max_voxels=1200)).shape) == (1, 40, 30)
    assert _refusal(read_frame, frame, limits=ImageLimits(max_voxels=1199)).status_code == 413
    series = write_ct_series(tmp_path / "series")  # 5 x 4 x 3
    assert tuple(read_volume(series, limits=ImageLimits(max_voxels=60)).shape) == (1, 5, 4, 3)
    assert _refusal(read_volume, series, limits=ImageLimits(max_voxels=59)).status_code == 413


def test_limits_from_the_app_configuration():
    assert ImageLimits.from_conf({}) == ImageLimits()
    limits = ImageLimits.from_conf({"max_image_voxels": "1e6", "max_image_mb": "64"})
    assert limits == ImageLimits(max_voxels=1_000_000, max_bytes=64 * 2**20)
    with pytest.raises(ValueError, match="max_image_voxels and max_image_mb must be numbers"):
        ImageLimits.from_conf({"max_image_mb": "lots"})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            ImageLimits(max_voxels=bad)


# -- the cache: bounded reads, no uploads kept, real bytes counted --------------------------------------
def test_the_cache_reads_through_the_limits(tmp_path, no_decoding):
    path = nifti_bomb(tmp_path / "upload.nii.gz")
    for cache in (ImageCache(), ImageCache(limits=ImageLimits(max_voxels=10**6))):
        assert _refusal(cache.get, path).status_code == 413
        assert _refusal(cache.get, path, cache=False).status_code == 413
        assert len(cache) == 0


def test_the_cache_passes_its_limits_to_the_reader(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), AFFINE), str(path))
    assert _refusal(ImageCache(limits=ImageLimits(max_voxels=100)).get, path).status_code == 413
    assert tuple(ImageCache(limits=ImageLimits(max_voxels=120)).get(path).shape) == (1, 4, 5, 6)
    with pytest.raises(TypeError, match="limits must be an oncofusion.io.limits.ImageLimits"):
        ImageCache(limits=100)


def test_an_upload_read_without_caching_is_not_kept(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"tmp{i}.nii.gz")
        nib.save(nib.Nifti1Image(np.full((4, 5, 6), i, np.float32), AFFINE), str(paths[-1]))
    cache = ImageCache()
    for i, path in enumerate(paths):
        assert float(cache.get(path, cache=False).max()) == i
    assert (len(cache), cache.nbytes, cache.misses) == (0, 0, 3)
    kept = cache.get(paths[0])  # a study read normally is cached, and a transient read then reuses it
    again = cache.get(paths[0], cache=False)
    assert (len(cache), cache.hits) == (1, 1)
    assert again.data_ptr() != kept.data_ptr()  # still a private copy


def test_cached_bytes_count_the_whole_storage_and_large_metadata_arrays():
    base = torch.zeros(1000)
    assert value_nbytes(base[:10]) == 4000  # a view keeps its whole storage alive
    assert value_nbytes(np.zeros(1000, np.float32)[:10]) == 4000
    image = MetaTensor(torch.zeros(1000), affine=torch.eye(4))
    assert value_nbytes(image) == 4000  # the affine and header fields every image carries are noise
    image.meta["mask"] = np.zeros(10_000, np.uint8)
    image.meta["same_buffer"] = image.meta["mask"][:5000]
    assert value_nbytes(image) == 4000 + 10_000
    image.meta["weights"] = torch.zeros(2000)
    assert value_nbytes(image) == 4000 + 10_000 + 8000
