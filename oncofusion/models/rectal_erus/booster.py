"""Stage 2 of the rectal ERUS model: a LightGBM fold ensemble on concatenated image + text CLIP features.

One binary booster per outer fold, each trained on the patients of the other folds, so that every patient
has an out-of-fold score from a model that never saw them. Early stopping picks the number of trees on an
inner, stratified split of the training patients only: the held-out fold never chooses anything, so its
score is an honest out-of-fold estimate.

:meth:`BoosterEnsemble.member_outputs` mirrors :meth:`oncofusion.ensemble.Ensemble.member_outputs` (the
``(M, B, C)`` stack of per-member class probabilities), so the shared predictor skeleton runs this
ensemble unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oncofusion.io.atomic import atomic_output, atomic_write_text

logger = logging.getLogger(__name__)

#: the file that lists a saved ensemble's folds; written last, so its presence means every fold file is whole
MANIFEST = "booster.json"
#: each fold's booster, ``fold<k>/model.txt``, as every K-fold bundle lays out its fold models
BOOSTER_FILE = "model.txt"

#: small-data defaults (a few hundred patients, ~1-2k features): shallow trees, slow learning, row and
#: column subsampling and an L2 penalty against overfitting. ``num_threads=0`` is LightGBM's own choice;
#: ``deterministic`` + ``force_col_wise`` make a seeded fit repeatable. The early-stopping metric is AUC:
#: it ranks, so it is blind to the probability shift that ``scale_pos_weight`` causes (log-loss on an
#: unweighted validation set would punish that shift and stop too early).
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "auc",
    "num_leaves": 15,
    "learning_rate": 0.05,
    "min_data_in_leaf": 10,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbosity": -1,
    "deterministic": True,
    "force_col_wise": True,
    "num_threads": 0,
}


def _as_matrix(features: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """``(B, D)`` float64 numpy from numpy or torch; a single row ``(D,)`` becomes ``(1, D)``."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (patients, features), got shape {x.shape}")
    return x


def _check_finite(x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise ValueError(f"features hold {bad.sum()} NaN/inf value(s) (first at row {rows[0]}, column {cols[0]}): "
                         "re-extract or impute those patients' features before fitting")


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size != n:
        raise ValueError(f"labels has {y.size} entries but features has {n} rows: give one label per patient")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be binary 0/1, got values {sorted(values)}: map good responders "
                         "(TRG 0) to 1 and poor responders (TRG 1-3) to 0")
    return y.astype(np.int64)


def _check_folds(folds: np.ndarray, n: int) -> np.ndarray:
    f = np.asarray(folds).reshape(-1)
    if f.size != n:
        raise ValueError(f"folds has {f.size} entries but features has {n} rows: give one fold index per patient")
    if not np.issubdtype(f.dtype, np.integer) and not np.all(np.equal(np.mod(f, 1), 0)):
        raise ValueError(f"folds must be integer fold indices, got dtype {f.dtype}")
    return f.astype(np.int64)


def _check_names(feature_names: Sequence[str], feature_groups: Sequence[str], width: int) -> None:
    if len(feature_names) != width:
        raise ValueError(f"feature_names has {len(feature_names)} names but features has {width} columns")
    if len(feature_groups) != width:
        raise ValueError(f"feature_groups has {len(feature_groups)} groups but features has {width} columns")
    if len(set(feature_names)) != width:
        raise ValueError("feature_names must be unique (LightGBM and SHAP address columns by name)")


def _training_params(base: dict[str, Any], y_train: np.ndarray, override: dict[str, Any]) -> dict[str, Any]:
    """``base`` + this fold's ``scale_pos_weight`` (negatives / positives of its training rows), unless the
    caller set it or chose ``is_unbalance`` (LightGBM refuses both at once)."""
    params = dict(base)
    if "scale_pos_weight" not in override and not override.get("is_unbalance", False):
        positives = int(y_train.sum())
        params["scale_pos_weight"] = (y_train.size - positives) / positives
    return params


