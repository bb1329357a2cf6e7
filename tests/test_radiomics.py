"""Radiomics features against analytic values, and the classical baselines scored out of fold.

The texture checks are small images whose matrices can be counted by hand; a wrong direction, a
wrong connectivity or a matrix that reads pixels outside the ROI changes one of them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage, stats
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier

from oncofusion.evaluation.baselines import (
    BASELINE_MODELS,
    balanced_subset,
    baseline_predictions,
    out_of_fold_scores,
    random_forest,
)
from oncofusion.evaluation.comparison import align
from oncofusion.features.radiomics import MAX_GRAY_LEVELS, feature_matrix, feature_names, radiomics_features
from oncofusion.metrics.classification import auroc

QUARTER_TURNS = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def _disc(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    cy, cx = centre if centre else ((size - 1) / 2, (size - 1) / 2)
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2


def _ellipse(size: int, row_semi_axis: float, col_semi_axis: float, angle: float = 0.0) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size] - (size - 1) / 2
    u = rows * np.cos(angle) + cols * np.sin(angle)
    v = -rows * np.sin(angle) + cols * np.cos(angle)
    return (u / row_semi_axis) ** 2 + (v / col_semi_axis) ** 2 <= 1


def _blob(size: int = 64, seed: int = 0) -> np.ndarray:
    """An irregular ROI: a thresholded smooth random field inside a disc, with its largest component."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 4)
    labelled, _ = ndimage.label((field > np.percentile(field, 40)) & _disc(size, size / 2 - 4))
    return labelled == np.argmax(np.bincount(labelled.ravel())[1:]) + 1


def _one_angle(image, mask, angle, **kwargs):
    return radiomics_features(image, mask, angles=(angle,), **kwargs)


# ---------------------------------------------------------------------------------------------- names


def test_features_come_in_the_named_order_and_are_finite():
    image = np.random.default_rng(0).normal(100, 20, (64, 64))
    features = radiomics_features(image, _blob())
    assert list(features) == feature_names()
    assert len(features) == 61 and len(set(features)) == 61
    assert {n.split("_")[0] for n in features} == {"firstorder", "shape2D", "glcm", "glrlm", "glszm"}
    assert all(np.isfinite(v) for v in features.values())


def test_a_100x100_roi_takes_well_under_half_a_second():
    image = np.random.default_rng(0).normal(128, 40, (120, 120))
    mask = np.zeros(image.shape, bool)
    mask[10:110, 10:110] = True
    radiomics_features(image, mask)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        radiomics_features(image, mask)
        timings.append(time.perf_counter() - start)
    assert np.median(timings) < 0.5


# ---------------------------------------------------------------------------------------------- first order


def test_first_order_equals_numpy_and_scipy_on_a_random_roi():
    image = np.random.default_rng(1).gamma(3.0, 20.0, (64, 64))
    mask = _blob(seed=1)
    x = image[mask]
    f = radiomics_features(image, mask, spacing=(0.5, 2.0))
    p10, p25, p75, p90 = np.percentile(x, (10, 25, 75, 90))
    robust = x[(x >= p10) & (x <= p90)]
    expected = {
        "Mean": x.mean(), "Median": np.median(x), "StandardDeviation": x.std(), "Variance": x.var(),
        "Minimum": x.min(), "Maximum": x.max(), "10Percentile": p10, "90Percentile": p90,
        "InterquartileRange": p75 - p25, "Range": np.ptp(x), "MeanAbsoluteDeviation": np.abs(x - x.mean()).mean(),
        "RobustMeanAbsoluteDeviation": np.abs(robust - robust.mean()).mean(),
        "RootMeanSquared": np.sqrt((x ** 2).mean()), "Energy": (x ** 2).sum(), "TotalEnergy": (x ** 2).sum() * 1.0,
        "Skewness": stats.skew(x), "Kurtosis": stats.kurtosis(x, fisher=False),
    }
    for name, value in expected.items():
        assert f[f"firstorder_{name}"] == pytest.approx(value, rel=1e-9), name
    assert f["firstorder_Skewness"] > 0.5  # a gamma(3) sample: the check is not of a symmetric case


