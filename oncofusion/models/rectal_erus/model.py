"""The two stages together: per outer fold, a frozen CLIP encoder and the LightGBM booster on its features.

Fold ``k``'s member is (encoder ``k``, booster ``k``). With a CLIP checkpoint named in the config every
fold shares that encoder; with the offline default each fold has its own pre-trained pair
(``<models>/clip_pair/fold_<k>``), trained on the other folds' patients, so the booster that holds out
fold ``k`` reads features from an encoder that never saw fold ``k`` either. A prediction averages the
members' probabilities; SHAP values are computed per member on its own features and averaged, so the
per-modality sums (image vs text) are exact for the mean log-odds. Per-column values are averaged by
column position: with per-fold pairs, ``image_17`` is not the same direction in every encoder, so read
the top columns as indicative and the modality sums as the explanation.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncofusion.io.atomic import atomic_write_text
from oncofusion.models.rectal_erus import features as feature_lib
from oncofusion.models.rectal_erus.booster import BoosterEnsemble
from oncofusion.models.rectal_erus.pretrain import pretrain_clip_pair
from oncofusion.models.rectal_erus.shap_explain import ShapExplanation, explain
from oncofusion.networks.clip_encoders import FrozenClip, load_frozen_clip

logger = logging.getLogger(__name__)

#: ``clip_encoder`` value that selects the offline default, one pre-trained pair per fold
PAIR = "pair"
PAIR_DIR = "clip_pair"
BOOSTER_DIR = "booster"


def encoder_source(clip_encoder: str, ckpt_dir: str | Path, fold: int) -> str:
    """Where fold ``fold``'s encoder is: its own pair directory, or the one CLIP checkpoint named."""
    if clip_encoder == PAIR:
        return str(Path(ckpt_dir) / PAIR_DIR / f"fold_{fold}")
    return clip_encoder


@functools.lru_cache(maxsize=16)
def _load_encoder(source: str, context_length: int | None, device: str) -> FrozenClip:
    return load_frozen_clip(source, context_length).to(device)


def load_encoder(clip_encoder: str, ckpt_dir: str | Path, fold: int, context_length: int | None = None,
                 device: torch.device | str = "cpu") -> FrozenClip:
    """Fold ``fold``'s frozen encoder, loaded once per process (folds sharing a checkpoint share it)."""
    return _load_encoder(encoder_source(clip_encoder, ckpt_dir, fold), context_length, str(torch.device(device)))


class ErusClipBooster:
    """Frozen CLIP encoders and LightGBM boosters, one of each per outer fold."""

    def __init__(self, clip_encoder: str, ckpt_dir: str | Path, context_length: int | None = None,
                 intensity_range: Sequence[float] = (0, 255), device: torch.device | str = "cpu"):
        self.boosters = BoosterEnsemble.load(Path(ckpt_dir) / BOOSTER_DIR)
        self.encoders = {k: load_encoder(clip_encoder, ckpt_dir, k, context_length, device) for k in self.boosters.folds}
        self.intensity_range = tuple(float(v) for v in intensity_range)

    @property
    def folds(self) -> list[int]:
        return list(self.boosters.folds)

    def members(self, fold: int | None = None) -> list[int]:
        if fold is None:
            return self.folds
        if fold not in self.folds:
            raise ValueError(f"no member held out fold {fold} (have folds {self.folds})")
        return [fold]

    def features(self, frames: Sequence[torch.Tensor], report: str, fold: int | None = None) -> dict[int, np.ndarray]:
        """Fold -> the patient's ``(1, D)`` features through that fold's encoder (frames mean-pooled)."""
        rows = {}
        for k in self.members(fold):
            encoder = self.encoders[k]
            image = feature_lib.image_features(encoder, frames, self.intensity_range)
            rows[k] = np.concatenate([image, feature_lib.text_features(encoder, report)])[None]
        return rows

    def member_outputs(self, features: Mapping[int, np.ndarray]) -> torch.Tensor:
        """``(M, B, 2)`` class probabilities, one member per fold in ``features``."""
        return torch.cat([self.boosters.member_outputs(x, fold=k) for k, x in features.items()])

    def explain(self, features: Mapping[int, np.ndarray]) -> ShapExplanation:
        """SHAP values of each member on its own features, averaged over the members."""
        parts = [explain(self.boosters, x, fold=k) for k, x in features.items()]
        return ShapExplanation(
            values=np.mean([p.values for p in parts], axis=0),
            base_value=float(np.mean([p.base_value for p in parts])),
            feature_names=parts[0].feature_names, feature_groups=parts[0].feature_groups,
            features=np.mean([p.features for p in parts], axis=0),
        )


