"""The decoded-image cache: a byte budget, LRU eviction, stale files, private copies, slides as handles."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from oncofusion.contract import InvalidRequest
from oncofusion.io.cache import ImageCache
from oncofusion.io.slides import DEFAULT_TILE_CACHE_BYTES, SlideImage

KB = 1000  # a float32 tensor of 250 values


class CountingLoader:
    """Stands in for the readers: a float32 ``MetaTensor`` whose size is set per file name, filled with
    the file's first byte so a re-read after a rewrite is visible."""

    def __init__(self, sizes: dict[str, int] | None = None, delay: float = 0.0):
        self.sizes = sizes or {}
        self.delay = delay
        self.calls: list[tuple[str, str, dict]] = []
        self._lock = threading.Lock()

    def __call__(self, path: str, kind: str, **options):
        with self._lock:
            self.calls.append((Path(path).name, kind, options))
        time.sleep(self.delay)
        nbytes = self.sizes.get(Path(path).name, KB)
        value = float(Path(path).read_bytes()[0])
        return MetaTensor(
            torch.full((nbytes // 4,), value), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
        )


def _files(folder: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        (folder / name).write_bytes(bytes([len(paths) + 1]))
        paths.append(folder / name)
    return paths


def test_evicts_least_recently_used_by_bytes(tmp_path):
    a, b, c, d, big = _files(tmp_path, "a", "b", "c", "d", "big")
    loader = CountingLoader({"big": 2500})
    cache = ImageCache(max_bytes=3 * KB, loader=loader)
    for path in (a, b, c):
        cache.get(path)
    assert (len(cache), cache.nbytes) == (3, 3 * KB)
    cache.get(a)  # a becomes the most recently used: b is now the oldest
    cache.get(d)
    assert (len(cache), cache.nbytes, cache.hits, cache.misses) == (3, 3 * KB, 1, 4)
    cache.get(a)
    cache.get(c)
    cache.get(d)
    assert len(loader.calls) == 4  # a, c, d still cached
    cache.get(b)
    assert len(loader.calls) == 5  # b was evicted, not a
    cache.get(big)  # 2500 bytes: everything else must go
    assert (len(cache), cache.nbytes) == (1, 2500)


def test_oversize_entry_is_returned_but_not_cached(tmp_path):
    small, huge = _files(tmp_path, "small", "huge")
    loader = CountingLoader({"huge": 4 * KB})
    cache = ImageCache(max_bytes=3 * KB, loader=loader)
    cache.get(small)
    image = cache.get(huge)
    assert image.numel() * 4 == 4 * KB
    assert (len(cache), cache.nbytes) == (1, KB)  # the small one was not evicted for nothing
    cache.get(huge)
    assert [c[0] for c in loader.calls] == ["small", "huge", "huge"]


def test_zero_budget_caches_nothing_and_hands_over_the_decoded_image(tmp_path):
    (path,) = _files(tmp_path, "a")
    loader = CountingLoader()
    cache = ImageCache(max_bytes=0, loader=loader)
    cache.get(path)
    cache.get(path)
    assert len(loader.calls) == 2 and len(cache) == 0


def test_returns_private_copies(tmp_path):
    (path,) = _files(tmp_path, "a")
    cache = ImageCache(max_bytes=10 * KB, loader=CountingLoader())
    first = cache.get(path)
    first.fill_(-5.0)  # a predictor normalising in place
    second = cache.get(path)
    assert float(second.min()) == 1.0 and second.data_ptr() != first.data_ptr()
    np.testing.assert_array_equal(np.diag(second.affine.numpy()), [2, 3, 4, 1])  # metadata kept


def test_rewritten_file_is_read_again_and_its_stale_copy_freed(tmp_path):
    (path,) = _files(tmp_path, "a")
    loader = CountingLoader()
    cache = ImageCache(max_bytes=10 * KB, loader=loader)
    assert float(cache.get(path)[0]) == 1.0
    path.write_bytes(bytes([9]))
    later = time.time_ns() + 10**9
    os.utime(path, ns=(later, later))
    assert float(cache.get(path)[0]) == 9.0
    assert len(loader.calls) == 2
    assert (len(cache), cache.nbytes) == (1, KB)
    assert float(cache.get(path)[0]) == 9.0 and len(loader.calls) == 2


def test_kind_and_options_are_part_of_the_key(tmp_path):
    (path,) = _files(tmp_path, "cine.dcm")
    loader = CountingLoader()
    cache = ImageCache(max_bytes=10 * KB, loader=loader)
    cache.get(path, "frame", frame=0)
    cache.get(path, "frame", frame=1)
    cache.get(path, "frame", frame=0)
    cache.get(path, "volume")
    assert loader.calls == [
        ("cine.dcm", "frame", {"frame": 0}),
        ("cine.dcm", "frame", {"frame": 1}),
        ("cine.dcm", "volume", {}),
    ]
    with pytest.raises(ValueError, match="options must be hashable"):
        cache.get(path, "frame", frame=[1])


def test_concurrent_requests_decode_once(tmp_path):
    (path,) = _files(tmp_path, "a")
    for budget in (10 * KB, 0):  # cached, and too big to cache: every caller still gets its own copy
        loader = CountingLoader(delay=0.3)
        cache = ImageCache(max_bytes=budget, loader=loader)
        results: list[torch.Tensor] = []

        def click(cache: ImageCache = cache, results: list = results) -> None:
            results.append(cache.get(path))

        threads = [threading.Thread(target=click) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(loader.calls) == 1
        assert len({r.data_ptr() for r in results}) == 4


def test_decode_error_reaches_every_waiter_and_is_not_cached(tmp_path):
    (path,) = _files(tmp_path, "a")
    calls = []

    def failing(path, kind, **options):
        calls.append(path)
        time.sleep(0.2)
        raise InvalidRequest("cannot read image 'a'", 415)

    cache = ImageCache(max_bytes=10 * KB, loader=failing)
    errors: list[Exception] = []

    def worker():
        try:
            cache.get(path)
        except InvalidRequest as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and len(calls) == 1
    with pytest.raises(InvalidRequest):
        cache.get(path)
    assert len(calls) == 2


def test_slide_is_cached_as_a_shared_handle(tmp_path):
    import tifffile

    tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "slide.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(tile, tile=(128, 128), photometric="rgb")
        tif.write(tile[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    cache = ImageCache(max_bytes=2 * DEFAULT_TILE_CACHE_BYTES)
    slide = cache.get(path, "slide")
    assert isinstance(slide, SlideImage)
    assert cache.get(path, "slide") is slide  # reads change nothing: no copy
    assert cache.nbytes == DEFAULT_TILE_CACHE_BYTES
    np.testing.assert_array_equal(slide.read_region((10, 20), 0, (5, 4)), tile[20:24, 10:15])


def test_default_loader_reads_volumes_and_frames(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(tmp_path / "us.png")
    cache = ImageCache()
    assert tuple(cache.get(tmp_path / "ct.nii.gz").shape) == (1, 4, 5, 6)
    assert tuple(cache.get(tmp_path / "us.png", "frame").shape) == (3, 12, 10)
    assert cache.nbytes == 4 * (4 * 5 * 6 + 3 * 12 * 10)


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidRequest, match="image 'nope.nii.gz' not found") as e:
        ImageCache().get(tmp_path / "nope.nii.gz")
    assert e.value.status_code == 400
    with pytest.raises(InvalidRequest, match="label mask 'nope.nrrd' not found"):
        ImageCache().get(tmp_path / "nope.nrrd", what="label mask")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes must be an integer >= 0"):
            ImageCache(max_bytes=bad)
