"""Metrics equal scikit-learn's; the contrastive loss is symmetric and smallest on matched pairs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from oncofusion.losses.contrastive import (
    ContrastiveClassificationLoss,
    ContrastiveOutput,
    clip_contrastive_loss,
)
from oncofusion.metrics.classification import auprc, auroc, bootstrap, calibration_curve, roc_curve


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_auprc_equal_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auprc(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    fpr, tpr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_single_class_gives_nan_and_mismatch_is_an_error():
    assert np.isnan(auroc(np.zeros(5), np.arange(5)))
    with pytest.raises(ValueError, match="5 labels but 4 scores"):
        auroc(np.zeros(5), np.arange(4))


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small_labels = rng.integers(0, 2, 60)
    large_labels = rng.integers(0, 2, 2000)
    small = bootstrap(auroc, small_labels, rng.normal(small_labels, 1.0), num_samples=300)
    large = bootstrap(auroc, large_labels, rng.normal(large_labels, 1.0), num_samples=300)
    assert small.low <= small.value <= small.high
    assert (large.high - large.low) < (small.high - small.low)


def test_calibration_curve_of_a_calibrated_predictor_lies_near_the_diagonal():
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(size=20000)
    labels = (rng.uniform(size=20000) < probabilities).astype(int)
    curve = calibration_curve(labels, probabilities, num_bins=5)
    np.testing.assert_allclose(curve["observed"], curve["predicted"], atol=0.03)
    assert sum(curve["count"]) == 20000


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_contrastive_loss_is_symmetric_in_images_and_texts():
    torch.manual_seed(0)
    images, texts = _unit(torch.randn(6, 16)), _unit(torch.randn(6, 16))
    forward = clip_contrastive_loss(images, texts, 10.0)
    swapped = clip_contrastive_loss(texts, images, 10.0)
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-6)


def test_contrastive_loss_is_minimal_on_matched_pairs():
    torch.manual_seed(0)
    embeddings = _unit(torch.randn(8, 32))
    matched = clip_contrastive_loss(embeddings, embeddings, 50.0)
    for _ in range(5):
        shuffled = embeddings[torch.randperm(8)]
        if torch.equal(shuffled, embeddings):
            continue
        assert clip_contrastive_loss(embeddings, shuffled, 50.0) > matched
    assert clip_contrastive_loss(embeddings, _unit(torch.randn(8, 32)), 50.0) > matched


def test_combined_loss_adds_both_heads_cross_entropy():
    torch.manual_seed(0)
    output = ContrastiveOutput(
        image_embedding=_unit(torch.randn(4, 8)), text_embedding=_unit(torch.randn(4, 8)),
        image_logits=torch.randn(4, 2), text_logits=torch.randn(4, 2), logit_scale=torch.tensor(14.3),
        attention=torch.full((4, 9), 1 / 9),
    )
    labels = torch.tensor([0, 1, 1, 0])
    total = ContrastiveClassificationLoss()(output, labels)
    expected = clip_contrastive_loss(output.image_embedding, output.text_embedding, 14.3) + (
        F.cross_entropy(output.image_logits, labels) + F.cross_entropy(output.text_logits, labels)
    ) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
