"""Whole-slide fragment grids: fragments, tumour rule, placement, padding, cropping, workers and the cache.

The slide is a real pyramidal tiled TIFF built in ``tmp_path``: 1024 x 512 at 0.5 um/px, glass with three
blocks of real immunohistochemistry texture (scikit-image), read as 64-px regions at level 0, so each
block is one tissue fragment and the slide's region grid is 8 rows x 16 columns:

- A: x 64..256, y 64..256 -> regions rows 1-3, cols 1-3 (3 x 3);
- B: x 448..576, y 128..320 -> rows 2-4, cols 7-8 (3 x 2);
- C: x 768..960, y 320..448 -> rows 5-6, cols 12-14 (2 x 3).

The tumour outline covers 6 % of A (all in its bottom-right region), 50 % of B and 0.3 % of C.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from oncofusion.contract import InvalidRequest
from oncofusion.data.slide_grids import SlideRegionDataset, plan_fragment_grids, slide_fragment_grids
from oncofusion.data.slide_regions import Region, read_regions
from oncofusion.io.array_cache import ArrayCache, content_digest, file_digest
from oncofusion.io.slides import open_slide
from oncofusion.networks.region_encoders import region_encoder

try:
    from sample_data.slides import write_pyramid
except ImportError:
    from tests.slides import write_pyramid

WIDTH, HEIGHT, REGION, S = 1024, 512, 64, 4
BLOCKS = {"A": (64, 64, 192, 192), "B": (448, 128, 128, 192), "C": (768, 320, 192, 128)}  # x, y, w, h
TUMOR = [
    np.array([[200, 200], [248, 200], [248, 248], [200, 248]], float),  # A: 48 x 48 of 192 x 192
    np.array([[448, 128], [576, 128], [576, 224], [448, 224]], float),  # B: half
    np.array([[800, 352], [808, 352], [808, 360], [800, 360]], float),  # C: 8 x 8 of 192 x 128
]
INPUT, CHANNELS = 32, (8, 8, 16, 16)  # regions shrunk to 32 px by a narrow CNN: fast on a shared CPU
PLANNING = {"region_size": REGION, "target_mpp": 0.5, "grid_size": S, "thumbnail_size": 256}


def make_base(shift: int = 0) -> np.ndarray:
    import skimage.data as ski_data

    ihc = ski_data.immunohistochemistry()  # 512 x 512 x 3 uint8
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    for i, (x, y, w, h) in enumerate(BLOCKS.values()):
        top, left = 100 * i + shift, 50 * i + shift
        image[y : y + h, x : x + w] = ihc[top : top + h, left : left + w]
    return image


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "three_fragments.tiff", make_base(), levels=2, mpp=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two torch threads on a CPU shared with other processes run these tiny convolutions 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return region_encoder("cnn", input_size=INPUT, channels=CHANNELS)


class CallCounter:
    """Counts the encoder's forward calls through a hook (the weights, hence the cache key, stay as they are)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def grids(slide_path, encoder, **kwargs) -> np.ndarray:
    options = {**PLANNING, "annotation": TUMOR, "progress": False, **kwargs}
    return slide_fragment_grids(slide_path, encoder, **options)


def occupied(grid: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(i) for i in cell) for cell in np.argwhere(np.abs(grid).sum(-1) > 0)}


# -- planning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("min_tumor_overlap", "kept_shapes"),
    [(0.001, [(3, 3), (3, 2), (2, 3)]), (0.01, [(3, 3), (3, 2)]), (0.1, [(3, 2)])],
)
def test_fragments_below_the_tumor_overlap_are_dropped_whole(slide_path, min_tumor_overlap, kept_shapes):
    with open_slide(slide_path) as slide:
        plan = plan_fragment_grids(slide, annotation=TUMOR, min_tumor_overlap=min_tumor_overlap, **PLANNING)
    assert list(plan.fragment_shapes) == kept_shapes
    assert plan.n_fragments == len(kept_shapes) and plan.dropped_fragments == 3 - len(kept_shapes)
    # the rule is per fragment: A keeps all nine regions though only one of them touches the outline
    assert len(plan.placed) == sum(h * w for h, w in kept_shapes)


