"""A study a client asks for is decoded before its first click, one study at a time, latest first."""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np

from oncofusion.io.cache import ImageCache
from oncofusion.serving.datastore import DurableLocalDatastore
from oncofusion.serving.prefetch import VolumePrefetcher


def _volume(path: Path, value: float = 1.0) -> Path:
    nib.save(nib.Nifti1Image(np.full((8, 9, 10), value, np.float32), np.eye(4)), str(path))
    return path


class _CountingLoader:
    """The cache's decoder, counting decodes per file and able to hold one until released."""

    def __init__(self, hold: str | None = None):
        self.decoded: list[str] = []
        self.attempted: list[str] = []
        self.hold = hold
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, path: str, kind: str, **options):
        self.attempted.append(Path(path).name)
        if self.hold and path.endswith(self.hold):
            self.started.set()
            self.release.wait(10)
        volume = np.asarray(nib.load(path).dataobj, np.float32)
        self.decoded.append(Path(path).name)
        return volume


def _cache(loader) -> ImageCache:
    return ImageCache(max_bytes=2**26, loader=loader)


def test_a_requested_volume_is_decoded_once_and_the_click_finds_it(tmp_path):
    loader = _CountingLoader()
    cache = _cache(loader)
    prefetcher = VolumePrefetcher(cache)
    study = _volume(tmp_path / "ct.nii.gz")
    prefetcher.request(str(study))
    assert prefetcher.wait_idle(10)
    assert loader.decoded == ["ct.nii.gz"]
    hits = cache.hits
    np.testing.assert_array_equal(np.asarray(cache.get(study, "volume")), 1.0)
    assert loader.decoded == ["ct.nii.gz"] and cache.hits == hits + 1  # the click decoded nothing


def test_only_the_latest_request_waits_behind_the_one_in_progress(tmp_path):
    loader = _CountingLoader(hold="a.nii.gz")
    prefetcher = VolumePrefetcher(_cache(loader))
    studies = [_volume(tmp_path / f"{name}.nii.gz") for name in "abcd"]
    prefetcher.request(str(studies[0]))
    assert loader.started.wait(10)  # a is being decoded
    for study in studies[1:]:  # a burst of lookups while a decodes
        prefetcher.request(str(study))
    loader.release.set()
    assert prefetcher.wait_idle(10)
    assert loader.decoded == ["a.nii.gz", "d.nii.gz"]  # b and c were superseded, never decoded


def test_frames_slides_and_unreadable_files_are_left_to_the_click(tmp_path):
    loader = _CountingLoader()
    prefetcher = VolumePrefetcher(_cache(loader))
    (tmp_path / "frame.dcm").write_bytes(b"x")
    (tmp_path / "slide.tiff").write_bytes(b"x")
    prefetcher.request(str(tmp_path / "frame.dcm"))
    prefetcher.request(str(tmp_path / "slide.tiff"))
    prefetcher.request(None)
    assert prefetcher.wait_idle(10) and loader.attempted == []
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    prefetcher.request(str(broken))  # fails quietly in the background; the click reports it
    assert prefetcher.wait_idle(10)
    prefetcher.request(str(_volume(tmp_path / "ok.nii.gz")))
    assert prefetcher.wait_idle(10) and loader.decoded == ["ok.nii.gz"]  # the thread survived the failure


def test_the_datastore_reports_each_study_a_request_resolves(tmp_path):
    _volume(tmp_path / "study_1.nii.gz")
    datastore = DurableLocalDatastore(str(tmp_path))
    asked: list[str] = []
    datastore.on_image_requested = asked.append
    uri = datastore.get_image_uri("study_1")
    assert Path(uri).name == "study_1.nii.gz" and asked == [uri]
    datastore.get_image_uri("no_such_study")
    assert asked == [uri]  # an unknown id resolves to nothing and decodes nothing