def test_entropy_and_uniformity_of_a_constant_roi_are_0_and_1():
    f = radiomics_features(np.full((20, 20), 42.0), _disc(20, 8))
    assert f["firstorder_Entropy"] == 0.0
    assert f["firstorder_Uniformity"] == 1.0
    assert f["firstorder_Skewness"] == 0.0 and f["firstorder_Kurtosis"] == 0.0
    assert f["glcm_Contrast"] == 0.0 and f["glcm_JointEnergy"] == 1.0 and f["glcm_Correlation"] == 1.0
    assert f["glszm_ZonePercentage"] == pytest.approx(1 / _disc(20, 8).sum())


def test_bins_are_anchored_at_a_multiple_of_the_bin_width_below_the_minimum():
    """pyradiomics' fixed bin width: 7 and 9 fall in bins [0, 8) and [8, 16), 9 and 15 share one."""
    mask = np.ones((2, 2), bool)
    split = radiomics_features(np.array([[7.0, 7.0], [9.0, 9.0]]), mask, bin_width=8)
    assert split["firstorder_Entropy"] == pytest.approx(1.0)
    assert split["firstorder_Uniformity"] == pytest.approx(0.5)
    shared = radiomics_features(np.array([[9.0, 9.0], [15.0, 15.0]]), mask, bin_width=8)
    assert shared["firstorder_Entropy"] == 0.0


# ---------------------------------------------------------------------------------------------- shape


def test_a_disc_has_its_area_diameter_and_near_circular_shape():
    radius, spacing = 20, (0.5, 0.5)
    f = radiomics_features(np.ones((60, 60)), _disc(60, radius), spacing=spacing)
    area = np.pi * (0.5 * radius) ** 2
    assert f["shape2D_PixelSurface"] == pytest.approx(area, rel=0.03)
    assert f["shape2D_MeshSurface"] == pytest.approx(area, rel=0.03)
    assert f["shape2D_Perimeter"] == pytest.approx(2 * np.pi * 0.5 * radius, rel=0.10)  # marching squares: +7 %
    assert f["shape2D_MajorAxisLength"] == pytest.approx(2 * 0.5 * radius, rel=0.03)
    assert f["shape2D_MaximumDiameter"] == pytest.approx(2 * 0.5 * radius, rel=0.05)
    assert f["shape2D_Elongation"] == pytest.approx(1.0, abs=0.02)
    assert f["shape2D_Sphericity"] > 0.9
    square = radiomics_features(np.ones((60, 60)), np.pad(np.ones((36, 36), bool), 12), spacing=spacing)
    assert f["shape2D_Sphericity"] > square["shape2D_Sphericity"] + 0.03
    assert f["shape2D_SphericalDisproportion"] == pytest.approx(1 / f["shape2D_Sphericity"])
    assert f["shape2D_PerimeterSurfaceRatio"] == pytest.approx(f["shape2D_Perimeter"] / f["shape2D_MeshSurface"])


@pytest.mark.parametrize("angle", [0.0, np.pi / 6, np.pi / 4])
def test_a_two_to_one_ellipse_has_elongation_one_half_at_any_orientation(angle):
    f = radiomics_features(np.ones((90, 90)), _ellipse(90, 30, 15, angle), spacing=(0.5, 0.5))
    assert f["shape2D_Elongation"] == pytest.approx(0.5, abs=0.02)
    assert f["shape2D_MajorAxisLength"] == pytest.approx(30.0, rel=0.03)
    assert f["shape2D_MinorAxisLength"] == pytest.approx(15.0, rel=0.03)
    assert f["shape2D_MaximumDiameter"] == pytest.approx(30.0, rel=0.05)