def test_no_annotation_keeps_every_fragment_and_geojson_is_read(slide_path, tmp_path):
    with open_slide(slide_path) as slide:
        assert plan_fragment_grids(slide, **PLANNING).n_fragments == 3
        geojson = tmp_path / "tumor.geojson"
        features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [p.tolist()]}}
                    for p in TUMOR]
        geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        assert plan_fragment_grids(slide, annotation=geojson, **PLANNING).fragment_shapes == ((3, 3), (3, 2))


def test_large_fragment_is_cropped_around_its_tumor(slide_path):
    """S = 2 holds 2 of A's 3 rows and columns: the window follows the tumour; without one, the centre."""
    top_left = [np.array([[64, 64], [112, 64], [112, 112], [64, 112]], float)]  # in A's region (64, 64)
    with open_slide(slide_path) as slide:
        kwargs = {**PLANNING, "grid_size": 2, "min_tumor_overlap": 0.0}
        by_tumor = plan_fragment_grids(slide, annotation=top_left, **kwargs)
        by_centre = plan_fragment_grids(slide, **kwargs)
    a_cells = {(p.region.x, p.region.y): (p.row, p.col) for p in by_tumor.placed if p.fragment == 0}
    assert a_cells == {(64, 64): (0, 0), (128, 64): (0, 1), (64, 128): (1, 0), (128, 128): (1, 1)}
    a_cells = {(p.region.x, p.region.y): (p.row, p.col) for p in by_centre.placed if p.fragment == 0}
    assert a_cells == {(128, 128): (0, 0), (192, 128): (0, 1), (128, 192): (1, 0), (192, 192): (1, 1)}
    assert by_centre.cropped_regions == 5 + 2 + 2  # A loses 5 of 9; B (3 x 2) and C (2 x 3) lose 2 each


def test_bad_grid_size_is_refused(slide_path):
    with open_slide(slide_path) as slide, pytest.raises(ValueError, match="grid_size must be a positive integer"):
        plan_fragment_grids(slide, **{**PLANNING, "grid_size": 0})


# -- embedding -----------------------------------------------------------------------------------------
def test_regions_land_at_their_cell_and_grids_are_centre_padded(slide_path, encoder):
    result = grids(slide_path, encoder)
    assert result.shape == (2, S, S, 192) and result.dtype == np.float32
    # A (3 x 3) fills rows and columns 0-2 of a 4 x 4 grid; B (3 rows x 2 columns) rows 0-2, columns 1-2
    expected = {(0, r, c) for r in range(3) for c in range(3)} | {(1, r, c) for r in range(3) for c in (1, 2)}
    assert occupied(result) == expected
    with open_slide(slide_path) as slide:
        corners = [Region(64, 64, 0, REGION, 1.0, None), Region(512, 256, 0, REGION, 1.0, None)]
        pixels = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1) for p in read_regions(slide, corners, INPUT)])
    with torch.no_grad():
        expected_vectors = encoder(pixels).numpy()
    np.testing.assert_allclose(result[0, 0, 0], expected_vectors[0], rtol=1e-4, atol=1e-5)  # A's top-left
    np.testing.assert_allclose(result[1, 2, 2], expected_vectors[1], rtol=1e-4, atol=1e-5)  # B's bottom-right


def test_workers_give_the_same_arrays(slide_path, encoder):
    serial = grids(slide_path, encoder, num_workers=0, batch_size=4)
    parallel = grids(slide_path, encoder, num_workers=2, batch_size=4)
    np.testing.assert_array_equal(serial, parallel)


def test_dataset_opens_its_own_handle_and_pickles_without_it(slide_path):
    import pickle

    dataset = SlideRegionDataset(slide_path, [Region(64, 64, 0, REGION, 1.0, None)], out_size=32)
    index, pixels = dataset[0]
    assert index == 0 and pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._slide is None
    torch.testing.assert_close(clone[0][1], pixels)
    dataset.close()
    clone.close()


