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

With a ``spill_dir`` (the server gives one under a local datastore), a volume is decoded once into an
uncompressed float32 ``.npy`` file there instead of memory, and every click maps that file
copy-on-write: nothing is copied (the in-memory entry's 315 MB clone per click on a 512x512x300 CT was
most of a warm click), a predictor that writes into its input changes only its private pages, and only
the pages the crop around the click touches are read. The file is named after a hash of the entry's
key and the study's signature, so a rewritten study gets a new file and its stale one is deleted. It
is decoded under a hidden temporary name and renamed into place when complete; a background thread
then syncs it to disk and writes its JSON record (atomically, :mod:`oncofusion.io.atomic`), the commit
that lets a later server process reuse it without decoding. Spilled files count against their own
byte budget, ``max_spill_bytes``, in the same least-recently-used order as the memory entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from oncofusion.contract import InvalidRequest
from oncofusion.io.atomic import atomic_write_text
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
#: disk budget of the decoded volumes in ``spill_dir``: about 25 float32 512x512x300 CTs
DEFAULT_MAX_SPILL_BYTES = 8 * 2**30
#: reader kinds decoded to files: a volume's float32 array maps as one file; frames are small and
#: slides are never decoded whole
SPILL_KINDS = frozenset({"volume"})
#: layout of the spilled files, hashed into their names: a new layout never reads an old file
SPILL_FORMAT = 1
#: a spilled array without its record (or a staged one) older than this is a crash's leftover; younger
#: ones may belong to another process still committing them
ORPHAN_AGE_S = 600.0


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return value


