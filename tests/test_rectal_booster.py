"""Rectal ERUS stage 2: the LightGBM fold ensemble on image + text features, and its SHAP explanations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oncofusion.metrics.classification import auroc
from oncofusion.models.rectal_erus.booster import BoosterEnsemble
from oncofusion.models.rectal_erus.shap_explain import ShapExplanation, explain, summary_png, waterfall_png

N_IMAGE, N_TEXT, N_FOLDS = 8, 6, 5
NAMES = [f"image_{i}" for i in range(N_IMAGE)] + [f"text_{i}" for i in range(N_TEXT)]
GROUPS = ["image"] * N_IMAGE + ["text"] * N_TEXT
FAST = {"num_threads": 1}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic(signal: dict[int, float], n: int = 300, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Features (n, D) of noise, labels (30 % positive) from ``signal`` {column: weight}, 5 folds."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(NAMES)))
    score = sum(w * x[:, j] for j, w in signal.items()) + 0.5 * rng.normal(size=n)
    y = (score > np.quantile(score, 0.7)).astype(np.int64)
    folds = rng.permutation(np.arange(n) % N_FOLDS)
    return x, y, folds


def fit(x: np.ndarray, y: np.ndarray, folds: np.ndarray, **kwargs) -> BoosterEnsemble:
    kwargs.setdefault("params", FAST)
    return BoosterEnsemble.fit_folds(x, y, folds, NAMES, GROUPS, **kwargs)


@pytest.fixture(scope="module")
def mixed():
    """Signal in two image columns and one text column."""
    x, y, folds = synthetic({0: 1.5, 1: 1.0, N_IMAGE: 1.2})
    return x, y, folds, fit(x, y, folds)


@pytest.fixture(scope="module")
def image_only():
    x, y, folds = synthetic({0: 1.5, 1: 1.0, 2: 1.0}, seed=1)
    return x, y, folds, fit(x, y, folds)


def test_out_of_fold_auroc_finds_signal_and_not_noise(mixed):
    x, y, folds, ensemble = mixed
    assert ensemble.folds == list(range(N_FOLDS))
    assert auroc(y, ensemble.out_of_fold(x, folds)) > 0.8
    permuted = np.random.default_rng(5).permutation(y)
    assert auroc(permuted, fit(x, permuted, folds).out_of_fold(x, folds)) < 0.7


def test_scale_pos_weight_is_each_fold_negatives_over_positives_and_params_override(mixed):
    x, y, folds, ensemble = mixed
    for booster, k in zip(ensemble.boosters, ensemble.folds, strict=True):
        train = y[folds != k]
        # the model text keeps 6 significant digits
        assert float(booster.params["scale_pos_weight"]) == pytest.approx((train == 0).sum() / train.sum(), rel=1e-5)
    assert len({round(float(b.params["scale_pos_weight"]), 6) for b in ensemble.boosters}) > 1
    overridden = fit(x, y, folds, params={**FAST, "scale_pos_weight": 1.0}, train_folds=[0, 2])
    assert overridden.folds == [0, 2]
    assert [float(b.params["scale_pos_weight"]) for b in overridden.boosters] == [1.0, 1.0]
    assert overridden.params["num_leaves"] == 15 and overridden.params["scale_pos_weight"] == 1.0


def test_best_iterations_are_recorded_and_trees_trimmed(mixed):
    _, _, _, ensemble = mixed
    assert all(0 < b < 1000 for b in ensemble.best_iterations)
    assert [b.current_iteration() for b in ensemble.boosters] == ensemble.best_iterations


def test_member_outputs_shape_and_fold_choice(mixed):
    x, y, folds, ensemble = mixed
    out = ensemble.member_outputs(torch.as_tensor(x[:7]))
    assert out.shape == (N_FOLDS, 7, 2)
    assert torch.allclose(out.sum(-1), torch.ones(N_FOLDS, 7, dtype=out.dtype))
    oof = ensemble.out_of_fold(x, folds)
    for k in (1, 3):
        rows = folds == k
        picked = ensemble.member_outputs(x[rows], fold=k)
        assert picked.shape == (1, rows.sum(), 2)
        np.testing.assert_allclose(picked[0, :, 1].numpy(), oof[rows], atol=1e-12)
        held_out = ensemble.boosters[ensemble.folds.index(k)]
        np.testing.assert_allclose(oof[rows], held_out.predict(x[rows]), atol=1e-12)
    np.testing.assert_allclose(ensemble(x[:7])[:, 1].numpy(), out[:, :, 1].mean(0).numpy())


def test_member_outputs_rejects_unknown_fold_and_wrong_width(mixed):
    x, _, _, ensemble = mixed
    with pytest.raises(ValueError, match=r"no booster held out fold 9 \(have folds \[0, 1, 2, 3, 4\]\)"):
        ensemble.member_outputs(x[:2], fold=9)
    with pytest.raises(ValueError, match=f"features have {len(NAMES) - 1} columns but the boosters were "
                                         f"trained on {len(NAMES)}"):
        ensemble.member_outputs(x[:2, 1:])


def test_save_load_round_trip(mixed, tmp_path):
    x, _, _, ensemble = mixed
    ensemble.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["booster.json", *(f"fold{k}" for k in range(N_FOLDS))]
    # the package's fold layout: the generic fold ensemble reads the same files
    from oncofusion.ensemble import Ensemble, fold_checkpoints

    generic = Ensemble(checkpoints=fold_checkpoints(tmp_path / "model", "model.txt"), member="lightgbm")
    torch.testing.assert_close(generic(torch.as_tensor(x[:4])).double(), ensemble(x[:4]), atol=1e-6, rtol=1e-5)
    loaded = BoosterEnsemble.load(tmp_path / "model")
    assert (loaded.folds, loaded.feature_names, loaded.feature_groups, loaded.best_iterations) == (
        ensemble.folds, ensemble.feature_names, ensemble.feature_groups, ensemble.best_iterations)
    assert loaded.params == ensemble.params
    assert torch.equal(loaded.member_outputs(x), ensemble.member_outputs(x))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no booster.json in .*empty: run the bundle's train config"):
        BoosterEnsemble.load(empty)
    (tmp_path / "model" / "fold3" / "model.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists fold\(s\) \[3\] but .* has no fold<k>/model.txt"):
        BoosterEnsemble.load(tmp_path / "model")


def test_shap_is_additive_in_mean_member_log_odds(mixed):
    x, _, _, ensemble = mixed
    explanation = explain(ensemble, x[:20])
    assert explanation.values.shape == (20, len(NAMES))
    raw = np.mean([b.predict(x[:20], raw_score=True, num_iteration=best)
                   for b, best in zip(ensemble.boosters, ensemble.best_iterations, strict=True)], axis=0)
    np.testing.assert_allclose(explanation.base_value + explanation.values.sum(1), raw, atol=1e-6)
    one = explain(ensemble, x[:5], fold=2)
    np.testing.assert_allclose(one.base_value + one.values.sum(1),
                               ensemble.boosters[2].predict(x[:5], raw_score=True), atol=1e-6)


def test_group_sums_shares_and_top(mixed):
    x, _, _, ensemble = mixed
    explanation = explain(ensemble, x[:10])
    image = np.array(GROUPS) == "image"
    for row in (0, 7):
        by_group = explanation.by_group(row)
        assert by_group["image"] == pytest.approx(explanation.values[row, image].sum())
        assert by_group["text"] == pytest.approx(explanation.values[row, ~image].sum())
        assert sum(explanation.group_shares(row).values()) == pytest.approx(1.0)
        top = explanation.top(row, 3)
        assert [t["shap"] for t in top] == sorted((t["shap"] for t in top), key=abs, reverse=True)
        assert abs(top[-1]["shap"]) >= np.sort(np.abs(explanation.values[row]))[-3] - 1e-12
        assert top[0]["group"] == GROUPS[NAMES.index(top[0]["name"])]
        assert top[0]["value"] == x[row, NAMES.index(top[0]["name"])]


def test_image_share_dominates_when_only_image_carries_signal(image_only):
    x, _, _, ensemble = image_only
    explanation = explain(ensemble, x[:60])
    shares = [explanation.group_shares(row)["image"] for row in range(60)]
    assert np.median(shares) > 0.6
    assert explanation.overall_shares()["image"] > 0.6


def test_group_shares_are_zero_without_contribution():
    explanation = ShapExplanation(np.zeros((1, 2)), 0.0, ["a", "b"], ["image", "text"], np.zeros((1, 2)))
    assert explanation.group_shares(0) == {"image": 0.0, "text": 0.0}


def test_waterfall_and_summary_pngs(mixed, tmp_path):
    x, _, _, ensemble = mixed
    explanation = explain(ensemble, x[:30])
    for path in (waterfall_png(explanation, 0, tmp_path / "plots" / "waterfall.png", top=5, title="patient 0"),
                 summary_png(explanation, tmp_path / "summary.png", top=8)):
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1024
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["summary.png", "waterfall.png"]


@pytest.mark.parametrize(("change", "message"), [
    ("labels_not_binary", r"labels must be binary 0/1, got values \[0, 1, 2\]"),
    ("one_class_fold", r"fold 0's training rows .* hold only class 0"),
    ("names_length", r"feature_names has 13 names but features has 14 columns"),
    ("groups_length", r"feature_groups has 15 groups but features has 14 columns"),
    ("nan", r"features hold 1 NaN/inf value\(s\) \(first at row 3, column 2\)"),
    ("labels_length", r"labels has 39 entries but features has 40 rows"),
    ("folds_length", r"folds has 41 entries but features has 40 rows"),
])
def test_fit_errors_name_the_problem(change, message):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, len(NAMES))), np.arange(40) % 2
    folds, names, groups = np.arange(40) % 4, list(NAMES), list(GROUPS)
    if change == "labels_not_binary":
        y = np.arange(40) % 3
    elif change == "one_class_fold":
        y = (folds == 0).astype(int)
    elif change == "names_length":
        names = names[:-1]
    elif change == "groups_length":
        groups = [*groups, "text"]
    elif change == "nan":
        x[3, 2] = np.nan
    elif change == "labels_length":
        y = y[:-1]
    elif change == "folds_length":
        folds = np.arange(41) % 4
    with pytest.raises(ValueError, match=message):
        BoosterEnsemble.fit_folds(x, y, folds, names, groups, params=FAST)