def test_spacing_is_row_then_column():
    """A 2:1 ellipse, long along the rows, becomes a circle in mm when columns are twice as wide."""
    mask = _ellipse(90, 30, 15)
    right = radiomics_features(np.ones((90, 90)), mask, spacing=(1.0, 2.0))
    swapped = radiomics_features(np.ones((90, 90)), mask, spacing=(2.0, 1.0))
    assert right["shape2D_Elongation"] == pytest.approx(1.0, abs=0.03)
    assert swapped["shape2D_Elongation"] == pytest.approx(0.25, abs=0.02)
    assert right["shape2D_PixelSurface"] == pytest.approx(2.0 * mask.sum())


def test_the_mesh_of_a_2x2_square_is_the_marching_squares_octagon():
    """The boundary runs through edge midpoints: a 2 x 2 square less four corner triangles of 1/8."""
    f = radiomics_features(np.arange(4.0).reshape(2, 2), np.ones((2, 2), bool), spacing=(2.0, 2.0))
    assert f["shape2D_PixelSurface"] == pytest.approx(4 * 4.0)
    assert f["shape2D_MeshSurface"] == pytest.approx(3.5 * 4.0)
    assert f["shape2D_Perimeter"] == pytest.approx((4 + 2 * np.sqrt(2)) * 2.0)
    assert f["shape2D_MaximumDiameter"] == pytest.approx(np.hypot(2, 1) * 2.0)


def test_a_hole_subtracts_from_the_area_and_adds_to_the_perimeter():
    ring = _disc(60, 20) & ~_disc(60, 10)
    f = radiomics_features(np.ones((60, 60)), ring)
    assert f["shape2D_MeshSurface"] == pytest.approx(ring.sum(), rel=0.03)
    assert f["shape2D_Perimeter"] == pytest.approx(2 * np.pi * (20 + 10), rel=0.10)


# ---------------------------------------------------------------------------------------------- GLCM


def test_glcm_of_horizontal_stripes_has_contrast_only_across_them():
    """Rows alternate 0 and 10 (levels 1 and 11): neighbours along a row agree, across rows differ by 10."""
    image = np.tile([[0.0], [10.0]], (4, 8))
    mask = np.ones(image.shape, bool)
    assert _one_angle(image, mask, 0.0, bin_width=1)["glcm_Contrast"] == 0.0
    assert _one_angle(image, mask, np.pi / 2, bin_width=1)["glcm_Contrast"] == pytest.approx(100.0)
    assert _one_angle(image, mask, np.pi / 4, bin_width=1)["glcm_Contrast"] == pytest.approx(100.0)
    assert _one_angle(image, mask, np.pi / 2, bin_width=1)["glcm_DifferenceAverage"] == pytest.approx(10.0)
    across = _one_angle(image, mask, np.pi / 2, bin_width=1)
    assert across["glcm_Correlation"] == pytest.approx(-1.0)
    assert (across["glcm_Id"], across["glcm_Idm"]) == (pytest.approx(1 / 11), pytest.approx(1 / 101))
    assert across["glcm_InverseVariance"] == pytest.approx(1 / 100)


def test_glcm_of_a_checkerboard_against_a_constant():
    checker = 50.0 * (np.indices((10, 10)).sum(axis=0) % 2)
    mask = np.ones(checker.shape, bool)
    levels_apart = 50 / 5
    assert _one_angle(checker, mask, 0.0, bin_width=5)["glcm_Contrast"] == pytest.approx(levels_apart ** 2)
    assert _one_angle(checker, mask, np.pi / 4, bin_width=5)["glcm_Contrast"] == 0.0
    assert radiomics_features(np.full((10, 10), 50.0), mask, bin_width=5)["glcm_Contrast"] == 0.0
    assert _one_angle(checker, mask, 0.0, bin_width=5)["glrlm_ShortRunEmphasis"] == 1.0
    assert _one_angle(checker, mask, 0.0, bin_width=5)["glrlm_RunPercentage"] == 1.0


