"""Keep studies decoded while the user keeps clicking on them, within a memory budget in bytes.

A clinician places several points on the same scan; decoding a 512x512x300 NIfTI or a DICOM series
takes seconds, the prediction itself much less. Studies differ in size by orders of magnitude (a 2D
ultrasound frame is a megabyte, a CT volume hundreds), so the budget counts bytes, not studies: least
recently used entries are dropped until the decoded tensors fit ``max_bytes``.

An entry is keyed by the file's path, the reader kind and the reader options (e.g. the cine frame), and
remembers the file's identity and modification time, so a study replaced on disk is decoded again
instead of served stale. A whole-slide image is cached as its open handle, counted as the size of its
tile cache: it is never decoded whole.

An entry is counted at what it really holds: the whole storage behind a tensor or array (a view keeps
all of it alive) plus any large arrays in its metadata. A file read once and deleted, such as an upload the
server saved to a temporary file, is read with ``get(..., cache=False)``: cached under its unique temp
name it could never be hit again and would only push the studies being clicked on out of the budget.
Every read is bounded: the default loader checks the image's header against ``limits`` before decoding.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncofusion.contract import InvalidRequest
from oncofusion.io.limits import ImageLimits
from oncofusion.io.readers import read_image

logger = logging.getLogger(__name__)

#: (realpath, mtime_ns, size) of a file; for a DICOM folder: newest mtime and total size of its files
Signature = tuple[str, int, int]
#: (realpath, reader kind, sorted reader options)
Key = tuple[str, str, tuple[tuple[str, Hashable], ...]]

DEFAULT_MAX_BYTES = 2048 * 2**20
#: metadata arrays from this size up count towards an entry's bytes (a page: header fields stay out)
META_ARRAY_MIN_BYTES = 4096


def file_signature(path: str | os.PathLike) -> Signature:
    """Identity of what is on disk now; changes whenever the study is rewritten."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if not os.path.isdir(real):
        return real, st.st_mtime_ns, st.st_size
    mtime, size = st.st_mtime_ns, 0
    with os.scandir(real) as entries:
        for entry in entries:
            if entry.is_file():
                est = entry.stat()
                mtime, size = max(mtime, est.st_mtime_ns), size + est.st_size
    return real, mtime, size


def _array_nbytes(value: Any, seen: set[int]) -> int:
    """Bytes of the memory behind a tensor or array, counted once per buffer (``seen``): a view such as
    ``volume[None]`` or ``volume[..., 0]`` keeps its whole base alive."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
    else:
        base = value
        while isinstance(base.base, np.ndarray):
            base = base.base
        key, size = base.__array_interface__["data"][0], int(base.nbytes)
    if key in seen:
        return 0
    seen.add(key)
    return size


def value_nbytes(value: Any) -> int:
    """Memory held by a decoded image: the whole storage behind a tensor or array plus any large arrays
    in its metadata, or what an object declares (``SlideImage.nbytes`` is its tile cache).

    Metadata arrays under :data:`META_ARRAY_MIN_BYTES` (the affine and header fields every image
    carries, a few hundred bytes) are noise against a budget of megabytes and are left out, as is
    Python's per-object overhead."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        seen: set[int] = set()
        total = _array_nbytes(value, seen)
        meta = getattr(value, "meta", None)
        for item in meta.values() if isinstance(meta, dict) else ():
            if isinstance(item, (torch.Tensor, np.ndarray)) and _array_nbytes(item, set()) >= META_ARRAY_MIN_BYTES:
                total += _array_nbytes(item, seen)
        return total
    declared = getattr(value, "nbytes", None)
    return int(declared) if declared is not None else sys.getsizeof(value)


def _private_copy(value: Any) -> Any:
    """What a caller may modify in place: a clone of a tensor or array; handles (slides) are shared,
    since reading from them changes nothing."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


@dataclass
class _Entry:
    signature: Signature
    value: Any
    nbytes: int


class _Pending:
    """A decode in progress, which concurrent requests for the same study wait for instead of repeating."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiters = 0


