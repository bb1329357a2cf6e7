"""Classical classifiers on tabular features (e.g. radiomics), scored out of fold, as the papers' baselines.

The papers set their models against hand-crafted features classified by logistic regression, an SVM
and a random forest, sometimes on a class-balanced subset (the rectal ERUS paper: 100 + 100). Every
score here comes from a model that never saw the case: fitted on the other folds, with imputation
and scaling learnt on those folds too. :func:`baseline_predictions` returns the rows that
:func:`oncofusion.evaluation.comparison.align` reads (``score_key="score"``), so the baselines go into
the same DeLong comparison as the model they are compared with.

Scores are in [0, 1] with 0.5 at each classifier's own decision boundary: the positive-class
probability for logistic regression and the random forest; for the SVM (no Platt scaling: it would
need an inner cross-validation) the logistic of the decision function, which is monotone (AUROC is
unchanged) but not a calibrated probability.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

logger = logging.getLogger(__name__)

__all__ = ["BASELINE_MODELS", "balanced_subset", "baseline_predictions", "out_of_fold_scores"]


def _pipeline(classifier: Any) -> Pipeline:
    """Median imputation (non-finite features) and standardisation, both fitted on the training rows."""
    return Pipeline([("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
                     ("scale", StandardScaler()), ("classify", classifier)])


def logistic_regression(seed: int = 0) -> Pipeline:
    """L2-penalised logistic regression (C = 1), classes weighted to balance."""
    return _pipeline(LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, random_state=seed))


def svm(seed: int = 0) -> Pipeline:
    """RBF support vector machine (C = 1, gamma 'scale'), classes weighted to balance."""
    return _pipeline(SVC(kernel="rbf", C=1.0, gamma="scale", class_weight="balanced", random_state=seed))


def random_forest(seed: int = 0) -> Pipeline:
    """500 trees, classes weighted to balance, seeded, one thread (the CPUs are shared)."""
    return _pipeline(RandomForestClassifier(n_estimators=500, class_weight="balanced", random_state=seed,
                                            n_jobs=1))


BASELINE_MODELS: dict[str, Callable[[int], Any]] = {
    "logistic_regression": logistic_regression,
    "svm": svm,
    "random_forest": random_forest,
}
"""Name -> ``factory(seed)`` of an unfitted scikit-learn estimator."""


def _positive_score(model: Any, features: np.ndarray) -> np.ndarray:
    """Probability of class 1, or the logistic of the decision function where there is no probability."""
    if hasattr(model, "predict_proba"):
        column = list(model.classes_).index(1)
        return model.predict_proba(features)[:, column]
    return expit(model.decision_function(features))


def _check_table(features: np.ndarray, labels: np.ndarray, folds: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (N, F) with non-finite values as NaN, 0/1 labels (N,), folds (N,)."""
    features = np.asarray(features, dtype=np.float64)
    labels, folds = np.asarray(labels).ravel(), np.asarray(folds).ravel()
    if features.ndim != 2:
        raise ValueError(f"features must be (N, F); got shape {features.shape}")
    if not len(features) == labels.size == folds.size:
        raise ValueError(f"{len(features)} feature rows, {labels.size} labels and {folds.size} folds: "
                         "one of each per case")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    return np.where(np.isfinite(features), features, np.nan), labels.astype(int), folds


def out_of_fold_scores(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, model_name: str,
                       seed: int = 0) -> np.ndarray:
    """Each row's score (N,) from ``BASELINE_MODELS[model_name]`` fitted on the rows of the other folds."""
    if model_name not in BASELINE_MODELS:
        raise ValueError(f"unknown baseline model '{model_name}'; choose one of {sorted(BASELINE_MODELS)}")
    features, labels, folds = _check_table(features, labels, folds)
    fold_values = np.unique(folds)
    if fold_values.size < 2:
        raise ValueError(f"out-of-fold scores need at least 2 folds; got {fold_values.tolist()}")
    scores = np.full(labels.size, np.nan)
    for fold in fold_values:
        held_out = folds == fold
        if np.unique(labels[~held_out]).size < 2:
            raise ValueError(f"the training rows for fold {fold} hold one class only; re-draw the folds "
                             "stratified by label")
        model = BASELINE_MODELS[model_name](seed).fit(features[~held_out], labels[~held_out])
        scores[held_out] = _positive_score(model, features[held_out])
    return scores


def balanced_subset(labels: np.ndarray, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted row indices with as many 0s as 1s, as the paper's balanced (100 + 100) experiment.

    Default: every case of the minority class and a seeded random draw of as many from the majority.
    With ``per_class``: a seeded draw of that many from each class (an error if a class has fewer).
    """
    labels = np.asarray(labels).ravel()
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    rows = {label: np.flatnonzero(labels == label) for label in (0, 1)}
    available = min(r.size for r in rows.values())
    wanted = available if per_class is None else int(per_class)
    if wanted < 1 or wanted > available:
        counts = ", ".join(f"class {label}: {r.size}" for label, r in rows.items())
        raise ValueError(f"a balanced subset of {wanted} per class needs that many of each class, and there "
                         f"are {counts}; lower per_class")
    rng = np.random.default_rng(seed)
    drawn = [rng.choice(rows[label], size=wanted, replace=False) for label in (0, 1)]
    return np.sort(np.concatenate(drawn))


def baseline_predictions(case_ids: Sequence[Any], features: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                         models: Sequence[str] = ("logistic_regression", "svm", "random_forest"), seed: int = 0
                         ) -> dict[str, list[dict[str, Any]]]:
    """``{model: [{"case_id", "label", "score"}, ...]}`` of out-of-fold scores, as ``comparison.align`` reads."""
    ids = [str(c) for c in case_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique: a repeated id would be merged when predictions are aligned")
    features, labels, folds = _check_table(features, labels, folds)
    if len(ids) != labels.size:
        raise ValueError(f"{len(ids)} case ids but {labels.size} labels")
    predictions = {}
    for name in models:
        scores = out_of_fold_scores(features, labels, folds, name, seed)
        predictions[name] = [{"case_id": c, "label": int(y), "score": float(s)}
                             for c, y, s in zip(ids, labels, scores, strict=True)]
        logger.info("baseline %s scored %d cases out of fold", name, len(ids))
    return predictions
