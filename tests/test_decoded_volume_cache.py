"""Volumes decoded once to files (``ImageCache(spill_dir=...)``): mapped, never stale, private, bounded,
and reused by a later process only once committed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from oncofusion.io.cache import ImageCache
from oncofusion.io.readers import read_image

AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
SHAPE = (6, 5, 4)
VOLUME_BYTES = 4 * int(np.prod(SHAPE))


class Reads:
    """The real reader, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path, kind, **options):
        self.calls += 1
        return read_image(path, kind, **options)


def _study(path: Path, fill: int) -> Path:
    data = np.full(SHAPE, fill, np.int16)
    data[1, 2, 3] = fill + 100  # a voxel that knows where it is
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def _mapped_file(tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s memory (Linux /proc/self/maps), None for plain memory."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(v, 16) for v in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def _volumes(folder: Path) -> list[str]:
    return sorted(p.suffix for p in folder.iterdir())


def test_a_volume_is_decoded_once_into_a_file_and_mapped_on_every_get(tmp_path):
    study, spill = _study(tmp_path / "ct.nii.gz", 7), tmp_path / "decoded"
    reads = Reads()
    cache = ImageCache(max_bytes=0, loader=reads, spill_dir=spill)  # no memory budget: the file is the cache
    first, second = cache.get(study), cache.get(study)
    assert reads.calls == 1 and cache.spill_nbytes > VOLUME_BYTES and cache.nbytes == 0
    for image in (first, second):
        assert image.shape == (1, *SHAPE) and float(image[0, 1, 2, 3]) == 107.0 and float(image[0, 0, 0, 0]) == 7.0
        np.testing.assert_allclose(image.affine.numpy(), AFFINE)
        assert _mapped_file(image) == str(next(spill.glob("*.npy")))  # the file itself, not a copy
    first[0, 1, 2, 3] = -1.0  # a predictor normalising in place changes its own copy only
    assert float(cache.get(study)[0, 1, 2, 3]) == 107.0 and float(second[0, 1, 2, 3]) == 107.0


def test_a_rewritten_study_is_decoded_again_and_its_old_file_removed(tmp_path):
    study, spill = _study(tmp_path / "ct.nii.gz", 7), tmp_path / "decoded"
    reads = Reads()
    cache = ImageCache(loader=reads, spill_dir=spill)
    assert float(cache.get(study)[0, 0, 0, 0]) == 7.0
    cache.wait_for_commits()
    old = sorted(spill.iterdir())
    _study(study, 9)
    os.utime(study, ns=(1, 1))  # a rewrite within the clock's resolution still changes the signature...
    assert float(cache.get(study)[0, 0, 0, 0]) == 9.0 and reads.calls == 2
    cache.wait_for_commits()
    assert not any(p.exists() for p in old) and _volumes(spill) == [".json", ".npy"]


def test_a_later_process_reuses_a_committed_volume_and_decodes_a_changed_one(tmp_path):
    study, spill = _study(tmp_path / "ct.nii.gz", 7), tmp_path / "decoded"
    first = ImageCache(loader=Reads(), spill_dir=spill)
    first.get(study)
    first.wait_for_commits()
    record = json.loads(next(spill.glob("*.json")).read_text())
    assert record["nbytes"] == next(spill.glob("*.npy")).stat().st_size

    reads = Reads()
    later = ImageCache(loader=reads, spill_dir=spill)
    assert float(later.get(study)[0, 1, 2, 3]) == 107.0 and reads.calls == 0
    np.testing.assert_allclose(later.get(study).affine.numpy(), AFFINE)

    _study(study, 9)
    os.utime(study, ns=(2, 2))
    reads = Reads()
    after_edit = ImageCache(loader=reads, spill_dir=spill)  # the stale file is dropped at start-up
    assert after_edit.spill_nbytes == 0 and _volumes(spill) == []
    assert float(after_edit.get(study)[0, 0, 0, 0]) == 9.0 and reads.calls == 1


def test_an_uncommitted_volume_is_never_reused(tmp_path):
    study, spill = _study(tmp_path / "ct.nii.gz", 7), tmp_path / "decoded"
    first = ImageCache(loader=Reads(), spill_dir=spill)
    first.get(study)
    first.wait_for_commits()
    next(spill.glob("*.json")).unlink()  # as if the process died before syncing the file
    reads = Reads()
    later = ImageCache(loader=reads, spill_dir=spill)
    assert float(later.get(study)[0, 0, 0, 0]) == 7.0 and reads.calls == 1


def test_the_disk_budget_evicts_the_least_recently_used_file(tmp_path):
    spill = tmp_path / "decoded"
    a, b, c = (_study(tmp_path / f"{name}.nii.gz", fill) for name, fill in (("a", 1), ("b", 2), ("c", 3)))
    reads = Reads()
    cache = ImageCache(loader=reads, spill_dir=spill)
    cache.get(a)
    one_file = cache.spill_nbytes
    cache.spill_to(spill, max_bytes=2 * one_file)
    cache.get(b)
    cache.get(a)  # a is now the most recently used
    cache.get(c)  # over budget: b goes
    cache.wait_for_commits()
    assert cache.spill_nbytes == 2 * one_file and len(list(spill.glob("*.npy"))) == 2
    calls = reads.calls
    cache.get(a), cache.get(c)
    assert reads.calls == calls
    assert float(cache.get(b)[0, 0, 0, 0]) == 2.0 and reads.calls == calls + 1


def test_an_unwritable_folder_keeps_volumes_in_memory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = ImageCache(spill_dir=blocker / "decoded")
    assert cache.spill_dir is None
    study = _study(tmp_path / "ct.nii.gz", 7)
    assert float(cache.get(study)[0, 0, 0, 0]) == 7.0 and cache.nbytes == VOLUME_BYTES


def test_uploads_frames_and_bad_budgets_are_not_spilled(tmp_path):
    study, spill = _study(tmp_path / "ct.nii.gz", 7), tmp_path / "decoded"
    cache = ImageCache(spill_dir=spill)
    assert float(cache.get(study, cache=False)[0, 0, 0, 0]) == 7.0
    assert list(spill.iterdir()) == []
    with pytest.raises(ValueError, match="max_spill_bytes must be an integer >= 0"):
        ImageCache(spill_dir=spill, max_spill_bytes=-1)