def test_cache_hit_skips_the_encoder_and_changes_recompute(slide_path, encoder, tmp_path):
    cache = tmp_path / "cache"
    with CallCounter(encoder) as counter:
        first = grids(slide_path, encoder, cache_dir=cache)
        assert counter.calls > 0
        counter.calls = 0
        again = grids(slide_path, encoder, cache_dir=cache)
        assert counter.calls == 0
        np.testing.assert_array_equal(first, again)
        # a renamed copy is the same content: still a hit
        copy = tmp_path / "renamed.tiff"
        shutil.copy(slide_path, copy)
        np.testing.assert_array_equal(grids(copy, encoder, cache_dir=cache), first)
        assert counter.calls == 0
        # other planning, other annotation: recomputed
        grids(copy, encoder, cache_dir=cache, min_tumor_overlap=0.001)
        assert counter.calls > 0
        counter.calls = 0
        grids(copy, encoder, cache_dir=cache, annotation=TUMOR[1:])
        assert counter.calls > 0
        counter.calls = 0
        # the slide rewritten with other pixels under the same name: recomputed, and different
        write_pyramid(copy, make_base(shift=7), levels=2, mpp=0.5)
        changed = grids(copy, encoder, cache_dir=cache)
        assert counter.calls > 0
        assert changed.shape == first.shape and not np.allclose(changed, first)
    # another encoder (other weights): recomputed
    other = region_encoder("cnn", input_size=INPUT, channels=CHANNELS, seed=1)
    with CallCounter(other) as counter:
        grids(slide_path, other, cache_dir=cache)
        assert counter.calls > 0
    assert sorted(p.suffix for p in cache.glob("*.*")) == [".json"] * 5 + [".npy"] * 5


def test_unreadable_or_missing_slide_names_the_file(tmp_path, encoder):
    broken = tmp_path / "broken_slide.tiff"
    broken.write_bytes(b"not a slide at all")
    with pytest.raises(InvalidRequest, match="slide 'broken_slide.tiff' is not a whole-slide image"):
        slide_fragment_grids(broken, encoder, progress=False)
    with pytest.raises(InvalidRequest, match="slide 'absent.svs' not found"):
        slide_fragment_grids(tmp_path / "absent.svs", encoder, progress=False)


def test_no_fragment_left_is_a_clear_error(slide_path, encoder):
    on_glass = [np.array([[600, 400], [700, 400], [700, 500], [600, 500]], float)]
    with pytest.raises(ValueError, match="slide 'three_fragments.tiff' has no tissue fragment left.*annotation"):
        grids(slide_path, encoder, annotation=on_glass)


# -- array cache ----------------------------------------------------------------------------------------
def test_content_digest_is_of_bytes_memoised_by_stat(tmp_path, monkeypatch):
    import oncofusion.io.array_cache as array_cache

    data = tmp_path / "a.bin"
    data.write_bytes(b"x" * 1000)
    memo = tmp_path / "memo"
    digest = file_digest(data, memo)
    assert digest == hashlib.sha256(b"x" * 1000).hexdigest()
    hashed = []
    monkeypatch.setattr(array_cache, "_hash_file", lambda p: hashed.append(p) or "0" * 64)
    assert file_digest(data, memo) == digest and not hashed  # memo hit: not read again
    data.write_bytes(b"y" * 1000)  # same size, new content and mtime
    assert file_digest(data, memo) == "0" * 64 and hashed == [data]


def test_content_digest_of_a_folder_counts_names_and_bytes(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"one")
    (series / "2.dcm").write_bytes(b"two")
    before = content_digest(series)
    (series / "2.dcm").rename(series / "3.dcm")
    assert content_digest(series) != before
    with pytest.raises(FileNotFoundError, match="cannot hash 'nothing'"):
        content_digest(tmp_path / "nothing")


def test_array_cache_round_trip_and_bad_keys(tmp_path):
    cache = ArrayCache(tmp_path)
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert cache.get({"b": 1, "a": "x"}, lambda: value) is not None and cache.misses == 1
    np.testing.assert_array_equal(cache.get({"a": "x", "b": 1}, lambda: value * 0), value)  # key order
    assert cache.hits == 1
    cache.path({"a": "y"}).write_bytes(b"torn")  # unreadable entry: recomputed and replaced
    np.testing.assert_array_equal(cache.get({"a": "y"}, lambda: value + 1), value + 1)
    np.testing.assert_array_equal(np.load(cache.path({"a": "y"})), value + 1)
    with pytest.raises(TypeError, match="must hold only JSON values"):
        cache.path({"a": object()})
