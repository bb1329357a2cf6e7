"""Contrastive pre-training of the offline CLIP pair on the training folds' ERUS image-report pairs.

No pretrained image CLIP can be downloaded offline, and a random frozen encoder would make the
booster's image features noise. So, when no CLIP checkpoint is named, the bundle pre-trains a small
:class:`~oncofusion.networks.clip_encoders.ClipPair` (a 2D ResNet image tower and the packaged MiniLM
sentence encoder with LoRA) with the symmetric CLIP loss on each frame and its patient's report, then
freezes it. The labels are never seen: the pair learns what the reports say about the images (stage,
extent, echotexture, nodes), which is what a CLIP pretrained on many image-text pairs brings in the paper.
One pair per outer fold, trained on the other folds' patients only, so no out-of-fold feature comes
from an encoder that saw its patient. The epoch is chosen on an inner, patient-grouped validation split
by its contrastive loss.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncofusion.io.frames import read_frame
from oncofusion.losses.contrastive import clip_contrastive_loss
from oncofusion.networks.clip_encoders import ClipPair, clip_pixels

logger = logging.getLogger(__name__)


def image_report_pairs(records: Sequence[Mapping], pair: ClipPair, intensity_range: Sequence[float],
                       frames_key: str = "images", report_key: str = "report") -> tuple[torch.Tensor, list[str], list[str]]:
    """Every frame of every record with its patient's report: pixels ``(P, 3, S, S)``, reports, patient ids."""
    from oncofusion.networks.towers import CLIP_MEAN, CLIP_STD

    pixels, reports, patients = [], [], []
    low, high = float(intensity_range[0]), float(intensity_range[1])
    for record in records:
        for path in record.get(frames_key) or [record["image"]]:
            frame = read_frame(path)
            pixels.append(clip_pixels(frame, pair.config["image_size"], CLIP_MEAN, CLIP_STD, (low, high)))
            reports.append(record[report_key])
            patients.append(str(record.get("patient_id", record["case_id"])))
    return torch.stack(pixels), reports, patients


