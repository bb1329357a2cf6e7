"""Load a study once and keep it decoded while the user keeps clicking on it.

A clinician places several points on the same scan; decoding a 512x512x300 NIfTI or a DICOM series
takes seconds, the prediction itself much less. The cache is keyed by the file's identity *and*
modification time, so a study that is replaced on disk is decoded again instead of served stale.

Volumes are loaded without reorientation: Slicer sends click indices (IJK) in the image's own voxel
grid, so the array must keep the on-disk axis order for ``image[0, i, j, k]`` to be the clicked voxel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.data.image_reader import ImageReader

from oncofusion.serving.predictor import InvalidRequest

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: (realpath, mtime_ns, size) of a file; for a DICOM folder: newest mtime and total size of its files
Signature = tuple[str, int, int]


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


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


def _reader_for(path: Path) -> ImageReader:
    """One reader per format, used directly: ``LoadImage`` falls back to every installed reader when the
    chosen one fails, including ``np.load(allow_pickle=True)``, which must never see an uploaded file."""
    if path.is_dir():
        return PydicomReader()
    if is_nifti(path):
        return NibabelReader()
    raise InvalidRequest(
        f"unsupported image format for '{path.name}': send a NIfTI file (.nii, .nii.gz) or a DICOM series folder",
        415,
    )


def read_volume(path: str | os.PathLike, what: str = "image") -> MetaTensor:
    """Decode a 3D scan into a float32 ``MetaTensor`` (1, I, J, K) carrying its affine; no reorientation.

    Every problem the user can fix (missing file, wrong format, 2D or 4D data, NaN voxels) is raised as
    :class:`InvalidRequest` naming the file, so the server answers 4xx instead of 500.
    """
    path = Path(path)
    if not str(path) or not path.exists():
        raise InvalidRequest(f"{what} '{path.name or path}' not found", 400)
    reader = _reader_for(path)
    try:
        array, meta = reader.get_data(reader.read(str(path)))
        meta["filename_or_obj"] = str(path)
        data = MetaTensor.ensure_torch_and_prune_meta(np.asarray(array, dtype=np.float32), meta)
    except Exception as e:  # any decoder failure means the file is not a readable scan
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason.replace(str(path), path.name)  # directories may name the patient
        raise InvalidRequest(
            f"cannot read {what} '{path.name}' with {type(reader).__name__}: {reason}", 415
        ) from e

    # a 3D NIfTI sometimes carries trailing singleton dimensions (I, J, K, 1)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    shape = tuple(int(s) for s in data.shape)
    if len(shape) != 3 or min(shape) < 2:
        raise InvalidRequest(
            f"{what} '{path.name}' has shape {'x'.join(map(str, shape))}: "
            "a 3D volume (I, J, K) with at least 2 voxels along each axis is required",
            422,
        )
    finite = torch.isfinite(data)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        detail = "only NaN/infinite voxels" if bad == finite.numel() else f"{bad} NaN/infinite voxels"
        raise InvalidRequest(f"{what} '{path.name}' contains {detail}: re-export the volume", 422)
    if not isinstance(data, MetaTensor):  # pragma: no cover - LoadImage always returns one
        data = MetaTensor(data)
    return data.unsqueeze(0)


def image_affine(path: str | os.PathLike) -> np.ndarray:
    """The 4x4 voxel-to-world (RAS) affine that :func:`read_volume` would attach, reading only the header
    for NIfTI (training builds a datalist over every study and must not decode them all)."""
    if is_nifti(path):
        try:
            return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
        except Exception as e:
            raise InvalidRequest(f"cannot read the header of '{Path(path).name}': {e}", 415) from e
    return np.asarray(read_volume(path).affine, dtype=np.float64)


class ImageCache:
    """Thread-safe LRU of decoded volumes keyed by :func:`file_signature`.

    ``get`` returns a clone, so a predictor that normalises its input in place cannot corrupt the
    copy the next click reuses; cloning costs tens of milliseconds where decoding costs seconds.
    """

    def __init__(self, capacity: int = 4, loader: Callable[[str], MetaTensor] = read_volume):
        if capacity < 0:
            raise ValueError(f"image_cache_size must be >= 0, got {capacity}")
        self.capacity = capacity
        self._loader = loader
        self._items: OrderedDict[Signature, MetaTensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: str | os.PathLike) -> MetaTensor:
        if not str(path) or not os.path.exists(path):
            raise InvalidRequest(f"image '{Path(path).name or path}' not found", 400)
        key = file_signature(path)
        with self._lock:
            cached = self._items.get(key)
            if cached is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return cached.clone()
            self.misses += 1

        # decode outside the lock: a slow study must not stall clicks on a cached one
        image = self._loader(str(path))
        if self.capacity:
            with self._lock:
                self._items[key] = image
                self._items.move_to_end(key)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        logger.debug("decoded %s (%s); %d cached", Path(path).name, tuple(image.shape), len(self._items))
        return image.clone() if self.capacity else image

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
