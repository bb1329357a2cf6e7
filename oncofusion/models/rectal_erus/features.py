"""Stage 1 of the rectal ERUS model: frozen CLIP image and text features per patient, cached on disk.

As the paper: each frame is resized to the encoder's input (224 x 224 bicubic for CLIP), RGB, normalised
with the encoder's mean and std; the report goes through the encoder's text tower at its context length;
image and text features are L2-normalised; a patient's frames are mean-pooled (then normalised again,
so patients with more frames are not longer vectors). The image and the text features are concatenated
for the booster, image columns first.

Features are cached on disk keyed by the encoder's id (which changes with its weights), the file's
content hash and the frame index, so a second extraction, or a new fold that shares an encoder, reads
instead of computing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from oncofusion.io.atomic import atomic_output
from oncofusion.io.frames import read_frame
from oncofusion.networks.clip_encoders import FrozenClip, clip_pixels

logger = logging.getLogger(__name__)

IMAGE_GROUP, TEXT_GROUP = "image", "text"


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits): the cache key of an image, whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class FeatureCache:
    """One ``.npy`` per (encoder, kind, content) under ``directory``; None disables caching."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory else None
        self.hits = 0
        self.misses = 0

    def _path(self, encoder_id: str, kind: str, content: str) -> Path:
        encoder = hashlib.sha256(encoder_id.encode("utf-8")).hexdigest()[:16]
        return self.directory / encoder / kind / f"{content}.npy"

    def get(self, encoder_id: str, kind: str, content: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if self.directory is None:
            return compute()
        path = self._path(encoder_id, kind, content)
        if path.is_file():
            self.hits += 1
            return np.load(path)
        self.misses += 1
        value = np.asarray(compute(), dtype=np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as staged, open(staged, "wb") as handle:
            np.save(handle, value)
        return value


def frame_pixels(frame: torch.Tensor, clip: FrozenClip, intensity_range: Sequence[float]) -> torch.Tensor:
    """A decoded frame ``(C, W, H)`` -> the encoder's input ``(3, S, S)``."""
    return clip_pixels(torch.as_tensor(frame), clip.image_size, clip.mean, clip.std,
                       (float(intensity_range[0]), float(intensity_range[1])))


def image_features(clip: FrozenClip, frames: Sequence[torch.Tensor], intensity_range: Sequence[float]) -> np.ndarray:
    """Decoded frames of one patient -> ``(E_image,)``: each frame encoded, mean-pooled, normalised."""
    pixels = torch.stack([frame_pixels(frame, clip, intensity_range) for frame in frames])
    return pool(clip.encode_images(pixels).cpu().numpy())


def pool(features: np.ndarray) -> np.ndarray:
    """Mean of unit vectors ``(F, E)`` -> one unit vector ``(E,)``."""
    mean = features.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def text_features(clip: FrozenClip, report: str) -> np.ndarray:
    return clip.encode_texts([report])[0].cpu().numpy().astype(np.float32)


def patient_features(clip: FrozenClip, frame_paths: Sequence[str | Path], report: str, cache: FeatureCache,
                     intensity_range: Sequence[float] = (0, 255), frame: int | None = None) -> np.ndarray:
    """``(E_image + E_text,)`` of one patient from its frame files and report, through the cache."""
    if not frame_paths:
        raise ValueError("a patient needs at least one ultrasound frame")
    per_frame = [
        cache.get(clip.encoder_id, "image", f"{file_digest(path)}_{frame}",
                  lambda path=path: image_features(clip, [read_frame(path, frame)], intensity_range))
        for path in frame_paths
    ]
    text = cache.get(clip.encoder_id, "text", text_digest(report), lambda: text_features(clip, report))
    return np.concatenate([pool(np.stack(per_frame)), text])


def feature_names(clip: FrozenClip) -> tuple[list[str], list[str]]:
    """Column names (``image_0``..., ``text_0``...) and each column's modality, from one probe encoding."""
    probe_pixels = torch.zeros(1, 3, clip.image_size, clip.image_size)
    width_image = int(clip.encode_images(probe_pixels).shape[-1])
    width_text = int(clip.encode_texts(["probe"]).shape[-1])
    names = [f"image_{i}" for i in range(width_image)] + [f"text_{i}" for i in range(width_text)]
    return names, [IMAGE_GROUP] * width_image + [TEXT_GROUP] * width_text


def feature_table(clip: FrozenClip, records: Sequence[Mapping], cache: FeatureCache,
                  intensity_range: Sequence[float] = (0, 255), frames_key: str = "images",
                  report_key: str = "report", progress: bool = True) -> np.ndarray:
    """``(N, D)`` features of the records' patients (``frames_key``: frame paths, else ``image``)."""
    rows = []
    for record in tqdm(records, desc=f"CLIP features ({clip.encoder_id.split(':')[0]})", disable=not progress,
                       unit="patient"):
        frames = record.get(frames_key) or [record["image"]]
        rows.append(patient_features(clip, frames, record[report_key], cache, intensity_range))
    logger.info("CLIP features of %d patients: %d cached, %d computed", len(rows), cache.hits, cache.misses)
    return np.stack(rows)
