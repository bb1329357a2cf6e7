"""SYNTHETIC whole-slide images: small tiled pyramidal TIFFs that OpenSlide reads, and H&E-like tissue
texture made from the one real microscopy image that ships offline (scikit-image's immunohistochemistry
sample, ``ihc.png``).

No real multi-level slide exists offline, so the sample data and the tests build their own pyramids with
tifffile (a ``dev`` dependency: ``make setup`` installs it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

#: TIFF resolution units tifffile writes, in micrometres per unit
_PER_UNIT = {"CENTIMETER": 1e4, "INCH": 25400.0}
DOWNSAMPLES = ("decimate", "mean")


def _half(level: np.ndarray, how: str) -> np.ndarray:
    """The next level: every other pixel (exact, so tests can check reads) or the 2x2 mean (no aliasing)."""
    if how == "decimate":
        return np.ascontiguousarray(level[::2, ::2])
    from PIL import Image

    return np.asarray(Image.fromarray(level).reduce(2))


def write_pyramid(
    path: Path,
    base: np.ndarray,
    levels: int = 3,
    mpp: float | None = 0.5,
    unit: str = "CENTIMETER",
    downsample: str = "decimate",
    description: str | None = None,
    tile: int = 128,
):
    """A tiled pyramidal TIFF of the ``(H, W, 3)`` uint8 ``base``, each level half the previous.

    ``downsample`` makes each level by ``"decimate"`` (every other pixel: exact, so reads are checkable) or
    ``"mean"`` (2x2 averages, as scanners do). ``mpp`` (micrometres per level-0 pixel) is written as the TIFF
    resolution OpenSlide turns into ``openslide.mpp-x/y``; ``description`` goes into ImageDescription.
    """
    import tifffile

    if downsample not in DOWNSAMPLES:
        raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
    if unit not in _PER_UNIT:
        raise ValueError(f"unit must be one of {sorted(_PER_UNIT)}, got {unit!r}")
    per_unit = _PER_UNIT[unit]
    with tifffile.TiffWriter(path) as tif:
        level = base
        for index in range(levels):
            kwargs = {}
            if mpp is not None:
                res = per_unit / (mpp * 2**index)
                kwargs = {"resolution": (res, res), "resolutionunit": unit}
            if index == 0 and description is not None:
                kwargs.update(description=description, metadata=None)
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if index == 0 else 1,
                **kwargs,
            )
            level = _half(level, downsample)
    return path


# -- H&E-like texture ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def stain_source() -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and DAB optical densities (``rgb2hed``) of scikit-image's real IHC image, float32
    ``(512, 512)`` each: the nuclei and the stained membranes/cytoplasm of real tissue."""
    from skimage import data
    from skimage.color import rgb2hed

    hed = rgb2hed(data.immunohistochemistry()).astype(np.float32)
    return hed[..., 0], hed[..., 2]


def he_texture(
    hematoxylin: float = 1.0,
    eosin: float = 0.25,
    eosin_floor: float = 0.02,
    zoom: float = 1.0,
    stretch: float = 1.0,
) -> np.ndarray:
    """An H&E-looking ``(N, M, 3)`` uint8 tile from the real IHC texture: its hematoxylin kept (times
    ``hematoxylin``), its DAB stain recoloured as eosin (``eosin`` times the DAB density plus
    ``eosin_floor``), resampled by ``zoom`` (< 1 packs more, smaller nuclei into a pixel area) and
    stretched ``stretch``-fold along the rows (> 1 draws fibre-like stroma). The tile is mirrored into a
    2x2 block, so :func:`tile_texture` repeats it without seams."""
    from scipy import ndimage
    from skimage.color import hed2rgb

    if zoom <= 0 or stretch <= 0:
        raise ValueError(f"zoom and stretch must be positive, got zoom={zoom}, stretch={stretch}")
    h, d = stain_source()
    factors = (zoom * stretch, zoom)
    h = ndimage.zoom(h, factors, order=1)
    d = ndimage.zoom(d, factors, order=1)
    stains = np.stack([h * hematoxylin, d * eosin + eosin_floor, np.zeros_like(h)], axis=-1)
    rgb = (np.clip(hed2rgb(stains), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    top = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def fill_polygons(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of ``polygons`` (``(N, 2)`` level-0 (x, y) vertices), filled by PIL: fast
    at full slide resolution. Pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, the
    convention of :func:`oncofusion.data.slide_regions.annotation_mask`, up to PIL's edge rule."""
    from PIL import Image, ImageDraw

    canvas = Image.new("1", (int(shape[1]), int(shape[0])), 0)
    draw = ImageDraw.Draw(canvas)
    for vertices in polygons:
        draw.polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in np.asarray(vertices, float)], fill=1)
    return np.asarray(canvas, bool)


def tile_texture(texture: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``texture`` repeated over an ``(H, W)`` canvas from a random offset, ``(H, W, 3)`` uint8."""
    th, tw = texture.shape[:2]
    dy, dx = int(rng.integers(th)), int(rng.integers(tw))
    reps = (-(-(shape[0] + dy) // th), -(-(shape[1] + dx) // tw), 1)
    return np.tile(texture, reps)[dy:dy + shape[0], dx:dx + shape[1]]