def test_glcm_equals_scikit_image_graycoprops_on_a_full_rectangle():
    """With every level present and no pixel outside, the ROI restriction is moot: skimage is the reference."""
    from skimage.feature import graycomatrix, graycoprops

    image = np.random.default_rng(8).integers(0, 16, (30, 30))
    ours = radiomics_features(image.astype(float), np.ones(image.shape, bool), bin_width=1)
    matrix = graycomatrix(image.astype(np.uint8), [1], QUARTER_TURNS, levels=16, symmetric=True, normed=True)
    for name, prop in [("Contrast", "contrast"), ("DifferenceAverage", "dissimilarity"), ("Idm", "homogeneity"),
                       ("JointEnergy", "ASM"), ("Correlation", "correlation")]:
        assert ours[f"glcm_{name}"] == pytest.approx(graycoprops(matrix, prop).mean(), rel=1e-9), name


HAND = np.array([[0.0, 0.0, 1.0],
                 [0.0, 1.0, 1.0],
                 [2.0, 2.0, 2.0]])  # levels 1, 2, 3 at bin width 1


def test_glcm_of_a_hand_counted_3x3_image():
    """Horizontal pairs (1,1) (1,2) / (1,2) (2,2) / (3,3) (3,3), symmetric: 12 entries, 4 off by one."""
    f = _one_angle(HAND, np.ones((3, 3), bool), 0.0, bin_width=1)
    assert f["glcm_Contrast"] == pytest.approx(4 / 12)
    assert f["glcm_DifferenceAverage"] == pytest.approx(4 / 12)
    assert f["glcm_JointEnergy"] == pytest.approx(4 * (2 / 12) ** 2 + (4 / 12) ** 2)
    assert f["glcm_MaximumProbability"] == pytest.approx(4 / 12)
    assert f["glcm_InverseVariance"] == pytest.approx(4 / 12)
    assert f["glcm_Id"] == pytest.approx(8 / 12 + 4 / 12 / 2)
    assert f["glcm_JointAverage"] == pytest.approx((2 * 1 + 2 * 1.5 + 2 * 1.5 + 2 * 2 + 4 * 3) / 12)


@pytest.mark.parametrize(("angle", "lengths"), [
    (0.0, [2, 1, 1, 2, 3]),                   # along rows
    (np.pi / 2, [2, 1, 1, 1, 1, 2, 1]),       # along columns
    (np.pi / 4, [1] * 9),                     # (r, c) -> (r + 1, c + 1)
    (3 * np.pi / 4, [2, 2, 1, 1, 1, 1, 1]),   # (r, c) -> (r + 1, c - 1)
])
def test_glrlm_of_a_hand_counted_3x3_image(angle, lengths):
    f = _one_angle(HAND, np.ones((3, 3), bool), angle, bin_width=1)
    lengths = np.asarray(lengths, dtype=float)
    assert f["glrlm_ShortRunEmphasis"] == pytest.approx(np.mean(1 / lengths ** 2))
    assert f["glrlm_LongRunEmphasis"] == pytest.approx(np.mean(lengths ** 2))
    assert f["glrlm_RunPercentage"] == pytest.approx(lengths.size / 9)


def test_glszm_of_the_hand_counted_image_has_three_8_connected_zones_of_three():
    f = radiomics_features(HAND, np.ones((3, 3), bool), bin_width=1)
    assert f["glszm_ZonePercentage"] == pytest.approx(3 / 9)  # 4-connected, level 2 would split in two
    assert f["glszm_SmallAreaEmphasis"] == pytest.approx(1 / 9)
    assert f["glszm_ZoneEntropy"] == pytest.approx(np.log2(3))
    assert f["glszm_GrayLevelNonUniformity"] == pytest.approx(1.0)