def _inner_split(rows: np.ndarray, y: np.ndarray, fraction: float, seed: int, fold: int) -> tuple[np.ndarray, ...]:
    """Training rows split into (fit, early-stopping) rows, stratified by label and seeded."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y[rows], minlength=2)
    if counts.min() < 2:
        raise ValueError(f"fold {fold}'s training rows have {counts[1]} positive and {counts[0]} negative "
                         "patient(s): the stratified early-stopping split needs at least 2 of each class")
    return tuple(train_test_split(rows, test_size=fraction, stratify=y[rows], random_state=seed + fold))


class BoosterEnsemble:
    """One LightGBM binary booster per outer fold; ``folds[i]`` is the fold ``boosters[i]`` held out.

    ``feature_groups[j]`` is column ``j``'s modality (``"image"``, ``"text"``): SHAP contributions are
    summed per group to tell which modality drives a prediction. ``best_iterations[i]``: the trees
    ``boosters[i]`` keeps (picked by early stopping).
    """

    #: how the predictor skeleton reads :meth:`member_outputs`: per-member class probabilities
    aggregation = "mean_probability"

    def __init__(self, boosters: Sequence[Any], folds: Sequence[int], feature_names: Sequence[str],
                 feature_groups: Sequence[str], params: dict[str, Any], best_iterations: Sequence[int]):
        if not (len(boosters) == len(folds) == len(best_iterations)):
            raise ValueError(f"{len(boosters)} boosters, {len(folds)} folds and {len(best_iterations)} best "
                             "iterations: give one of each per fold")
        _check_names(feature_names, feature_groups, len(feature_names))
        self.boosters = list(boosters)
        self.folds = [int(k) for k in folds]
        self.feature_names = list(feature_names)
        self.feature_groups = list(feature_groups)
        self.params = dict(params)
        self.best_iterations = [int(b) for b in best_iterations]

    # -- training -----------------------------------------------------------------------------------
    @classmethod
    def fit_folds(cls, features: np.ndarray, labels: np.ndarray, folds: np.ndarray, feature_names: Sequence[str],
                  feature_groups: Sequence[str], params: dict[str, Any] | None = None,
                  inner_validation_fraction: float = 0.2, early_stopping_rounds: int = 50,
                  num_boost_round: int = 1000, seed: int = 0,
                  train_folds: Sequence[int] | None = None) -> BoosterEnsemble:
        """Train one booster per outer fold on the rows (patients) of the other folds.

        features ``(N, D)``, labels ``(N,)`` 0/1, folds ``(N,)`` each row's outer fold. ``params`` update
        :data:`DEFAULT_PARAMS` (use LightGBM's canonical names, not aliases). Class imbalance: each fold's
        booster gets ``scale_pos_weight = negatives / positives`` of its training rows, so both classes
        weigh the same in the loss; a ``scale_pos_weight`` (or ``is_unbalance``) in ``params`` overrides
        it. The number of trees is picked by early stopping (``early_stopping_rounds`` without AUC gain,
        at most ``num_boost_round``) on a stratified ``inner_validation_fraction`` of the training rows,
        seeded by ``seed`` + fold; those rows are not fitted on. ``train_folds``: train only these folds.
        """
        x = _as_matrix(features)
        _check_finite(x)
        y = _check_labels(labels, len(x))
        f = _check_folds(folds, len(x))
        _check_names(feature_names, feature_groups, x.shape[1])
        if not 0 < inner_validation_fraction < 1:
            raise ValueError(f"inner_validation_fraction {inner_validation_fraction} must lie in (0, 1)")
        override = dict(params or {})
        if override.get("objective", "binary") != "binary":
            raise ValueError(f"objective {override['objective']!r} is not supported: the ensemble is binary")
        base = {**DEFAULT_PARAMS, "seed": seed, **override}
        chosen = cls._folds_to_train(f, train_folds)
        trained = [cls._fit_one(x, y, f, k, list(feature_names), base, override, inner_validation_fraction,
                                early_stopping_rounds, num_boost_round, seed) for k in chosen]
        return cls([b for b, _ in trained], chosen, feature_names, feature_groups, base, [i for _, i in trained])

    @staticmethod
    def _folds_to_train(folds: np.ndarray, train_folds: Sequence[int] | None) -> list[int]:
        present = sorted(set(folds.tolist()))
        if train_folds is None:
            return present
        unknown = sorted(set(int(k) for k in train_folds) - set(present))
        if unknown:
            raise ValueError(f"train_folds {unknown} hold no rows (the folds are {present})")
        return sorted(set(int(k) for k in train_folds))

    @staticmethod
    def _fit_one(x: np.ndarray, y: np.ndarray, folds: np.ndarray, fold: int, names: list[str],
                 base: dict[str, Any], override: dict[str, Any], fraction: float, patience: int,
                 rounds: int, seed: int) -> tuple[Any, int]:
        """The booster that holds out ``fold``, trimmed to its best iteration, and that iteration."""
        import lightgbm

        rows = np.flatnonzero(folds != fold)
        if np.unique(y[rows]).size < 2:
            raise ValueError(f"fold {fold}'s training rows (every other fold, {rows.size} patients) hold only "
                             f"class {int(y[rows][0])}: reassign folds so each has both classes outside it")
        fit_rows, stop_rows = _inner_split(rows, y, fraction, seed, fold)
        params = _training_params(base, y[rows], override)
        train_set = lightgbm.Dataset(x[fit_rows], y[fit_rows], feature_name=names, free_raw_data=True)
        stop_set = lightgbm.Dataset(x[stop_rows], y[stop_rows], reference=train_set)
        booster = lightgbm.train(params, train_set, num_boost_round=rounds, valid_sets=[stop_set],
                                 callbacks=[lightgbm.early_stopping(patience, verbose=False)])
        best = int(booster.best_iteration) or booster.current_iteration()
        # keep only the chosen trees, so that predict, SHAP and a saved file all see the same model
        booster = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=best))
        logger.info("fold %d: %d fit + %d early-stopping patients, scale_pos_weight %.3f, best iteration %d",
                    fold, fit_rows.size, stop_rows.size, params.get("scale_pos_weight", 1.0), best)
        return booster, best

    # -- prediction ---------------------------------------------------------------------------------
    def check_features(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(B, D)`` float64 numpy of this ensemble's width, or a ValueError naming both widths."""
        x = _as_matrix(features)
        if x.shape[1] != len(self.feature_names):
            raise ValueError(f"features have {x.shape[1]} columns but the boosters were trained on "
                             f"{len(self.feature_names)}: extract features with the bundle's encoder config")
        return x

    def chosen(self, fold: int | None = None) -> list[tuple[Any, int]]:
        """``(booster, best_iteration)`` of every member, or of the one that held out ``fold``."""
        pairs = list(zip(self.boosters, self.best_iterations, strict=True))
        if fold is None:
            return pairs
        if fold not in self.folds:
            raise ValueError(f"no booster held out fold {fold} (have folds {self.folds})")
        return [pairs[self.folds.index(fold)]]

    def member_outputs(self, features: np.ndarray | torch.Tensor, fold: int | None = None) -> torch.Tensor:
        """Each chosen member's class probabilities ``[1 - p, p]``, stacked: ``(M, B, 2)`` float64.

        ``fold=k``: only the booster that held out fold ``k`` (M = 1), for out-of-fold prediction.
        """
        x = self.check_features(features)
        p = np.stack([booster.predict(x, num_iteration=best) for booster, best in self.chosen(fold)])
        return torch.from_numpy(np.stack([1.0 - p, p], axis=-1))

    def forward(self, features: np.ndarray | torch.Tensor, fold: int | None = None) -> torch.Tensor:
        """Mean class probabilities over the chosen members, ``(B, 2)``."""
        return self.member_outputs(features, fold=fold).mean(0)

    __call__ = forward

    def out_of_fold(self, features: np.ndarray | torch.Tensor, folds: np.ndarray) -> np.ndarray:
        """``(N,)`` positive-class probability of each row from the booster that held out its fold."""
        x = self.check_features(features)
        f = _check_folds(folds, len(x))
        scores = np.empty(len(x), dtype=np.float64)
        for k in np.unique(f):
            rows = f == k
            scores[rows] = self.member_outputs(x[rows], fold=int(k))[0, :, 1].numpy()
        return scores

    # -- files --------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Each booster as ``fold<k>/model.txt`` (LightGBM text, best iteration only: the package's fold layout,
        :func:`oncofusion.ensemble.fold_checkpoints`), then ``booster.json``.

        Each file is replaced atomically; the manifest goes last, so a crash mid-save leaves either the
        previous manifest or a complete new model, never a manifest naming a half-written booster.
        """
        directory = Path(directory)
        for booster, k, best in zip(self.boosters, self.folds, self.best_iterations, strict=True):
            (directory / f"fold{k}").mkdir(parents=True, exist_ok=True)
            with atomic_output(directory / f"fold{k}" / BOOSTER_FILE) as staged:
                booster.save_model(str(staged), num_iteration=best)
        manifest = {"feature_names": self.feature_names, "feature_groups": self.feature_groups,
                    "params": self.params, "folds": self.folds, "best_iterations": self.best_iterations}
        atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
        logger.info("saved %d fold boosters to %s", len(self.boosters), directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BoosterEnsemble:
        """The ensemble :meth:`save` wrote to ``directory``, each fold read as the package's
        :class:`~oncofusion.ensemble.LightGBMMember` reads a booster file."""
        from oncofusion.ensemble import LightGBMMember, fold_checkpoints, fold_id

        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {directory}: run the bundle's train config first")
        manifest = json.loads(manifest_path.read_text())
        files = {fold_id(path): path for path in fold_checkpoints(directory, BOOSTER_FILE)}
        missing = [k for k in manifest["folds"] if k not in files]
        if missing:
            raise FileNotFoundError(f"{manifest_path} lists fold(s) {missing} but {directory} has no "
                                    f"fold<k>/{BOOSTER_FILE} for them: retrain")
        boosters = [LightGBMMember(files[k]).booster for k in manifest["folds"]]
        return cls(boosters, manifest["folds"], manifest["feature_names"], manifest["feature_groups"],
                   manifest["params"], manifest["best_iterations"])
