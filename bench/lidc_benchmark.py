"""LIDC-IDRI semantics benchmark: how much of the readers' malignancy call do their semantic ratings carry?

Part (i), structured ratings: a standardised logistic regression on the eight non-malignancy ratings
(median over readers; mode for internal structure and calcification) predicts mean malignancy > 3
versus < 3 (nodules at exactly 3 are left out). Patient-level cross-validation (GroupKFold by LIDC
patient) keeps the nodules of one patient out of their own training folds. The spec measured an
AUROC of 0.904; a text model built from the same features should come close to this ceiling.

Part (ii), the bundle's text path: each nodule's ratings become semantic features and an impression
sentence (``oncofusion.models.lung_nodule.reports``, as in training), which the bundle's text tower (the packaged
all-MiniLM-L6-v2) embeds; the bundle's projection head and text head are trained on the same folds.
The encoder is kept frozen here (the bundle adapts it with LoRA), so that the benchmark runs in about
a minute on a CPU. The text sees only the binarised features, so it can lose information the raw
ratings hold.

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

from oncofusion.models.lung_nodule.lidc import RATING_NAMES, LidcNodule, load_nodules

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
    return {
        "model": "standardised logistic regression on eight LIDC ratings",
        "features": list(RATING_NAMES),
        **_cross_validated_logistic(x, y, groups, n_splits, seed),
    }


def _cross_validated_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> dict:
    """Patient-level K-fold AUROCs of a standardised logistic regression."""
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


def semantic_feature_auroc(nodules: Sequence[LidcNodule], n_splits: int = 5, seed: int = 0) -> dict:
    """The same logistic regression on the one-hot semantic features the report text is built from.

    This is the information ceiling of the text path: the sentences carry these features and nothing
    finer (no subtlety, no rating steps within an option).
    """
    from oncofusion.models.lung_nodule.reports import SEMANTIC_OPTIONS, semantic_features

    _, y, groups = rating_matrix(nodules)
    labelled = [n for n in nodules if n.label is not None]
    x = np.array([[semantic_features(n.ratings)[feature] == option for feature, options in SEMANTIC_OPTIONS.items()
                   for option in options] for n in labelled], dtype=float)
    return _cross_validated_logistic(x, y, groups, n_splits, seed)


def impressions(nodules: Sequence[LidcNodule], seed: int = 0) -> list[str]:
    """The impression sentence of every labelled nodule, built as the training data builds it."""
    from oncofusion.models.lung_nodule.reports import build_report, semantic_features

    labelled = [n for n in nodules if n.label is not None]
    return [
        build_report(semantic_features(n.ratings), np.random.default_rng([seed, i]))["impression"]
        for i, n in enumerate(labelled)
    ]


def embed_sentences(sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Frozen text-tower embeddings (N, 384) of the bundle's default text encoder."""
    import torch

    from oncofusion.networks.towers import HFTextTower, packaged_minilm_path

    tower = HFTextTower(packaged_minilm_path(), tuning="frozen").eval()
    with torch.no_grad():
        chunks = [tower(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]
    return torch.cat(chunks).numpy()


def _train_text_head(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 300):
    """The bundle's text projection head + text head on fixed embeddings; returns a scoring function."""
    import torch
    import torch.nn.functional as F

    from oncofusion.networks.blocks import ProjectionHead

    torch.manual_seed(seed)
    projection, head = ProjectionHead(x.shape[1], 256, 0.1), torch.nn.Linear(256, 2)
    parameters = [*projection.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.1)
    inputs, targets = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    weights = torch.tensor([len(y) / (2 * max((y == c).sum(), 1)) for c in (0, 1)], dtype=torch.float)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(F.normalize(projection(inputs), dim=-1)), targets, weight=weights)
        loss.backward()
        optimizer.step()
    projection.eval(), head.eval()

    def score(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = head(F.normalize(projection(torch.from_numpy(features).float()), dim=-1))
        return torch.softmax(logits, dim=-1)[:, 1].numpy()

    return score


def text_path_auroc(nodules: Sequence[LidcNodule], n_splits: int = 5, seed: int = 0) -> dict:
    """Patient-level cross-validated AUROC of impression sentence -> text tower -> text head."""
    _, y, groups = rating_matrix(nodules)
    sentences = impressions(nodules, seed)
    x = embed_sentences(sentences)
    splitter = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    oof = np.zeros(len(y))
    fold_auc = []
    for train, test in splitter.split(x, y, groups):
        oof[test] = _train_text_head(x[train], y[train], seed)(x[test])
        fold_auc.append(float(roc_auc_score(y[test], oof[test])))
    return {
        "model": "impression sentence -> all-MiniLM-L6-v2 (frozen) -> projection head -> text head",
        "example_sentence": sentences[0],
        "target": "mean reader malignancy > 3 vs < 3 (== 3 excluded)",
        "cv": f"GroupKFold by patient, {n_splits} folds, seed {seed}",
        "n_nodules": int(len(y)),
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
    """Run both parts on the full LIDC database, print them side by side and write the results JSON."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="LIDC semantic-rating malignancy benchmark")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    nodules = load_nodules()
    result = structured_rating_auroc(nodules, n_splits=args.folds, seed=args.seed)
    semantic = semantic_feature_auroc(nodules, n_splits=args.folds, seed=args.seed)
    text = text_path_auroc(nodules, n_splits=args.folds, seed=args.seed)
    print(f"LIDC-IDRI: {result['n_nodules']} nodules ({result['n_malignant']} malignant), "
          f"{result['n_patients']} patients, {result['cv']}")
    print(f"{'path':44s} {'mean fold AUROC':>16s} {'pooled OOF AUROC':>17s}")
    rows = (("(i) logistic regression on 8 ratings", result), ("(ii) bundle text path", text),
            ("ceiling of (ii): regression on text features", semantic))
    for name, part in rows:
        print(f"{name:44s} {part['mean_auroc']:10.3f} +- {part['std_auroc']:.3f} {part['pooled_oof_auroc']:17.3f}")
    _write_result(args.out, "structured_ratings", result)
    _write_result(args.out, "text_path", text)
    _write_result(args.out, "semantic_features", semantic)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