def test_glszm_of_k_equal_isolated_zones():
    mask = np.zeros((20, 20), bool)
    for r, c in [(1, 1), (1, 12), (12, 1), (12, 12)]:
        mask[r:r + 3, c:c + 3] = True
    image = np.where(mask, 50.0, 0.0)
    f = radiomics_features(image, mask)
    assert f["glszm_SmallAreaEmphasis"] == pytest.approx(1 / 81)
    assert f["glszm_LargeAreaEmphasis"] == pytest.approx(81)
    assert f["glszm_ZonePercentage"] == pytest.approx(4 / 36)
    assert f["glszm_SizeZoneNonUniformity"] == pytest.approx(4)
    assert f["glszm_GrayLevelNonUniformity"] == pytest.approx(4)
    assert f["glszm_ZoneEntropy"] == 0.0
    corner = mask.copy()
    corner[4:7, 4:7] = True  # touches the first square at one corner only: one 8-connected zone
    assert radiomics_features(np.where(corner, 50.0, 0.0), corner)["glszm_ZonePercentage"] == pytest.approx(4 / 45)


def test_pixels_outside_the_mask_change_no_feature():
    rng = np.random.default_rng(3)
    image = rng.normal(100, 25, (64, 64))
    mask = _blob(seed=3)
    reference = radiomics_features(image, mask)
    for outside in (rng.normal(100, 25, image.shape), np.full(image.shape, -1e4), np.full(image.shape, np.nan),
                    np.full(image.shape, 100.0)):
        changed = radiomics_features(np.where(mask, image, outside), mask)
        for name, value in reference.items():
            assert changed[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_coarse_and_fine_texture_separate_on_contrast_and_run_length():
    noise = np.random.default_rng(4).normal(size=(64, 64))
    mask = _disc(64, 28)

    def scaled(x):
        return 255 * (x - x[mask].min()) / np.ptp(x[mask])

    fine = radiomics_features(scaled(noise), mask, bin_width=16)
    coarse = radiomics_features(scaled(ndimage.gaussian_filter(noise, 3)), mask, bin_width=16)
    assert fine["glcm_Contrast"] > 5 * coarse["glcm_Contrast"]
    assert coarse["glrlm_LongRunEmphasis"] > 2 * fine["glrlm_LongRunEmphasis"]
    assert coarse["glszm_LargeAreaEmphasis"] > fine["glszm_LargeAreaEmphasis"]


def test_an_roi_without_pixel_pairs_at_the_offset_has_nan_glcm_but_other_features():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[4, 4] = True
    f = radiomics_features(np.arange(25.0).reshape(5, 5), mask)
    assert np.isnan(f["glcm_Contrast"])
    assert f["glrlm_ShortRunEmphasis"] == 1.0 and f["glszm_ZonePercentage"] == 1.0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("image", "mask", "kwargs", "message"), [
    (np.ones((8, 8)), np.zeros((8, 8), bool), {}, "ROI mask is empty"),
    (np.ones((8, 8)), np.pad(np.ones((1, 1), bool), ((3, 4), (3, 4))), {}, "single pixel"),
    (np.ones((8, 8)), np.ones((8, 7), bool), {}, r"mask shape \(8, 7\) differs from image shape \(8, 8\)"),
    (np.ones((8, 8, 2)), np.ones((8, 8, 2), bool), {}, "image must be 2D"),
    (np.ones((8, 8)), np.full((8, 8), 2), {}, "mask must be binary"),
    (np.ones((8, 8)), np.ones((8, 8), bool), {"spacing": (1.0, 0.0)}, "spacing must be two positive"),
    (np.ones((8, 8)), np.ones((8, 8), bool), {"bin_width": 0}, "bin_width must be a positive"),
    (np.ones((8, 8)), np.ones((8, 8), bool), {"distances": (0,)}, "distances must be positive"),
    (np.arange(1024.0).reshape(32, 32), np.ones((32, 32), bool), {"bin_width": 1},
     f"1024 grey levels .*at most {MAX_GRAY_LEVELS}.*raise bin_width"),
])
def test_bad_inputs_are_refused_with_the_fix(image, mask, kwargs, message):
    with pytest.raises(ValueError, match=message):
        radiomics_features(image, mask, **kwargs)