class _Spilled:
    """A volume decoded to ``path`` (float32 ``.npy``) with its metadata, ``nbytes`` on disk."""

    def __init__(self, path: Path, meta: dict[str, Any], nbytes: int):
        self.path, self.meta, self.nbytes = path, meta, nbytes

    @property
    def record(self) -> Path:
        """The JSON record whose presence commits the file for later processes."""
        return self.path.with_suffix(".json")

    def open(self) -> MetaTensor:
        """``(1, I, J, K)`` on a copy-on-write map of the file (raises FileNotFoundError once evicted)."""
        array = np.load(self.path, mmap_mode="c", allow_pickle=False)
        meta = {k: np.asarray(v) if isinstance(v, list) else v for k, v in self.meta.items()}
        return MetaTensor.ensure_torch_and_prune_meta(torch.from_numpy(array), meta).unsqueeze(0)

    def remove(self) -> None:
        for path in (self.record, self.path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _private_copy(value: Any) -> Any:
    """What a caller may modify in place: a clone of a tensor or array, a fresh copy-on-write map of a
    spilled volume; handles (slides) are shared, since reading from them changes nothing."""
    if isinstance(value, _Spilled):
        return value.open()
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


@dataclass
class _Entry:
    signature: Signature
    value: Any
    nbytes: int  # memory held
    disk_bytes: int = 0  # bytes of a spilled volume's file


class _Pending:
    """A decode in progress, which concurrent requests for the same study wait for instead of repeating."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.waiters = 0


class ImageCache:
    """Thread-safe LRU of decoded images bounded by the total bytes of what it holds.

    ``get`` returns a clone of a cached tensor, or a fresh copy-on-write map of a spilled volume, so a
    predictor that normalises its input in place cannot corrupt the copy the next click reuses (a clone
    of a 512x512x300 float32 CT took 0.2-0.8 s on the loaded 2-core machine; a map takes a millisecond).
    An image larger than the whole budget is returned but not cached. Decoding runs outside the
    lock, so a slow study never stalls clicks on a cached one; two requests for the same study decode it
    once.

    Args:
        max_bytes: memory budget of the decoded images; 0 caches nothing.
        loader: ``loader(path, kind, **options)`` decoding one image (default: :func:`read_image`).
        limits: the most one image may cost to decode, passed to the loader as ``limits=`` (a custom
            loader must then accept it); None: the readers' default limits.
        spill_dir: folder for decoded volumes (see :meth:`spill_to`); None keeps them in memory.
        max_spill_bytes: disk budget of ``spill_dir``.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, loader: Callable[..., Any] = read_image,
                 limits: ImageLimits | None = None, spill_dir: str | os.PathLike | None = None,
                 max_spill_bytes: int = DEFAULT_MAX_SPILL_BYTES):
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
        self._disk_bytes = 0
        self.hits = 0
        self.misses = 0
        self.spill_dir: Path | None = None
        self.max_spill_bytes = 0
        self._commits: list[threading.Thread] = []
        if spill_dir is not None:
            self.spill_to(spill_dir, max_spill_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes of the images held in memory now (always <= ``max_bytes``)."""
        return self._nbytes

    @property
    def spill_nbytes(self) -> int:
        """Bytes of the decoded volumes in ``spill_dir`` (always <= ``max_spill_bytes``)."""
        return self._disk_bytes

    def _drop(self, key: Key) -> None:
        entry = self._items.pop(key)
        self._nbytes -= entry.nbytes
        self._disk_bytes -= entry.disk_bytes
        if isinstance(entry.value, _Spilled):
            entry.value.remove()

    def _store(self, key: Key, entry: _Entry) -> bool:
        spilled = isinstance(entry.value, _Spilled)
        size, budget = (entry.disk_bytes, self.max_spill_bytes) if spilled else (entry.nbytes, self.max_bytes)
        if not 0 < size <= budget:
            return False
        if key in self._items:
            self._drop(key)
        self._items[key] = entry
        self._nbytes += entry.nbytes
        self._disk_bytes += entry.disk_bytes
        self._evict_beyond_budgets()
        return True

    def _evict_beyond_budgets(self) -> None:
        """Drop the least recently used entries of whichever budget is exceeded, memory or disk."""
        for field, budget in (("nbytes", self.max_bytes), ("disk_bytes", self.max_spill_bytes)):
            while (self._nbytes if field == "nbytes" else self._disk_bytes) > budget:
                oldest = next(k for k, e in self._items.items() if getattr(e, field) > 0)
                self._drop(oldest)
                logger.debug("evicted %s (%s)", Path(oldest[0]).name, oldest[1])

    # -- decoded volumes on disk ---------------------------------------------------------------------
    def spill_to(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_SPILL_BYTES) -> bool:
        """Decode volumes into ``folder`` from now on, within ``max_bytes`` of disk, and take over the
        volumes a previous process committed there (their studies unchanged). Returns False, and keeps
        volumes in memory, where the folder cannot be created (a read-only datastore)."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise ValueError(f"image cache max_spill_bytes must be an integer >= 0, got {max_bytes!r}")
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            logger.warning("decoded volumes stay in memory: cannot create %s (%s)", folder, type(e).__name__)
            return False
        with self._lock:
            self.spill_dir, self.max_spill_bytes = folder, int(max_bytes)
            adopted = self._adopt_spilled(folder)
            self._evict_beyond_budgets()
        logger.info("decoded volumes go to %s (%d reused, %.1f MiB)", folder, adopted, self._disk_bytes / 2**20)
        return True

    def _adopt_spilled(self, folder: Path) -> int:
        """Enter the committed volumes of ``folder`` whose study is unchanged, oldest use first; remove
        stale ones and a crash's leftovers."""
        records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        kept: set[Path] = set()
        for record in records:
            try:
                saved = json.loads(record.read_text())
                key: Key = (saved["key"][0], saved["key"][1], tuple((k, v) for k, v in saved["key"][2]))
                signature: Signature = tuple(saved["signature"])  # type: ignore[assignment]
                spilled = _Spilled(record.with_suffix(".npy"), saved["meta"], int(saved["nbytes"]))
                valid = (saved["format"] == SPILL_FORMAT and spilled.path.name == _spill_name(key, signature)
                         and spilled.path.stat().st_size == spilled.nbytes
                         and os.path.exists(key[0]) and file_signature(key[0]) == signature)
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                valid = False
            if not valid:
                _Spilled(record.with_suffix(".npy"), {}, 0).remove()
                continue
            if key in self._items:
                self._drop(key)
            self._items[key] = _Entry(signature, spilled, 0, spilled.nbytes)
            self._disk_bytes += spilled.nbytes
            kept.update((spilled.path, record))
        now = time.time()
        for path in folder.iterdir():
            if path not in kept and path.is_file() and now - path.stat().st_mtime > ORPHAN_AGE_S:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return len(kept) // 2

    def _spills(self, kind: str, options: dict[str, Hashable]) -> bool:
        plain = all(isinstance(v, (str, int, float, bool)) or v is None for v in options.values())
        return self.spill_dir is not None and self.max_spill_bytes > 0 and kind in SPILL_KINDS and plain

    def _decode_to_disk(self, path: str | os.PathLike, kind: str, options: dict[str, Hashable],
                        signature: Signature, key: Key) -> _Spilled:
        """Decode straight into a hidden file of ``spill_dir`` and rename it into place when complete."""
        final = self.spill_dir / _spill_name(key, signature)
        staged = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.npy.tmp")

        def allocate(shape: tuple[int, int, int]) -> np.ndarray:
            return np.lib.format.open_memmap(staged, mode="w+", dtype=np.float32, shape=shape, fortran_order=True)

        try:
            value = self._load(path, kind, {**options, "out": allocate})
            if not isinstance(value, MetaTensor) or value.ndim != 4 or value.shape[0] != 1:
                raise TypeError(f"a spilled {kind} must load as a (1, I, J, K) MetaTensor, got {type(value).__name__}")
            if not staged.is_file():  # a loader that ignored ``out``
                allocate(tuple(value.shape[1:]))[...] = value[0].numpy()
            meta = {k: _jsonable(v) for k, v in value.meta.items() if isinstance(v, (str, int, float, bool, list,
                                                                                       torch.Tensor, np.ndarray))}
            del value  # unmaps the staged file: its pages stay in the page cache, unsynced
            os.replace(staged, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            raise
        spilled = _Spilled(final, meta, final.stat().st_size)
        record = {"format": SPILL_FORMAT, "key": [key[0], key[1], [list(o) for o in key[2]]],
                  "signature": list(signature), "meta": meta, "nbytes": spilled.nbytes}
        commit = threading.Thread(target=_commit_spilled, args=(spilled, record), daemon=True,
                                  name=f"commit {final.stem[:8]}")
        commit.start()
        with self._lock:
            self._commits = [*(t for t in self._commits if t.is_alive()), commit]
        return spilled

    def wait_for_commits(self, timeout: float | None = None) -> None:
        """Wait until every spilled volume is synced and recorded (a later process can reuse it)."""
        for thread in list(self._commits):
            thread.join(timeout)

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
            try:
                return _private_copy(cached)
            except FileNotFoundError:  # its file was removed (by another process's budget): decode again
                with self._lock:
                    if self._items.get(key) is not None and self._items[key].value is cached:
                        self._drop(key)
                return self.get(path, kind, cache=cache, **options)
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return _private_copy(pending.value)

        try:
            if self._spills(kind, options):
                value = self._decode_to_disk(path, kind, options, signature, key)
            else:
                value = self._load(path, kind, options)
        except BaseException as e:
            with self._lock:
                del self._pending[(signature, key)]
                pending.error = e
                pending.done.set()
            raise
        spilled = isinstance(value, _Spilled)
        size = value.nbytes if spilled else value_nbytes(value)
        with self._lock:
            stored = self._store(key, _Entry(signature, value, 0, size) if spilled else _Entry(signature, value, size))
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
        if spilled and not stored:  # larger than the whole disk budget: this caller's map is all that is left
            image = value.open()
            value.remove()
            return image
        return _private_copy(value) if stored or shared or spilled else value

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
            with contextlib.suppress(FileNotFoundError):  # a spilled file removed by another process
                return _private_copy(cached)
        value = self._load(path, kind, options)
        logger.debug("decoded %s (%s, %.1f MiB) for one request, not cached", Path(path).name, kind,
                     value_nbytes(value) / 2**20)
        return value

    def clear(self) -> None:
        with self._lock:
            for key in list(self._items):
                self._drop(key)

    def __len__(self) -> int:
        return len(self._items)


def _spill_name(key: Key, signature: Signature) -> str:
    """The file of an entry: changes with the study's signature, the reader, its options and the layout."""
    text = json.dumps([SPILL_FORMAT, key[0], key[1], [list(o) for o in key[2]], list(signature)])
    return hashlib.sha256(text.encode()).hexdigest()[:40] + ".npy"


def _commit_spilled(spilled: _Spilled, record: dict[str, Any]) -> None:
    """Sync a spilled volume to disk, then write its record: only then may a later process reuse it."""
    try:
        fd = os.open(spilled.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write_text(spilled.record, json.dumps(record))
    except FileNotFoundError:  # evicted meanwhile: nothing to commit
        return
    except OSError as e:
        logger.warning("decoded volume %s not committed (%s): it is decoded again after a restart",
                       spilled.path.name, type(e).__name__)
