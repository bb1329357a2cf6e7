"""Read one 2D frame: DICOM ultrasound as scanners write it, or a PNG/JPEG export.

Output is a float32 ``MetaTensor`` ``(C, W, H)`` (MONAI's 2D convention: spatial axis 0 is the column
x, axis 1 the row y, so ``image[:, i, j]`` is the pixel Slicer calls IJK ``(i, j)``), with a 3x3 affine
whose diagonal is the pixel size in mm.

Values:

- colour images (RGB, YBR, palette) come out as RGB in [0, 255] whatever the encoding (deeper samples
  keep their high byte, as a display shows them): a 16-bit palette or 16-bit RGB is a storage detail,
  and a model trained on one scanner must see the same range from another;
- grey-scale images keep their values after the modality LUT (rescale slope/intercept), which may be
  calibrated; MONOCHROME1 is inverted so that bright means more signal, as for MONOCHROME2.

Pixel size, in the order tried (``spacing_source`` in the metadata says which was used):

1. ``"ultrasound_region"``: the SequenceOfUltrasoundRegions region in cm (units code 3) that covers the
   image centre, else the largest one, preferring 2D tissue regions (spatial format 1);
2. ``"pixel_spacing"``: PixelSpacing;
3. ``"none"``: 1 pixel = 1 unit. Lengths and areas in mm are then unavailable: a model must not report
   them. PNG/JPEG exports are always ``"none"``: their DPI fields describe a printer, not the patient.

A cine (multi-frame) file gives one frame: the ``frame`` argument (0-based) when given, else the
sharpest frame (highest variance of the Laplacian of the luminance; the first one on ties), because a
cine loop holds transition and motion-blurred frames while the sharpest is the one a sonographer would
freeze. ``frame_index``, ``frame_choice`` (``"requested"``, ``"sharpest"`` or ``"only"``) and
``num_frames`` in the metadata record what was used. pydicom decodes every frame of a cine to reach
one, so a long loop costs its full decoding time once (the image cache keeps the result).

Size: the header (DICOM tags read with ``stop_before_pixels``; Pillow's lazy ``Image.open``) is checked
against the server's :class:`~oncofusion.io.limits.ImageLimits` before any pixel is decoded. A DICOM
cine counts the pixels of all its frames (pydicom decodes them all); a PNG/JPEG counts one frame. A
PNG/JPEG beyond Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, twice over) is
refused as too big as well, whatever the server's limits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset
from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, convert_color_space
from scipy import ndimage

from oncofusion.contract import InvalidRequest
from oncofusion.io.limits import DEFAULT_LIMITS, FLOAT32_BYTES, ImageHeader, ImageLimits, check_header

logger = logging.getLogger(__name__)

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: ultrasound region units code for centimetres (DICOM PS3.3 C.8.5.5.1.15)
US_UNITS_CM = 3
#: ultrasound region spatial format of a 2D (tissue or flow) image
US_FORMAT_2D = 1
#: photometric interpretations whose decoded samples are already RGB (JPEG 2000 undoes ICT/RCT)
RGB_LIKE = ("RGB", "YBR_ICT", "YBR_RCT")
#: photometric interpretations pydicom 2.4 returns as YCbCr, for every transfer syntax
YBR_FULL_LIKE = ("YBR_FULL", "YBR_FULL_422")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


# -- frame choice ------------------------------------------------------------------------------------
def laplacian_variance(luminance: np.ndarray) -> float:
    """Sharpness of a 2D grey image: variance of its Laplacian (blur removes the high frequencies)."""
    return float(ndimage.laplace(np.asarray(luminance, dtype=np.float32)).var())


def choose_frame(
    num_frames: int, frame: int | str | None, sharpness: Any, name: str, what: str
) -> tuple[int, str]:
    """The 0-based frame to use and why; ``sharpness(i)`` scores frame ``i`` and is only called for cines."""
    if frame is not None:
        if isinstance(frame, str) and frame.strip().lstrip("-").isdigit():
            frame = int(frame)  # form-encoded requests send every value as a string
        if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
            raise InvalidRequest(f"frame must be an integer frame index (0-based), got {frame!r}", 422)
        if not 0 <= int(frame) < num_frames:
            plural = "frame" if num_frames == 1 else "frames"
            raise InvalidRequest(
                f"frame {frame} is out of range for {what} '{name}': it has {num_frames} {plural} "
                f"(0-{num_frames - 1})",
                422,
            )
        return int(frame), "requested"
    if num_frames == 1:
        return 0, "only"
    scores = [sharpness(i) for i in range(num_frames)]
    return int(np.argmax(scores)), "sharpest"


# -- pixel spacing -----------------------------------------------------------------------------------
class _Region(NamedTuple):
    index: int
    box: tuple[int, int, int, int]  # min x, min y, max x, max y (pixels, inclusive)
    spacing_mm: tuple[float, float]
    is_2d: bool

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return (x1 - x0 + 1) * (y1 - y0 + 1)

    def covers(self, x: float, y: float) -> bool:
        x0, y0, x1, y1 = self.box
        return x0 <= x <= x1 and y0 <= y <= y1


_REGION_BOX = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")


def _region_spacing(ds: Dataset) -> tuple[float, float, int] | None:
    """(x mm, y mm, region index) from SequenceOfUltrasoundRegions, or None when no region is in cm."""
    regions = []
    for index, item in enumerate(ds.get("SequenceOfUltrasoundRegions", []) or []):
        units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
        dx, dy = item.get("PhysicalDeltaX"), item.get("PhysicalDeltaY")
        if units != (US_UNITS_CM, US_UNITS_CM) or not dx or not dy:
            continue  # Doppler strips (seconds, cm/s), M-mode, uncalibrated regions
        box = tuple(int(item.get(k, 0) or 0) for k in _REGION_BOX)
        spacing = (abs(float(dx)) * 10.0, abs(float(dy)) * 10.0)  # cm -> mm
        regions.append(_Region(index, box, spacing, item.get("RegionSpatialFormat") == US_FORMAT_2D))
    if not regions:
        return None
    if any(r.is_2d for r in regions):
        regions = [r for r in regions if r.is_2d]
    centre = ((int(ds.Columns) - 1) / 2.0, (int(ds.Rows) - 1) / 2.0)
    chosen = max([r for r in regions if r.covers(*centre)] or regions, key=lambda r: r.area)
    return chosen.spacing_mm[0], chosen.spacing_mm[1], chosen.index


def dicom_spacing(ds: Dataset) -> tuple[float, float, str, dict[str, Any]]:
    """Pixel size (x = along a row, y = down a column) in mm, where it came from, and details."""
    region = _region_spacing(ds)
    if region is not None:
        return region[0], region[1], "ultrasound_region", {"ultrasound_region": region[2]}
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) >= 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
        return float(spacing[1]), float(spacing[0]), "pixel_spacing", {}  # PixelSpacing is (row, column)
    return 1.0, 1.0, "none", {}


# -- DICOM pixels ------------------------------------------------------------------------------------
def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _palette_bits(ds: Dataset, rgb: np.ndarray) -> int:
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    # some scanners declare 16-bit palette entries but store 8-bit values in them
    return 8 if bits == 16 and int(rgb.max()) <= 255 else bits


def _high_byte(samples: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned colour samples of ``bits`` bits as float32 in [0, 255]."""
    samples = samples.astype(np.uint32)
    if bits > 8:
        samples = samples >> (bits - 8)
    return samples.astype(np.float32)


