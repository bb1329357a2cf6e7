"""The image cache's bookkeeping: file signatures, sizes, who gets a copy, hit counts and its debug log."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from oncofusion.io.cache import ImageCache, file_signature, value_nbytes

MIB = 2**20


def _file(folder: Path, name: str, content: bytes = b"x") -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class SizedLoader:
    """``name`` -> a uint8 array of ``sizes[name]`` bytes (default 1 KiB); records each call."""

    def __init__(self, sizes: dict[str, int] | None = None):
        self.sizes = sizes or {}
        self.calls: list[str] = []
        self.values: list[np.ndarray] = []

    def __call__(self, path: str, kind: str, **options):
        name = Path(path).name
        self.calls.append(name)
        self.values.append(np.zeros(self.sizes.get(name, 1024), np.uint8))
        return self.values[-1]


def test_file_signature_of_a_file(tmp_path):
    path = _file(tmp_path, "ct.nii.gz", b"12345")
    os.utime(path, ns=(10**18, 10**18))
    assert file_signature(path) == (os.path.realpath(path), 10**18, 5)


def test_file_signature_of_a_folder_sums_its_files_and_takes_the_newest_time(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    older = _file(folder, "a.dcm", b"abc")
    newest = _file(folder, "b.dcm", b"defgh")
    (folder / "sub").mkdir()
    os.utime(_file(folder / "sub", "c.dcm", b"ignored"), ns=(3 * 10**18, 3 * 10**18))
    os.utime(folder / "sub", ns=(3 * 10**18, 3 * 10**18))
    os.utime(older, ns=(10**17, 10**17))
    os.utime(newest, ns=(2 * 10**18, 2 * 10**18))
    os.utime(folder, ns=(10**18, 10**18))
    assert file_signature(folder) == (os.path.realpath(folder), 2 * 10**18, 8)
    os.utime(newest, ns=(10**17, 10**17))
    assert file_signature(folder)[1] == 10**18


def test_value_nbytes_of_arrays_declared_sizes_and_other_objects():
    assert value_nbytes(np.zeros((3, 5), np.float32)) == 60

    class Handle:
        nbytes = 123.0

    assert value_nbytes(Handle()) == 123
    assert value_nbytes("a study") == sys.getsizeof("a study")
    assert value_nbytes(None) == sys.getsizeof(None)


def test_an_uncached_image_is_handed_over_and_a_cached_one_copied(tmp_path):
    big, small = _file(tmp_path, "big"), _file(tmp_path, "small")
    loader = SizedLoader({"big": 4096})
    cache = ImageCache(max_bytes=2048, loader=loader)
    assert cache.get(big) is loader.values[-1]
    image = cache.get(small)
    assert image is not loader.values[-1]
    np.testing.assert_array_equal(image, loader.values[-1])
    assert cache.get(small) is not image


def test_every_hit_is_counted(tmp_path):
    path = _file(tmp_path, "a")
    cache = ImageCache(max_bytes=4096, loader=SizedLoader())
    for _ in range(4):
        cache.get(path)
    assert (cache.hits, cache.misses) == (3, 1)


@pytest.mark.parametrize("size, cached", [(0, False), (1, True), (2048, True), (2049, False)])
def test_only_images_of_one_byte_up_to_the_budget_are_cached(tmp_path, size, cached):
    path = _file(tmp_path, "a")
    loader = SizedLoader({"a": size})
    cache = ImageCache(max_bytes=2048, loader=loader)
    cache.get(path)
    cache.get(path)
    assert len(loader.calls) == (1 if cached else 2)
    assert (len(cache), cache.nbytes) == ((1, size) if cached else (0, 0))


@pytest.mark.parametrize("waiters", [1, 2])
def test_the_decoding_caller_gets_a_copy_when_others_waited_for_it(tmp_path, waiters):
    path = _file(tmp_path, "a")
    value = np.arange(10, dtype=np.uint8)
    cache: ImageCache

    def loader(path, kind, **options):
        _wait_for(lambda: cache.hits == waiters)  # the other callers now wait for this decode
        return value

    cache = ImageCache(max_bytes=0, loader=loader)  # nothing is cached: the decode is only shared
    results = {}

    def click(name: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.setdefault(name, cache.get(path)))
        thread.start()
        return thread

    threads = [click("owner")]
    _wait_for(lambda: cache.misses == 1)
    threads += [click(f"waiter {n}") for n in range(waiters)]
    for thread in threads:
        thread.join(20)
    assert len({id(v) for v in results.values()} | {id(value)}) == waiters + 2  # a copy each
    np.testing.assert_array_equal(results["owner"], value)
    assert (cache.hits, cache.misses) == (waiters, 1)


def test_a_stale_decode_finishing_last_replaces_the_entry_cleanly(tmp_path):
    path = _file(tmp_path, "a")
    release = threading.Event()
    calls = []

    def loader(path, kind, **options):
        calls.append(Path(path).read_bytes())
        number = len(calls)
        if number == 1:
            assert release.wait(20)
        return np.full(100, number, np.uint8)

    cache = ImageCache(max_bytes=1000, loader=loader)
    results = {}
    slow = threading.Thread(target=lambda: results.setdefault("slow", cache.get(path)))
    slow.start()
    _wait_for(lambda: len(calls) == 1)
    path.write_bytes(b"y")
    os.utime(path, ns=(10**18, 10**18))
    assert int(cache.get(path)[0]) == 2
    release.set()
    slow.join(20)
    assert int(results["slow"][0]) == 1
    assert (len(cache), cache.nbytes) == (1, 100)
    assert int(cache.get(path)[0]) == 3  # the entry left is the stale one: decoded again
    assert calls == [b"x", b"y", b"y"]


def test_decodes_and_evictions_are_logged_by_name_kind_and_size(tmp_path, caplog):
    a, b, c = _file(tmp_path, "a.nii.gz"), _file(tmp_path, "b.png"), _file(tmp_path, "c.nii.gz")
    cache = ImageCache(max_bytes=3 * MIB, loader=SizedLoader({"a.nii.gz": 2 * MIB, "b.png": 2 * MIB,
                                                              "c.nii.gz": 4 * MIB}))
    with caplog.at_level(logging.DEBUG, logger="oncofusion.io.cache"):
        cache.get(a)
        cache.get(b, "frame")
        cache.get(c)
    assert [r.getMessage() for r in caplog.records if r.name == "oncofusion.io.cache"] == [
        "decoded a.nii.gz (volume, 2.0 MiB, cached); 1 cached, 2.0 MiB",
        "evicted a.nii.gz (volume)",
        "decoded b.png (frame, 2.0 MiB, cached); 1 cached, 2.0 MiB",
        "decoded c.nii.gz (volume, 4.0 MiB, not cached); 1 cached, 2.0 MiB",
    ]


def test_clear_empties_the_cache(tmp_path):
    path = _file(tmp_path, "a")
    loader = SizedLoader()
    cache = ImageCache(max_bytes=4096, loader=loader)
    cache.get(path)
    cache.clear()
    assert (len(cache), cache.nbytes) == (0, 0)
    cache.get(path)
    assert len(loader.calls) == 2 and (len(cache), cache.nbytes) == (1, 1024)