def _patient_split(patients: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    unique = sorted(set(patients))
    random.Random(seed).shuffle(unique)
    held = set(unique[: max(1, round(fraction * len(unique)))]) if fraction > 0 else set()
    train = [i for i, p in enumerate(patients) if p not in held]
    validation = [i for i, p in enumerate(patients) if p in held]
    return train, validation


def _one_frame_per_patient(indices: Sequence[int], patients: Sequence[str], generator: torch.Generator | None
                           ) -> list[int]:
    """One pair per patient, shuffled (a random frame with ``generator``, else the first): two frames of one
    patient share a report, and in one batch each would count the other's report as a wrong match."""
    by_patient: dict[str, list[int]] = {}
    for index in indices:
        by_patient.setdefault(patients[index], []).append(index)
    groups = list(by_patient.values())
    if generator is None:
        return [group[0] for group in groups]
    chosen = [group[int(torch.randint(len(group), (1,), generator=generator))] for group in groups]
    return [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]


def _shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (wrapping): the probe is not always centred."""
    if max_shift <= 0:
        return pixels
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(pixels, shifts=(dy, dx), dims=(-2, -1))


def _epoch_loss(pair: ClipPair, pixels: torch.Tensor, reports: Sequence[str] | torch.Tensor, order: Sequence[int],
                batch_size: int, device: torch.device, optimizer: torch.optim.Optimizer | None = None,
                max_shift: int = 0, generator: torch.Generator | None = None) -> float:
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = list(order[start:start + batch_size])
        if len(batch) < 2:  # one pair has no negative: the loss is undefined
            continue
        images = pixels[batch]
        if optimizer is not None and generator is not None:
            images = _shift(images, max_shift, generator)
        texts = reports[batch].to(device) if isinstance(reports, torch.Tensor) else [reports[i] for i in batch]
        image_embedding, text_embedding, scale = pair(images.to(device), texts)
        loss = clip_contrastive_loss(image_embedding, text_embedding, scale, label_smoothing=0.0)
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        total += float(loss.detach()) * len(batch)
        count += len(batch)
    return total / max(count, 1)


def pretrain_clip_pair(records: Sequence[Mapping], output_dir: str | Path, pair_args: Mapping[str, Any] | None = None,
                       intensity_range: Sequence[float] = (0, 255), max_epochs: int = 30, patience: int = 6,
                       batch_size: int = 32, learning_rate: float = 1e-3, weight_decay: float = 1e-4,
                       validation_fraction: float = 0.15, max_shift: int = 8, seed: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """Train a :class:`ClipPair` on ``records`` (the training folds' patients) and save the best epoch.

    Returns the history: per-epoch train/validation loss, the best epoch, and the top-1 image-to-report
    retrieval accuracy on the validation pairs (chance is 1 / pairs per batch).
    """
    torch.manual_seed(seed)
    device = torch.device(device)
    pair = ClipPair(**dict(pair_args or {})).to(device)
    pixels, reports, patients = image_report_pairs(records, pair, intensity_range)
    train, validation = _patient_split(patients, validation_fraction, seed)
    texts: list[str] | torch.Tensor = reports
    if not pair.text_tower_trains:  # a frozen sentence encoder: each report's features once, not every epoch
        unique = sorted(set(reports))
        pair.text_tower.eval()  # no dropout in features computed once for every epoch
        with torch.no_grad():
            encoded = torch.cat([pair.text_tower(unique[i:i + 64]) for i in range(0, len(unique), 64)]).cpu()
        texts = encoded[[unique.index(report) for report in reports]]
    if len(set(patients[i] for i in train)) < 2 or len(set(patients[i] for i in validation)) < 2:
        raise ValueError(f"{len(patients)} image-report pairs are too few to pre-train a CLIP pair "
                         f"({len(train)} train, {len(validation)} validation): give it more patients")
    optimizer = torch.optim.AdamW([p for p in pair.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, Any] = {"train_loss": [], "validation_loss": [], "pairs": len(patients)}
    validation = _one_frame_per_patient(validation, patients, None)
    best, best_epoch, waited = math.inf, -1, 0
    for epoch in range(max_epochs):
        pair.train()
        order = _one_frame_per_patient(train, patients, generator)
        train_loss = _epoch_loss(pair, pixels, texts, order, batch_size, device, optimizer, max_shift, generator)
        pair.eval()
        with torch.no_grad():
            validation_loss = _epoch_loss(pair, pixels, texts, validation, batch_size, device)
        history["train_loss"].append(round(train_loss, 5))
        history["validation_loss"].append(round(validation_loss, 5))
        logger.info("CLIP pair epoch %d: train %.4f, validation %.4f", epoch, train_loss, validation_loss)
        if validation_loss < best - 1e-4:
            best, best_epoch, waited = validation_loss, epoch, 0
            pair.save_pretrained(output_dir)
        else:
            waited += 1
            if waited >= patience:
                break
    history["best_epoch"] = best_epoch
    history["best_validation_loss"] = round(best, 5)
    history["validation_retrieval_top1"] = _retrieval_top1(ClipPair.from_pretrained(output_dir).to(device).eval(),
                                                           pixels, reports, validation, batch_size, device)
    return history


@torch.no_grad()
def _retrieval_top1(pair: ClipPair, pixels: torch.Tensor, reports: Sequence[str], indices: Sequence[int],
                    batch_size: int, device: torch.device) -> float:
    """Share of validation images whose most similar report, within their batch, is their own patient's."""
    hits, count = 0, 0
    for start in range(0, len(indices), batch_size):
        batch = list(indices[start:start + batch_size])
        image_embedding = pair.encode_image(pixels[batch].to(device))
        text_embedding = pair.encode_text([reports[i] for i in batch])
        chosen = (image_embedding @ text_embedding.t()).argmax(dim=1).cpu().numpy()
        same = np.array([[reports[i] == reports[j] for j in batch] for i in batch])
        hits += int(same[np.arange(len(batch)), chosen].sum())
        count += len(batch)
    return round(hits / max(count, 1), 4)