def extract_fold_features(records: Sequence[Mapping], clip_encoder: str, ckpt_dir: str | Path, fold: int,
                          cache_dir: str | Path | None, intensity_range: Sequence[float] = (0, 255),
                          context_length: int | None = None, device: torch.device | str = "cpu",
                          progress: bool = True) -> tuple[np.ndarray, list[str], list[str]]:
    """Fold ``fold``'s encoder's ``(N, D)`` features of ``records``, with the column names and modalities."""
    encoder = load_encoder(clip_encoder, ckpt_dir, fold, context_length, device)
    table = feature_lib.feature_table(encoder, records, feature_lib.FeatureCache(cache_dir), intensity_range,
                                      progress=progress)
    names, groups = feature_lib.feature_names(encoder)
    return table, names, groups


def run_extraction(records: Sequence[Mapping], clip_encoder: str, ckpt_dir: str | Path, folds: Sequence[int],
                   cache_dir: str | Path | None, pair_args: Mapping[str, Any] | None = None,
                   pretrain_args: Mapping[str, Any] | None = None, intensity_range: Sequence[float] = (0, 255),
                   context_length: int | None = None, device: torch.device | str = "cpu",
                   overwrite: bool = False) -> dict[int, Any]:
    """Stage 1: pre-train each fold's pair on the other folds (when ``clip_encoder`` is ``"pair"``) and cache
    every patient's features through each fold's encoder. Returns each fold's pre-training history."""
    histories: dict[int, Any] = {}
    for fold in folds:
        source = Path(encoder_source(clip_encoder, ckpt_dir, fold))
        if clip_encoder == PAIR and (overwrite or not (source / "clip_pair.json").is_file()):
            training = [r for r in records if int(r["fold"]) != int(fold)]
            logger.info("fold %d: pre-training the CLIP pair on %d patients of the other folds", fold, len(training))
            histories[fold] = pretrain_clip_pair(training, source, pair_args, intensity_range, device=device,
                                                 **dict(pretrain_args or {}))
            atomic_write_text(source / "history.json", json.dumps(histories[fold], indent=2))
            _load_encoder.cache_clear()
        extract_fold_features(records, clip_encoder, ckpt_dir, fold, cache_dir, intensity_range, context_length, device)
    return histories


def run_training(records: Sequence[Mapping], clip_encoder: str, ckpt_dir: str | Path, folds: Sequence[int],
                 cache_dir: str | Path | None, booster_params: Mapping[str, Any] | None = None,
                 intensity_range: Sequence[float] = (0, 255), context_length: int | None = None,
                 inner_validation_fraction: float = 0.2, early_stopping_rounds: int = 50, seed: int = 0,
                 device: torch.device | str = "cpu", label_key: str = "label") -> BoosterEnsemble:
    """Stage 2: each fold's booster on its encoder's features of the other folds; saved under ``<models>/booster``."""
    labels = np.array([int(r[label_key]) for r in records])
    row_folds = np.array([int(r["fold"]) for r in records])
    trained = []
    for fold in folds:
        table, names, groups = extract_fold_features(records, clip_encoder, ckpt_dir, fold, cache_dir,
                                                     intensity_range, context_length, device, progress=False)
        trained.append(BoosterEnsemble.fit_folds(
            table, labels, row_folds, names, groups, dict(booster_params or {}), inner_validation_fraction,
            early_stopping_rounds, seed=seed, train_folds=[fold]))
    ensemble = BoosterEnsemble(
        [e.boosters[0] for e in trained], [e.folds[0] for e in trained], trained[0].feature_names,
        trained[0].feature_groups, trained[0].params, [e.best_iterations[0] for e in trained])
    ensemble.save(Path(ckpt_dir) / BOOSTER_DIR)
    return ensemble
