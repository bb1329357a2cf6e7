"""LIDC-IDRI semantics benchmark: how much of the readers' malignancy call do their semantic ratings carry?

Part (i), structured ratings: a standardised logistic regression on the eight non-malignancy ratings
(median over readers; mode for internal structure and calcification) predicts mean malignancy > 3
versus < 3 (nodules at exactly 3 are left out). Patient-level cross-validation (GroupKFold by LIDC
patient) keeps the nodules of one patient out of their own training folds. The spec measured an
AUROC of 0.904; a text model built from the same features should come close to this ceiling.

These are real reader annotations, not images: the number bounds what semantic text can tell about
the readers' malignancy score, not what a model can tell about cancer.

Usage::

    python -m bench.lidc_benchmark [--folds 5] [--seed 0] [--out bench/results/lidc.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from oncofusion.data.lidc import RATING_NAMES, LidcNodule, load_nodules

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lidc.json"


def rating_matrix(nodules: Sequence[LidcNodule]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (eight ratings), labels and patient groups of the nodules with a definite label."""
    labelled = [n for n in nodules if n.label is not None]
    x = np.array([[n.ratings[name] for name in RATING_NAMES] for n in labelled], dtype=float)
    y = np.array([n.label for n in labelled], dtype=int)
    groups = np.array([n.patient_id for n in labelled])
    return x, y, groups


def structured_rating_auroc(nodules: Sequence[LidcNodule], n_splits: int = 5, seed: int = 0) -> dict:
    """Patient-level cross-validated AUROC of a logistic regression on the eight ratings.

    Returns the per-fold AUROCs, their mean and standard deviation, and the AUROC of the pooled
    out-of-fold predictions, with the numbers of nodules, positives and patients used.
    """
    x, y, groups = rating_matrix(nodules)
    if len(np.unique(groups)) < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} patients, got {len(np.unique(groups))}")
    splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    oof = np.zeros(len(y))
    fold_auc = []
    for train, test in splitter.split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x[train], y[train])
        oof[test] = model.predict_proba(x[test])[:, 1]
        fold_auc.append(float(roc_auc_score(y[test], oof[test])))
    return {
        "model": "standardised logistic regression on eight LIDC ratings",
        "features": list(RATING_NAMES),
        "target": "mean reader malignancy > 3 vs < 3 (== 3 excluded)",
        "cv": f"GroupKFold by patient, {n_splits} folds, seed {seed}",
        "n_nodules": int(len(y)),
        "n_malignant": int(y.sum()),
        "n_patients": int(len(np.unique(groups))),
        "fold_auroc": fold_auc,
        "mean_auroc": float(np.mean(fold_auc)),
        "std_auroc": float(np.std(fold_auc)),
        "pooled_oof_auroc": float(roc_auc_score(y, oof)),
    }


def _write_result(path: Path, key: str, result: dict) -> None:
    """Store ``result`` under ``key`` in the JSON file, keeping the other benchmark parts there."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    """Run part (i) on the full LIDC database, print it and write it to the results JSON."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="LIDC semantic-rating malignancy benchmark")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    result = structured_rating_auroc(load_nodules(), n_splits=args.folds, seed=args.seed)
    print(
        f"structured ratings: {result['n_nodules']} nodules ({result['n_malignant']} malignant), "
        f"{result['n_patients']} patients; mean fold AUROC {result['mean_auroc']:.3f} "
        f"+- {result['std_auroc']:.3f}, pooled out-of-fold AUROC {result['pooled_oof_auroc']:.3f}"
    )
    _write_result(args.out, "structured_ratings", result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