class ImageCache:
    """Thread-safe LRU of decoded images bounded by the total bytes of what it holds.

    ``get`` returns a clone of a cached tensor, so a predictor that normalises its input in place cannot
    corrupt the copy the next click reuses; cloning costs tens of milliseconds where decoding costs
    seconds. An image larger than the whole budget is returned but not cached. Decoding runs outside the
    lock, so a slow study never stalls clicks on a cached one; two requests for the same study decode it
    once.

    Args:
        max_bytes: memory budget of the decoded images; 0 caches nothing.
        loader: ``loader(path, kind, **options)`` decoding one image (default: :func:`read_image`).
        limits: the most one image may cost to decode, passed to the loader as ``limits=`` (a custom
            loader must then accept it); None: the readers' default limits.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, loader: Callable[..., Any] = read_image,
                 limits: ImageLimits | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise ValueError(
                f"image cache max_bytes must be an integer >= 0 (0 disables caching), got {max_bytes!r}"
            )
        if limits is not None and not isinstance(limits, ImageLimits):
            raise TypeError(f"image cache limits must be an oncofusion.io.limits.ImageLimits, got {limits!r}")
        self.max_bytes = int(max_bytes)
        self.limits = limits
        self._loader = loader
        self._items: OrderedDict[Key, _Entry] = OrderedDict()
        self._pending: dict[tuple[Signature, Key], _Pending] = {}
        self._lock = threading.Lock()
        self._nbytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the images held now (always <= ``max_bytes``)."""
        return self._nbytes

    def _drop(self, key: Key) -> None:
        entry = self._items.pop(key)
        self._nbytes -= entry.nbytes

    def _store(self, key: Key, entry: _Entry) -> bool:
        if not 0 < entry.nbytes <= self.max_bytes:
            return False
        if key in self._items:
            self._drop(key)
        self._items[key] = entry
        self._nbytes += entry.nbytes
        while self._nbytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._drop(oldest)
            logger.debug("evicted %s (%s)", Path(oldest[0]).name, oldest[1])
        return True

    def _load(self, path: str | os.PathLike, kind: str, options: dict[str, Hashable]) -> Any:
        extra = {} if self.limits is None else {"limits": self.limits}
        return self._loader(str(path), kind, **options, **extra)

    def get(self, path: str | os.PathLike, kind: str = "volume", *, cache: bool = True, **options: Hashable) -> Any:
        """The image at ``path`` read by the ``kind`` reader with ``options``, decoded at most once while it
        stays cached and unchanged on disk.

        ``cache=False`` reads a file that will not be asked for again (an upload's temporary file): it is
        decoded for this caller alone and never stored, so it evicts nothing. A copy already cached for
        the same unchanged file is still used.
        """
        if not str(path) or not os.path.exists(path):
            raise InvalidRequest(f"{options.get('what', 'image')} '{Path(path).name or path}' not found", 400)
        try:
            frozen = tuple(sorted(options.items()))
            hash(frozen)
        except TypeError as e:
            raise ValueError(
                f"image reader options must be hashable to key the cache, got {options!r}"
            ) from e
        signature = file_signature(path)
        key: Key = (signature[0], kind, frozen)
        if not cache:
            return self._get_transient(path, kind, options, signature, key)
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry.signature == signature:
                self._items.move_to_end(key)
                self.hits += 1
                cached = entry.value
            else:
                cached = None
                if entry is not None:  # rewritten on disk: free the stale copy now
                    self._drop(key)
                pending = self._pending.get((signature, key))
                owner = pending is None
                if owner:
                    pending = self._pending[(signature, key)] = _Pending()
                    self.misses += 1
                else:
                    pending.waiters += 1
                    self.hits += 1
        if cached is not None:
            return _private_copy(cached)
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return _private_copy(pending.value)

        try:
            value = self._load(path, kind, options)
        except BaseException as e:
            with self._lock:
                del self._pending[(signature, key)]
                pending.error = e
                pending.done.set()
            raise
        size = value_nbytes(value)
        with self._lock:
            stored = self._store(key, _Entry(signature, value, size))
            del self._pending[(signature, key)]
            shared = pending.waiters > 0
            pending.value = value
            pending.done.set()
        logger.debug(
            "decoded %s (%s, %.1f MiB, %s); %d cached, %.1f MiB",
            Path(path).name,
            kind,
            size / 2**20,
            "cached" if stored else "not cached",
            len(self),
            self._nbytes / 2**20,
        )
        return _private_copy(value) if stored or shared else value

    def _get_transient(self, path: str | os.PathLike, kind: str, options: dict[str, Hashable],
                       signature: Signature, key: Key) -> Any:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry.signature == signature:
                self._items.move_to_end(key)
                self.hits += 1
                cached = entry.value
            else:
                cached = None
                self.misses += 1
        if cached is not None:
            return _private_copy(cached)
        value = self._load(path, kind, options)
        logger.debug("decoded %s (%s, %.1f MiB) for one request, not cached", Path(path).name, kind,
                     value_nbytes(value) / 2**20)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        return len(self._items)
