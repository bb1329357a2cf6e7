"""Atomic writes: the destination is its old self or complete, the disk is synced, nothing is left over."""

from __future__ import annotations

import fnmatch
import os
import stat
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from oncofusion.io import atomic
from oncofusion.io.atomic import (
    atomic_copy,
    atomic_link,
    atomic_output,
    atomic_write_bytes,
    atomic_write_text,
)

# MONAI Label's default MONAI_LABEL_DATASTORE_FILE_EXT: what its datastore lists as images and labels
DATASTORE_PATTERNS = ["*.nii.gz", "*.nii", "*.nrrd", "*.jpg", "*.png", "*.tif", "*.svs", "*.xml", "*.json"]


class Boom(RuntimeError):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture()
def fsync_log(monkeypatch):
    """Every ``os.fsync`` as (the path its descriptor is open on, whether that is a folder)."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def record(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, stat.S_ISDIR(os.fstat(fd).st_mode)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def test_write_bytes_and_text_replace_content(tmp_path):
    path = tmp_path / "datastore_v2.json"
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_text(path, '{"name": "é"}')
    assert path.read_text(encoding="utf-8") == '{"name": "é"}'
    assert _names(tmp_path) == ["datastore_v2.json"]


def test_exception_inside_atomic_output_leaves_destination_and_no_temp(tmp_path):
    path = tmp_path / "label.nii.gz"
    path.write_bytes(b"old label")
    with pytest.raises(Boom), atomic_output(path) as tmp:
        tmp.write_bytes(b"half of the new la")
        raise Boom("killed mid-write")
    assert path.read_bytes() == b"old label"
    assert _names(tmp_path) == ["label.nii.gz"]


def test_failed_sync_leaves_destination_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "datastore_v2.json"
    path.write_bytes(b"good")

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    for write in (lambda: atomic_write_bytes(path, b"new"), lambda: atomic_copy(__file__, path)):
        with pytest.raises(OSError, match="Input/output"):
            write()
        assert path.read_bytes() == b"good"
        assert _names(tmp_path) == ["datastore_v2.json"]


def test_atomic_output_yields_a_named_path_next_to_the_destination_for_nibabel(tmp_path):
    path = tmp_path / "case_001.nii.gz"
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    with atomic_output(path) as tmp:
        assert tmp.name == path.name  # nibabel picks format and compression from the extension
        assert tmp.parent.parent == tmp_path  # same folder, so same file system: the rename is atomic
        assert tmp.parent.name.startswith(".") and tmp.parent.name.endswith(atomic.STAGING_SUFFIX)
        # the staging folder is nothing a datastore listing of this folder would take for a study
        assert not any(fnmatch.fnmatch(tmp.parent.name, p) for p in DATASTORE_PATTERNS)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp)
        assert not path.exists()  # nothing visible before the block ends
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), volume)
    assert _names(tmp_path) == ["case_001.nii.gz"]


def test_atomic_output_with_nothing_written_says_so_and_keeps_destination(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_output(path):
        pass
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["out.json"]


@pytest.mark.parametrize("write", ["bytes", "copy", "output"])
def test_file_then_folder_synced_around_the_rename(tmp_path, fsync_log, write):
    path = tmp_path / "label.nii"
    path.write_bytes(b"old")
    source = tmp_path / "source.bin"
    source.write_bytes(b"new")
    if write == "bytes":
        atomic_write_bytes(path, b"new")
    elif write == "copy":
        atomic_copy(source, path)
    else:
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"new")

    files = [p for p, is_dir in fsync_log if not is_dir]
    folders = [p for p, is_dir in fsync_log if is_dir]
    assert files and all(Path(p).name == "label.nii" and Path(p).parent != tmp_path for p in files)
    assert folders == [str(tmp_path)]
    # the file is synced before the rename, the folder after it
    assert fsync_log.index((files[-1], False)) < fsync_log.index((str(tmp_path), True))
    assert path.read_bytes() == b"new"


def test_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "datastore_v2.json"
    path.write_text("old")
    content_when_synced = []
    real = atomic.fsync_dir

    def spy(folder):
        content_when_synced.append(path.read_text())
        real(folder)

    monkeypatch.setattr(atomic, "fsync_dir", spy)
    atomic_write_text(path, "new")
    assert content_when_synced == ["new"]


def test_copy_keeps_content_and_permission_bits(tmp_path):
    source = tmp_path / "in" / "case.nii.gz"
    source.parent.mkdir()
    source.write_bytes(os.urandom(200_000))
    source.chmod(0o640)
    dest_dir = tmp_path / "labels" / "final"
    dest_dir.mkdir(parents=True)
    atomic_copy(source, dest_dir / "case.nii.gz")
    assert (dest_dir / "case.nii.gz").read_bytes() == source.read_bytes()
    assert stat.S_IMODE((dest_dir / "case.nii.gz").stat().st_mode) == 0o640
    assert _names(dest_dir) == ["case.nii.gz"]


def test_replacing_keeps_the_mode_and_a_new_file_follows_the_umask(tmp_path):
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o600)
    atomic_write_text(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600

    umask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.json", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640  # as open() would create it


def test_missing_source_or_folder_names_the_problem(tmp_path):
    dest = tmp_path / "dest.nii.gz"
    dest.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="no_such.nii.gz"):
        atomic_copy(tmp_path / "no_such.nii.gz", dest)
    assert dest.read_bytes() == b"old"
    with pytest.raises(FileNotFoundError, match="its folder .*missing does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "x.json", b"x")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    assert _names(tmp_path) == ["dest.nii.gz"]


def test_link_gives_the_file_a_second_name_atomically(tmp_path, fsync_log):
    current = tmp_path / "datastore_v2.json"
    current.write_text("previous good")
    backup = tmp_path / "datastore_v2.json.bak"
    backup.write_text("older")
    atomic_link(current, backup)
    assert backup.read_text() == "previous good" and os.path.samefile(current, backup)
    assert fsync_log == [(str(tmp_path), True)]  # nothing copied: only the folder is synced
    atomic_write_text(current, "new")  # replacing the name leaves the backup's bytes alone
    assert backup.read_text() == "previous good"
    assert _names(tmp_path) == ["datastore_v2.json", "datastore_v2.json.bak"]


def test_link_can_leave_the_folder_sync_to_the_caller(tmp_path, fsync_log):
    (tmp_path / "a").write_text("x")
    atomic_link(tmp_path / "a", tmp_path / "b", sync_folder=False)
    assert fsync_log == [] and (tmp_path / "b").read_text() == "x"
    with pytest.raises(FileNotFoundError, match="cannot link"):
        atomic_link(tmp_path / "missing", tmp_path / "b")
    assert _names(tmp_path) == ["a", "b"]


def test_writing_through_a_symlink_updates_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "sample" / "case.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "case.nii.gz"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_a_concurrent_reader_never_sees_a_partial_file(tmp_path):
    path = tmp_path / "datastore_v2.json"
    versions = [bytes([65 + i]) * 300_000 for i in range(4)]
    path.write_bytes(versions[0])
    seen: set[bytes] = set()
    done = threading.Event()

    def read():
        while not done.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(60):
            atomic_write_bytes(path, versions[i % len(versions)])
    finally:
        done.set()
        reader.join()
    assert seen and seen <= set(versions)