def dicom_to_channels(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame (rows, cols[, samples]) as float32 (rows, cols, C) with the values described in
    the module docstring."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        if photometric == "MONOCHROME1":
            lo, hi = (float(v) for v in apply_modality_lut(np.array(_stored_range(ds)), ds))
            values = np.float32(lo + hi) - values
        return values[..., None]
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds)
        return _high_byte(rgb, _palette_bits(ds, rgb))
    if photometric in RGB_LIKE or photometric in YBR_FULL_LIKE:
        if photometric in YBR_FULL_LIKE:
            raw = convert_color_space(raw, "YBR_FULL", "RGB")
        return _high_byte(raw, int(ds.get("BitsStored", 8)))
    raise InvalidRequest(
        f"photometric interpretation '{photometric}' is not supported: export the image as RGB, YBR_FULL, "
        "PALETTE COLOR or MONOCHROME",
        415,
    )


def _luminance(channels: np.ndarray) -> np.ndarray:
    if channels.shape[-1] == 1:
        return channels[..., 0]
    return channels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _raw_luminance(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Luminance of a decoded frame up to a scale shared by all frames, which leaves the sharpest frame
    unchanged: Y of YCbCr directly, since converting every frame of a cine to RGB costs seconds."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in YBR_FULL_LIKE:
        return raw[..., 0]
    if photometric in RGB_LIKE:
        return _luminance(raw.astype(np.float32))
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return raw
    return _luminance(dicom_to_channels(raw, ds))


def undecodable_reason(ds: Dataset, error: Exception) -> str:
    """Why pixel data could not be decoded, naming the transfer syntax, and the fix."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", str(syntax))
    reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    return (
        f"its transfer syntax '{name}' could not be decoded here ({reason}); export it uncompressed, or "
        "install pylibjpeg with its plugins on the server"
    )


def dicom_frame_header(ds: Dataset) -> ImageHeader:
    """What decoding a 2D DICOM allocates, from its tags: every frame's samples as pydicom decodes them
    (BitsAllocated rounded up to bytes), or the float32 channels of one frame, whichever is larger."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    sample_bytes = max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))
    channels = 1 if str(ds.get("PhotometricInterpretation", "")).upper().startswith("MONOCHROME") else 3
    shape = (cols, rows) if frames == 1 else (cols, rows, frames)
    decoded = cols * rows * frames * samples * sample_bytes
    return ImageHeader(shape=shape, nbytes=max(decoded, cols * rows * channels * FLOAT32_BYTES), unit="pixels")


def _dcmread(path: Path, what: str, headers_only: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES, stop_before_pixels=headers_only)
    except Exception as e:
        raise InvalidRequest(f"cannot read {what} '{path.name}' as DICOM: {type(e).__name__}", 415) from e


def _read_dicom(
    path: Path, frame: int | str | None, what: str, limits: ImageLimits | None
) -> tuple[np.ndarray, dict[str, Any]]:
    header = _dcmread(path, what, headers_only=True)
    if "Rows" not in header or "Columns" not in header:
        raise InvalidRequest(f"{what} '{path.name}' is a DICOM file without an image (e.g. a report)", 415)
    try:
        size = dicom_frame_header(header)
    except (TypeError, ValueError) as e:  # an empty or non-numeric Rows, Columns, NumberOfFrames...
        raise InvalidRequest(f"{what} '{path.name}' has malformed image size tags: {type(e).__name__}", 415) from e
    check_header(size, path.name, what, limits)
    num_frames = int(header.get("NumberOfFrames", 1) or 1)
    if frame is not None:  # a bad index is answered before the (slow) decoding
        choose_frame(num_frames, frame, None, path.name, what)
    ds = _dcmread(path, what, headers_only=False)
    if "PixelData" not in ds:
        raise InvalidRequest(f"{what} '{path.name}' is a DICOM file without an image (e.g. a report)", 415)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # the decoder names a missing plugin or a corrupt stream
        raise InvalidRequest(f"cannot decode {what} '{path.name}': {undecodable_reason(ds, e)}", 415) from e
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if num_frames == 1:
        pixels = pixels[None]
    expected_ndim = 3 if samples == 1 else 4
    if pixels.ndim != expected_ndim or pixels.shape[0] != num_frames:
        raise InvalidRequest(
            f"{what} '{path.name}' decodes to shape {'x'.join(map(str, pixels.shape))}, which is not "
            f"{num_frames} frame(s) of {ds.Rows}x{ds.Columns} with {samples} sample(s) per pixel",
            422,
        )
    index, choice = choose_frame(
        num_frames, frame, lambda i: laplacian_variance(_raw_luminance(pixels[i], ds)), path.name, what
    )
    channels = dicom_to_channels(pixels[index], ds)
    sx, sy, source, details = dicom_spacing(ds)
    meta = {
        "frame_index": index,
        "frame_choice": choice,
        "num_frames": num_frames,
        "spacing_source": source,
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "modality": str(ds.get("Modality", "")),
        **details,
    }
    return channels, {"spacing": (sx, sy), **meta}


# -- PNG / JPEG --------------------------------------------------------------------------------------
def _pil_to_channels(image: Any, name: str, what: str) -> np.ndarray:
    mode = image.mode
    if mode in ("1", "LA", "La"):
        image = image.convert("L")
    elif mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")  # alpha is dropped, not composited: it carries no anatomy
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return pixels.astype(np.float32)[..., None]
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return pixels.astype(np.float32)
    raise InvalidRequest(f"{what} '{name}' has unsupported pixel mode '{mode}'", 415)


def pil_frame_header(image: Any) -> ImageHeader:
    """What decoding one frame of a lazily opened PNG/JPEG allocates: its float32 channels (grey or RGB,
    as :func:`_pil_to_channels` converts it)."""
    cols, rows = (int(v) for v in image.size)
    channels = 1 if len(image.getbands()) <= 2 and image.mode not in ("P", "PA") else 3
    return ImageHeader(shape=(cols, rows), nbytes=cols * rows * channels * FLOAT32_BYTES, unit="pixels")


def _pil_too_big(error: Exception, name: str, what: str, limits: ImageLimits | None) -> InvalidRequest:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    most = (limits or DEFAULT_LIMITS).max_voxels
    return InvalidRequest(
        f"{what} '{name}' is too large to decode ({reason}); this server accepts at most {most:,} pixels "
        "(--conf max_image_voxels) and Pillow refuses such images in any case: downsample it",
        413,
    )


def _read_pil(
    path: Path, frame: int | str | None, what: str, limits: ImageLimits | None
) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # lazy: reads the header, decodes nothing yet
            check_header(pil_frame_header(image), path.name, what, limits)
            num_frames = int(getattr(image, "n_frames", 1))
            mode = image.mode

            def channels_of(i: int) -> np.ndarray:
                image.seek(i)
                return _pil_to_channels(image, path.name, what)

            index, choice = choose_frame(
                num_frames, frame, lambda i: laplacian_variance(_luminance(channels_of(i))), path.name, what
            )
            channels = channels_of(index)
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as e:
        raise _pil_too_big(e, path.name, what, limits) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InvalidRequest(f"cannot read {what} '{path.name}' as PNG/JPEG: {type(e).__name__}", 415) from e
    meta = {
        "frame_index": index,
        "frame_choice": choice,
        "num_frames": num_frames,
        "spacing_source": "none",
        "image_mode": mode,
    }
    return channels, {"spacing": (1.0, 1.0), **meta}


# -- entry point -------------------------------------------------------------------------------------
def _only_file(folder: Path, what: str) -> Path:
    """The one file of a one-instance series folder, as a DICOMweb datastore downloads an ultrasound series;
    a folder of several images is refused, since which capture the user meant cannot be known."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if len(files) != 1:
        raise InvalidRequest(
            f"{what} '{folder.name}' is a folder of {len(files)} files: a 2D frame is one DICOM (a single "
            "frame or a cine), PNG or JPEG file; send one capture", 415
        )
    return files[0]


def read_frame(
    path: str | os.PathLike, frame: int | str | None = None, what: str = "image", limits: ImageLimits | None = None
) -> MetaTensor:
    """Decode one 2D frame into float32 ``(C, W, H)`` with a 3x3 affine (pixel size in mm on the diagonal).

    ``frame`` picks a frame of a cine (0-based); without it the sharpest frame is used. The header is
    checked against ``limits`` (default: :data:`~oncofusion.io.limits.DEFAULT_LIMITS`) before decoding.
    See the module docstring for the value ranges and the source of the pixel size (``spacing_source``).
    """
    path = Path(path)
    if not str(path) or not path.exists():
        raise InvalidRequest(f"{what} '{path.name or path}' not found", 400)
    if path.is_dir():
        path = _only_file(path, what)
    if _is_dicom(path):
        channels, meta = _read_dicom(path, frame, what, limits)
    elif path.suffix.lower() in PIL_SUFFIXES:
        channels, meta = _read_pil(path, frame, what, limits)
    else:
        raise InvalidRequest(
            f"unsupported image format for '{path.name}': send a DICOM file, a PNG or a JPEG", 415
        )

    rows, cols, num_channels = channels.shape
    if min(rows, cols) < 2:
        raise InvalidRequest(
            f"{what} '{path.name}' is {cols}x{rows} pixels: a 2D image needs at least 2 pixels each way", 422
        )
    data = torch.from_numpy(np.ascontiguousarray(channels.transpose(2, 1, 0)))  # (C, W, H)
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        raise InvalidRequest(f"{what} '{path.name}' contains {int((~finite).sum())} NaN/infinite values", 422)
    sx, sy = meta.pop("spacing")
    affine = torch.diag(torch.tensor([sx, sy, 1.0], dtype=torch.float64))
    meta.update(
        {
            "filename_or_obj": str(path),
            "spatial_shape": (cols, rows),
            "original_channel_dim": 0,
            "spacing_unit": "mm" if meta["spacing_source"] != "none" else "pixel",
        }
    )
    logger.debug("read frame %s: %dx%dx%d (%s)", path.name, num_channels, cols, rows, meta["frame_choice"])
    return MetaTensor(data, affine=affine, meta=meta)
