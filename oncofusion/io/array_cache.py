"""Arrays computed from big inputs (slide embeddings...), cached on disk as ``.npy`` by what they came from.

A cache entry is keyed by a small JSON-able mapping: the content digest of each input file, the
identity of the model that computed it (e.g. its weights digest) and every parameter that changes the
result. The key is hashed into the file name, and written beside the array as ``<digest>.json`` so an
entry can be told apart by eye; neither holds a file path (folders and slide names may name patients).
Entries are written atomically (:mod:`oncofusion.io.atomic`): a crash leaves the old entry or none.

**Input identity.** :func:`content_digest` is the SHA-256 of a file's *bytes*, not of its name or time:
a slide copied, renamed or restored from backup hits the same entry, and a slide rewritten with other
pixels misses it. Hashing a multi-GB slide costs seconds, little next to embedding its regions
(minutes), but too much to pay on every cache *hit*; so the digest of each file is memoised under
``<cache>/digests`` by the file's stat signature (path, size, mtime, ctime, inode, device). A hit then
costs a ``stat``; any rewrite changes mtime/ctime, so the file is hashed again. (Hashing only the first
and last megabyte would be cheaper still, but a tiled TIFF's header and last tiles can survive an edit of
the tiles between; a full hash is the identity, the memo makes it cheap.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.io.atomic import atomic_output, atomic_write_text

logger = logging.getLogger(__name__)

#: bytes read per hashing step
_CHUNK = 8 * 2**20
#: subfolder of a cache that holds the memoised file digests
DIGESTS_DIR = "digests"

PathLike = str | os.PathLike


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_signature(path: Path) -> str:
    st = os.stat(path)
    parts = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def file_digest(path: PathLike, memo_dir: PathLike | None = None) -> str:
    """SHA-256 (hex) of a file's bytes; with ``memo_dir``, read from / written to a memo keyed by the
    file's stat signature, so an unchanged file is hashed once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash '{path.name}': it is not a file")
    if memo_dir is None:
        return _hash_file(path)
    memo = Path(memo_dir) / f"{_stat_signature(path)}.txt"
    if memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            return value
    value = _hash_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, value)
    return value


def _member_files(path: Path) -> list[tuple[str, Path]]:
    """The files that make up an input, with names relative to it: the file itself; every file under a
    folder (a DICOM-WSI series); an MIRAX ``.mrxs`` and its companion data folder (same stem)."""
    if path.is_dir():
        return sorted((str(f.relative_to(path)), f) for f in path.rglob("*") if f.is_file())
    members = [("", path)]
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():
        members += [(f"{companion.name}/{rel}", f) for rel, f in _member_files(companion)]
    return members


def content_digest(path: PathLike, memo_dir: PathLike | None = None) -> str:
    """SHA-256 (hex) identity of an input's content: of the file's bytes, or of the names and bytes of
    every file of a folder (or of an MRXS slide and its data folder). Names of the top file or folder do
    not count: a renamed copy is the same content."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot hash '{path.name}': not found")
    members = _member_files(path)
    if members == [("", path)]:
        return file_digest(path, memo_dir)
    digest = hashlib.sha256()
    for rel, member in members:
        digest.update(f"{rel}\0{file_digest(member, memo_dir)}\n".encode())
    return digest.hexdigest()


def key_digest(key: Mapping[str, Any]) -> str:
    """Stable hex name of a JSON-able key (sorted keys, so dict order does not matter)."""
    try:
        text = json.dumps(dict(key), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"an array cache key must hold only JSON values (str, int, float, bool, None, lists, "
                        f"dicts): {e}") from e
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ArrayCache:
    """``.npy`` arrays under ``directory``, one per key; ``hits`` and ``misses`` count lookups."""

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def content_digest(self, path: PathLike) -> str:
        """:func:`content_digest` memoised in this cache's ``digests`` folder."""
        return content_digest(path, self.directory / DIGESTS_DIR)

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.directory / f"{key_digest(key)}.npy"

    def load(self, key: Mapping[str, Any]) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable (then it is recomputed and replaced)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            logger.warning("cached array %s is unreadable (%s): recomputing it", path.name, e)
            return None

    def save(self, key: Mapping[str, Any], array: np.ndarray) -> Path:
        """Write ``array`` (and its key as JSON beside it) atomically; returns the ``.npy`` path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path.with_suffix(".json"), json.dumps(dict(key), sort_keys=True, indent=1))
        with atomic_output(path) as staged, open(staged, "wb") as handle:
            np.save(handle, np.asarray(array), allow_pickle=False)
        return path

    def get(self, key: Mapping[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for ``key``, or ``compute()``'s result, saved for next time."""
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        value = np.asarray(compute())
        self.save(key, value)
        return value
