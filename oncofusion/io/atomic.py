"""Atomic, durable file writes: a reader, or the process after a crash, sees the old file or the new one,
never half of one.

Writing in place (``open(path, "w")``) truncates first: a process killed between the truncation and the
last ``write`` leaves an empty or partial file behind. Here every writer stages the new content in a
private folder *inside the destination's folder* (same file system, so ``os.replace`` is one atomic
rename), flushes it to disk with ``fsync``, renames it over the destination, then syncs the folder so
that the new name itself survives a power cut. The staging folder is removed on every path, success
or error.

The staged file carries the destination's exact name (``case.nii.gz``), so writers that pick a format
from the extension (nibabel) can write to it; the folder holding it is hidden and ends in ``.tmp``, so
listings that filter one folder by extension (MONAI Label's ``*.nii.gz``, ``*.json`` ...) never see a
half-written file. A ``kill -9`` can leave such a folder behind (nothing can clean up after SIGKILL); it
is garbage, never mistaken for data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: suffix of the hidden staging folders (a leftover after a crash is recognisable by it)
STAGING_SUFFIX = ".tmp"
# staging folder names start with the destination's name, cut so that they stay under NAME_MAX (255)
_NAME_PREFIX_CHARS = 64

PathLike = str | os.PathLike


def fsync_dir(folder: PathLike) -> None:
    """Make the creation or rename of a name in ``folder`` durable.

    ``fsync`` on a file saves its bytes, not the folder entry that points at them: without this a power
    cut after ``os.replace`` may bring back the old name. File systems that cannot sync a folder
    (``EINVAL``) have nothing to sync; Windows has no folder fsync at all.
    """
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush a file another handle wrote (e.g. nibabel's): fsync acts on the file, whatever the handle."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _destination(path: PathLike) -> Path:
    """The file to replace, symlinks resolved: like ``open(path, "w")``, writing through a link updates
    its target and keeps the link."""
    dest = Path(os.path.realpath(path))
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"cannot write {dest}: its folder {dest.parent} does not exist")
    if dest.is_dir():
        raise IsADirectoryError(f"cannot write {dest}: it is a folder; give the file's path")
    return dest


@contextlib.contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A not-yet-existing path named like ``dest`` in a fresh hidden folder next to it; the folder and
    anything left in it are removed when the block ends, however it ends."""
    staging = tempfile.mkdtemp(prefix=f".{dest.name[:_NAME_PREFIX_CHARS]}.", suffix=STAGING_SUFFIX,
                               dir=dest.parent)
    try:
        yield Path(staging) / dest.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staged: Path, dest: Path) -> None:
    """Rename the synced file over the destination and make the rename durable."""
    os.replace(staged, dest)
    fsync_dir(dest.parent)


def _keep_mode(dest: Path, staged: Path) -> None:
    """A replaced file keeps its permission bits, as one rewritten in place would."""
    with contextlib.suppress(FileNotFoundError):
        shutil.copymode(dest, staged)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a path to write the new content of ``path`` to; it replaces ``path`` when the block ends.

    For writers that want a file name rather than bytes::

        with atomic_output(study / "label.nii.gz") as tmp:
            nib.save(image, tmp)

    If the block raises, ``path`` is left as it was and the staged file is removed.
    """
    dest = _destination(path)
    with _staged(dest) as staged:
        yield staged
        if not staged.is_file():
            raise FileNotFoundError(f"nothing was written to {staged}, so {dest} was left as it was: "
                                    "write the new content to the path atomic_output yields")
        _keep_mode(dest, staged)
        _fsync_file(staged)
        _commit(staged, dest)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path``'s content with ``data``, atomically and durably."""
    dest = _destination(path)
    with _staged(dest) as staged:
        with open(staged, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _keep_mode(dest, staged)
        _commit(staged, dest)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path``'s content with ``text``, atomically and durably."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_link(src: PathLike, dst: PathLike, *, sync_folder: bool = True) -> None:
    """Make ``dst`` a second name of the file ``src`` (a hard link), atomically replacing what ``dst``
    was; no byte is copied or written.

    ``sync_folder=False`` leaves the folder sync to the caller, who is about to sync the same folder
    anyway. Raises ``OSError`` where the file system has no hard links; :func:`atomic_copy` then does.
    """
    source = Path(src)
    if not source.is_file():
        raise FileNotFoundError(f"cannot link {source}: it is not a file")
    dest = _destination(dst)
    with _staged(dest) as staged:
        os.link(source, staged)
        os.replace(staged, dest)
        if sync_folder:
            fsync_dir(dest.parent)


def atomic_copy(src: PathLike, dst: PathLike) -> None:
    """Copy the file ``src`` to the file path ``dst`` (content and permission bits, as ``shutil.copy``),
    so that ``dst`` is either its old self or a complete copy, even after a crash."""
    source = Path(src)
    if not source.is_file():
        raise FileNotFoundError(f"cannot copy {source}: it is not a file")
    dest = _destination(dst)
    with _staged(dest) as staged:
        shutil.copy(source, staged)
        _fsync_file(staged)
        _commit(staged, dest)
