"""Region planning on a whole-slide image: tissue mask, tumour outline, level choice, grid and reads.

The slide is a real pyramidal tiled TIFF built in ``tmp_path``: 2048 x 1536 at level 0 (0.25 um/px), a
left block of real immunohistochemistry texture (scikit-image) and bare white glass to its right.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from oncofusion.data.slide_regions import (
    Region,
    annotation_mask,
    plan_regions,
    read_geojson_polygons,
    read_regions,
    select_level,
    tissue_mask,
)
from oncofusion.io.slides import open_slide
from tests.slides import write_pyramid

WIDTH, HEIGHT = 2048, 1536
TISSUE_WIDTH = 1104  # level-0 columns [0, 1104) hold tissue: 138 thumbnail columns at 8 px each
THUMB = 256  # thumbnail 256 x 192: 8 level-0 pixels per thumbnail pixel
REGION = 256  # at level 1 (downsample 2): 512 level-0 pixels, a 4 x 3 grid
SPAN = 2 * REGION




@pytest.fixture(scope="module")
def base() -> np.ndarray:
    import skimage.data as ski_data

    ihc = ski_data.immunohistochemistry()  # 512 x 512 x 3 uint8
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    image[:, :TISSUE_WIDTH] = np.tile(ihc, (3, 3, 1))[:HEIGHT, :TISSUE_WIDTH]
    return image


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, base) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "tissue.tiff", base, mpp=0.25)


@pytest.fixture()
def slide(slide_path):
    with open_slide(slide_path) as opened:
        yield opened


def expected_block(shape: tuple[int, int]) -> np.ndarray:
    block = np.zeros(shape, bool)
    block[:, : TISSUE_WIDTH // (WIDTH // shape[1])] = True
    return block


# -- tissue mask ----------------------------------------------------------------------------------------
def test_tissue_mask_finds_the_tissue_block(slide):
    thumb = slide.thumbnail(THUMB)
    assert thumb.shape == (192, 256, 3)
    mask = tissue_mask(thumb)
    block = expected_block(mask.shape)
    iou = (mask & block).sum() / (mask | block).sum()
    assert iou > 0.9, iou
    assert not mask[:, 150:].any()  # bare glass stays background


def test_tissue_mask_keeps_pale_stroma_and_rejects_grainy_glass(base):
    """Glass with scanner grain (238-243) beside the tissue block: the grain is not tissue, and the
    pale stroma between the stained glands still is."""
    rng = np.random.default_rng(1)
    thumb = base[::8, ::8].copy()
    glass = thumb[:, 140:]
    glass[:] = 238 + rng.integers(0, 6, glass.shape)
    mask = tissue_mask(thumb)
    block = expected_block(mask.shape)
    assert not mask[:, 140:].any()
    assert (mask & block).sum() / (mask | block).sum() > 0.85


def test_tissue_mask_blank_and_noisy_glass_give_no_tissue():
    assert not tissue_mask(np.full((64, 80, 3), 255, np.uint8)).any()
    rng = np.random.default_rng(0)
    glass = (245 + rng.integers(0, 4, (64, 80, 3))).astype(np.uint8)  # sensor noise, no contrast
    assert not tissue_mask(glass).any()


def test_tissue_mask_dark_unsaturated_tissue_and_specks():
    image = np.full((100, 100, 3), 240, np.uint8)
    image[20:60, 20:60] = 90  # grey: no saturation, found by inverted grey only
    image[80, 80] = 90  # one-pixel speck: dust, removed
    mask = tissue_mask(image, min_object_fraction=0.001)
    np.testing.assert_array_equal(mask[20:60, 20:60], True)
    assert mask.sum() == 40 * 40
    with pytest.raises(ValueError, match=r"thumbnail must be an \(h, w, 3\) RGB array"):
        tissue_mask(np.zeros((10, 10), np.uint8))


# -- annotations ----------------------------------------------------------------------------------------
def test_annotation_mask_rasterises_at_pixel_centres():
    square = np.array([[16, 8], [48, 8], [48, 40], [16, 40]], float)  # level-0 (x, y)
    mask = annotation_mask((12, 16), [square], downsample=4.0)  # mask pixels 4..11 x, 2..9 y
    expected = np.zeros((12, 16), bool)
    expected[2:10, 4:12] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="downsample must be positive"):
        annotation_mask((4, 4), [square], 0)
    with pytest.raises(ValueError, match=r"polygon 0 must be an \(N >= 3, 2\) array"):
        annotation_mask((4, 4), [square[:2]], 1.0)


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_read_geojson_polygon_and_multipolygon(tmp_path):
    outer = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[2, 2], [4, 2], [4, 4], [2, 2]]
    document = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer, hole]}},
            {
                "type": "Feature",
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [
                        [[[20, 20], [30, 20], [30, 30], [20, 20]]],
                        [[[40, 0], [50, 0], [45, 5], [40, 0]]],
                    ],
                },
            },
        ],
    }
    polygons = read_geojson_polygons(write_json(tmp_path / "tumor.geojson", document))
    assert len(polygons) == 3  # exterior rings only: the hole is not a polygon
    np.testing.assert_array_equal(polygons[0], np.array(outer, float))
    np.testing.assert_array_equal(polygons[2][1], [50.0, 0.0])
    assert all(p.ndim == 2 and p.shape[1] == 2 for p in polygons)


def test_read_geojson_refuses_other_content(tmp_path):
    point = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}],
    }
    with pytest.raises(ValueError, match="annotation 'points.geojson' feature 0 is a Point geometry"):
        read_geojson_polygons(write_json(tmp_path / "points.geojson", point))
    with pytest.raises(ValueError, match="annotation 'bare.json' is not a GeoJSON FeatureCollection"):
        read_geojson_polygons(write_json(tmp_path / "bare.json", {"type": "Polygon", "coordinates": []}))
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(ValueError, match="annotation 'broken.geojson' is not readable JSON"):
        read_geojson_polygons(tmp_path / "broken.geojson")


# -- level and grid -------------------------------------------------------------------------------------
def test_level_closest_to_target_never_coarser(slide, tmp_path, base, caplog):
    assert slide.mpp == pytest.approx((0.25, 0.25))
    assert select_level(slide, 0.5) == 1
    assert select_level(slide, 0.4) == 0  # level 1 (0.5 um/px) would be coarser than asked
    assert select_level(slide, 5.0) == 2  # the coarsest there is
    assert select_level(slide, 0.1) == 0  # finer than the scan: the finest there is
    with caplog.at_level(logging.INFO, logger="oncofusion.data.slide_regions"):
        assert select_level(slide, None) == 0
    assert "no target pixel size" in caplog.text
    with open_slide(write_pyramid(tmp_path / "nompp.tiff", base[:512, :512], levels=2, mpp=None)) as bare:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="oncofusion.data.slide_regions"):
            assert select_level(bare, 0.5) == 0
        assert "no microns-per-pixel" in caplog.text


def test_plan_keeps_only_tissue_regions_row_major(slide):
    regions = plan_regions(slide, region_size=REGION, target_mpp=0.5, min_tissue=0.25, thumbnail_size=THUMB)
    # columns 0 and 1 are all tissue; column 2 holds 80 of 512 tissue columns (16 %), column 3 none
    assert [(r.x, r.y) for r in regions] == [(0, 0), (512, 0), (0, 512), (512, 512), (0, 1024), (512, 1024)]
    assert all(r.level == 1 and r.size == REGION and r.tumor_fraction is None for r in regions)
    assert all(r.tissue_fraction > 0.95 for r in regions)
    everything = plan_regions(slide, region_size=REGION, min_tissue=0.0, thumbnail_size=THUMB)
    assert len(everything) == 12
    tissue = {(r.x, r.y): r.tissue_fraction for r in everything}
    assert tissue[(1024, 0)] == pytest.approx(80 / 512, abs=0.03)
    assert tissue[(1536, 0)] == 0.0
    level0 = plan_regions(slide, region_size=1024, target_mpp=None, thumbnail_size=THUMB)
    assert [(r.x, r.y, r.level) for r in level0] == [(0, 0, 0), (0, 1024, 0)]


def test_plan_drops_regions_outside_the_tumor(slide):
    kwargs = {"region_size": REGION, "target_mpp": 0.5, "thumbnail_size": THUMB}
    on_glass = [np.array([[1600, 100], [2000, 100], [2000, 1400], [1600, 1400]], float)]
    assert plan_regions(slide, tumor_polygons=on_glass, **kwargs) == []
    # x 400..600, y 100..520: 8-18 % of the two top-left regions, a 0.3 % sliver of the two below them
    tumor = [np.array([[400, 100], [600, 100], [600, 520], [400, 520]], float)]
    kept = plan_regions(slide, tumor_polygons=tumor, min_tumor_overlap=0.01, **kwargs)
    assert [(r.x, r.y) for r in kept] == [(0, 0), (512, 0)]
    assert kept[0].tumor_fraction == pytest.approx(112 * 412 / SPAN**2, abs=0.01)
    assert kept[1].tumor_fraction == pytest.approx(88 * 412 / SPAN**2, abs=0.01)
    slivers = plan_regions(slide, tumor_polygons=tumor, min_tumor_overlap=0.001, **kwargs)
    assert [(r.x, r.y) for r in slivers] == [(0, 0), (512, 0), (0, 512), (512, 512)]
    assert all(0 < r.tumor_fraction < 0.01 for r in slivers[2:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"region_size": 0}, "region_size must be a positive integer"),
        ({"region_size": 256.0}, "region_size must be a positive integer"),
        ({"min_tissue": 1.5}, r"min_tissue must lie in \[0, 1\]"),
        ({"min_tumor_overlap": -0.1}, r"min_tumor_overlap must lie in \[0, 1\]"),
        ({"target_mpp": 0.0}, "target_mpp must be positive or None"),
        ({"thumbnail_size": 0}, "thumbnail_size must be positive"),
    ],
)
def test_plan_refuses_bad_parameters(slide, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_regions(slide, **kwargs)


# -- reading --------------------------------------------------------------------------------------------
def test_read_regions_shapes_content_and_white_padding(slide, base):
    interior = Region(512, 512, 1, REGION, 1.0, None)
    edge = Region(0, 1280, 1, REGION, 1.0, None)  # level-1 rows 640..896 of 768: 128 rows past the edge
    first, second = read_regions(slide, [interior, edge])
    assert first.shape == second.shape == (REGION, REGION, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, slide.read_region((512, 512), 1, (REGION, REGION)))
    np.testing.assert_array_equal(first, base[::2, ::2][256:512, 256:512])
    np.testing.assert_array_equal(second[:128], base[::2, ::2][640:768, :REGION])
    assert (second[128:] == 255).all()
    (small,) = read_regions(slide, [interior], out_size=64)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    assert abs(float(small.mean()) - float(first.mean())) < 2.0  # antialiased: the mean colour survives
    with pytest.raises(ValueError, match="out_size must be a positive integer or None"):
        read_regions(slide, [interior], out_size=0)


def test_read_regions_pads_white_whatever_the_slide_background(slide):
    slide.background = (0, 0, 0)  # a vendor whose fill colour is black
    corner = Region(1536, 1024, 1, REGION, 0.0, None)  # level-1 768..1024 x 512..768: inside, on glass
    right = Region(1792, 0, 1, REGION, 0.0, None)  # level-1 columns 896..1152 of 1024: 128 past the edge
    (pixels,) = read_regions(slide, [right])
    assert (pixels[:, 128:] == 255).all()
    (inside,) = read_regions(slide, [corner])
    assert (inside == 255).all()  # glass, not padding