def test_non_finite_values_inside_the_roi_are_refused():
    image = np.ones((8, 8))
    image[3, 3], image[0, 0] = np.nan, np.inf
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    with pytest.raises(ValueError, match="1 non-finite values .* inside the ROI"):
        radiomics_features(image, mask)
    mask[3, 3] = False
    assert np.isfinite(radiomics_features(image, mask)["firstorder_Mean"])


# ---------------------------------------------------------------------------------------------- matrix


def test_feature_matrix_stacks_cases_and_names_the_case_that_fails():
    rng = np.random.default_rng(5)
    images = [rng.normal(100, 20, (32, 32)) for _ in range(3)]
    masks = [_disc(32, 6 + 3 * k) for k in range(3)]
    spacings = [(1.0, 1.0), (0.5, 0.5), (0.8, 1.2)]
    matrix, names = feature_matrix(images, masks, spacings, bin_width=4)
    assert matrix.shape == (3, len(feature_names())) and names == feature_names()
    np.testing.assert_array_equal(matrix[2], list(radiomics_features(images[2], masks[2], spacings[2],
                                                                     bin_width=4).values()))
    parallel, _ = feature_matrix(images, masks, spacings, workers=2, bin_width=4)
    np.testing.assert_array_equal(parallel, matrix)
    with pytest.raises(ValueError, match="case 1: ROI mask is empty"):
        feature_matrix(images[:2], [masks[0], np.zeros((32, 32), bool)])
    with pytest.raises(ValueError, match="3 images but 2 masks"):
        feature_matrix(images, masks[:2])


# ---------------------------------------------------------------------------------------------- baselines


def _planted(num_cases: int = 120, num_features: int = 12, seed: int = 0):
    """Balanced labels, 5 stratified folds, 3 informative features among noise (one non-finite cell)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_cases) % 2)
    folds = np.empty(num_cases, int)
    for label in (0, 1):
        rows = np.flatnonzero(labels == label)
        folds[rows] = rng.permutation(np.arange(rows.size) % 5)
    features = rng.normal(size=(num_cases, num_features))
    features[:, :3] += 1.5 * labels[:, None]
    features[7, 5], features[9, 6] = np.nan, np.inf
    return features, labels, folds


def test_baseline_models_are_configured_as_in_the_papers():
    logistic, svc, forest = (BASELINE_MODELS[n](7).named_steps["classify"]
                             for n in ("logistic_regression", "svm", "random_forest"))
    assert (logistic.C, logistic.class_weight, logistic.max_iter, logistic.l1_ratio in (None, 0, 0.0)) == (
        1.0, "balanced", 5000, True)
    assert (svc.kernel, svc.class_weight) == ("rbf", "balanced")
    assert (forest.n_estimators, forest.class_weight, forest.random_state, forest.n_jobs) == (500, "balanced", 7, 1)
    assert [name for name, _ in BASELINE_MODELS["svm"](0).steps] == ["impute", "scale", "classify"]


@pytest.mark.parametrize("model", ["logistic_regression", "svm", "random_forest"])
def test_each_baseline_finds_a_planted_signal_and_not_a_permuted_one(model, monkeypatch):
    # 50 trees instead of 500 keeps the test fast on shared CPUs; everything else is the registered model
    monkeypatch.setitem(BASELINE_MODELS, "random_forest",
                        lambda seed: random_forest(seed).set_params(classify__n_estimators=50))
    features, labels, folds = _planted()
    scores = out_of_fold_scores(features, labels, folds, model)
    assert scores.shape == labels.shape and np.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert auroc(labels, scores) > 0.8
    permuted = np.random.default_rng(1).permutation(labels)
    assert auroc(permuted, out_of_fold_scores(features, permuted, folds, model)) < 0.7


class _Recorder(ClassifierMixin, BaseEstimator):
    """Remembers which rows (column 0 holds the row number) it was fitted on and which it scored."""

    log: list[tuple[set[int], set[int]]] = []

    def fit(self, features, labels):
        self.classes_ = np.array([0, 1])
        self.fitted_rows_ = set(features[:, 0].astype(int).tolist())
        return self

    def predict_proba(self, features):
        _Recorder.log.append((self.fitted_rows_, set(features[:, 0].astype(int).tolist())))
        return np.full((len(features), 2), 0.5)


def test_no_row_is_scored_by_a_model_that_saw_it(monkeypatch):
    features, labels, folds = _planted(num_cases=40)
    features[:, 0] = np.arange(40)
    _Recorder.log = []
    monkeypatch.setitem(BASELINE_MODELS, "recorder", lambda seed: _Recorder())
    out_of_fold_scores(features, labels, folds, "recorder")
    assert len(_Recorder.log) == 5
    assert all(not fitted & scored for fitted, scored in _Recorder.log)
    assert sorted(r for _, scored in _Recorder.log for r in scored) == list(range(40))


def test_a_memorising_model_gains_nothing_out_of_fold(monkeypatch):
    """1-nearest-neighbour on noise recalls every training label; out of fold it is at chance."""
    rng = np.random.default_rng(6)
    features, labels = rng.normal(size=(100, 5)), rng.permutation(np.arange(100) % 2)
    folds = np.arange(100) % 5
    monkeypatch.setitem(BASELINE_MODELS, "memoriser", lambda seed: KNeighborsClassifier(n_neighbors=1))
    assert auroc(labels, KNeighborsClassifier(1).fit(features, labels).predict_proba(features)[:, 1]) == 1.0
    assert auroc(labels, out_of_fold_scores(features, labels, folds, "memoriser")) < 0.7


def test_out_of_fold_errors_name_the_problem():
    features, labels, folds = _planted(num_cases=20)
    with pytest.raises(ValueError, match="unknown baseline model 'xgboost'"):
        out_of_fold_scores(features, labels, folds, "xgboost")
    with pytest.raises(ValueError, match="at least 2 folds"):
        out_of_fold_scores(features, labels, np.zeros(20), "svm")
    with pytest.raises(ValueError, match="fold 0 hold one class only"):
        out_of_fold_scores(features, labels, np.where(labels == 1, 0, 1), "svm")
    with pytest.raises(ValueError, match="20 feature rows, 19 labels"):
        out_of_fold_scores(features, labels[:19], folds, "svm")


def test_balanced_subset_draws_equal_classes_reproducibly():
    labels = np.r_[np.zeros(70, int), np.ones(30, int)]
    rows = balanced_subset(labels, seed=3)
    assert np.bincount(labels[rows]).tolist() == [30, 30]
    assert set(np.flatnonzero(labels == 1)) <= set(rows)  # all of the minority class
    np.testing.assert_array_equal(rows, balanced_subset(labels, seed=3))
    assert not np.array_equal(rows, balanced_subset(labels, seed=4))
    assert np.bincount(labels[balanced_subset(labels, per_class=20)]).tolist() == [20, 20]
    with pytest.raises(ValueError, match="100 per class .* class 0: 70, class 1: 30"):
        balanced_subset(labels, per_class=100)


def test_baseline_predictions_feed_the_paired_comparison():
    features, labels, folds = _planted(num_cases=40)
    case_ids = [f"case-{k:03d}" for k in range(40)]
    predictions = baseline_predictions(case_ids, features, labels, folds, models=("logistic_regression", "svm"))
    assert list(predictions) == ["logistic_regression", "svm"]
    assert predictions["svm"][3] == {"case_id": "case-003", "label": int(labels[3]),
                                     "score": pytest.approx(out_of_fold_scores(features, labels, folds, "svm")[3])}
    ids, aligned_labels, scores = align(predictions, score_key="score")
    assert ids == case_ids and np.array_equal(aligned_labels, labels)
    with pytest.raises(ValueError, match="case ids must be unique"):
        baseline_predictions(["a"] * 40, features, labels, folds)
