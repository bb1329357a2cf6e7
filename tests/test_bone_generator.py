"""The synthetic bone tumor generator: layout, geometry, determinism, class-dependent appearance and
clinical tables, and the Bayes-optimal AUROCs it records."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.special import ndtr
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from oncofusion.data.manifest import datalist
from oncofusion.targets import BinaryTarget
from sample_data.generate_bone import (
    AGE_MIXTURE,
    AGE_RANGE,
    IMAGE_MU,
    LOCATIONS,
    P_FRACTURE,
    P_LOCATION,
    P_MALE,
    PREVALENCE,
    CaseTask,
    _age_probability,
    bayes_aurocs,
    clinical_log_likelihood_ratio,
    generate,
    parse_args,
    posterior_log_odds,
    render_case,
    sample_clinical,
    sample_image_score,
    sample_labels,
)
from tests.bone_helpers import TINY_SHAPE, TINY_SPACING

pytest_plugins = ["tests.conftest_bone"]

SIDECAR_KEYS = {"case_id", "patient_id", "center_ijk", "center_mm", "roi", "label", "label_name", "label_meaning",
                "sex", "age", "location", "fracture", "synthetic", "bundle"}
MANIFEST_CASE_KEYS = {"case_id", "patient_id", "image", "center_ijk", "center_mm", "roi", "label", "label_name",
                      "sex", "age", "location", "fracture", "fold", "oracle"}


def test_layout_sidecars_and_manifest(tiny_bone_data):
    out = tiny_bone_data.parent
    manifest = json.loads(tiny_bone_data.read_text())
    assert manifest["description"].startswith("SYNTHETIC") and manifest["synthetic"] is True
    assert manifest["num_folds"] == 2 and len(manifest["cases"]) == 12
    assert manifest["label_names"] == {"0": "chondroid", "1": "osteoid"}
    for key in ("bayes_auroc", "bayes_auroc_image", "bayes_auroc_clinical"):
        assert 0.5 < manifest[key] < 1.0
    for case in manifest["cases"]:
        assert set(case) == MANIFEST_CASE_KEYS
        assert case["image"] == f"datastore/{case['case_id']}.nii.gz" and (out / case["image"]).is_file()
        sidecar = json.loads((out / "datastore" / "sidecars" / f"{case['case_id']}.json").read_text())
        assert set(sidecar) == SIDECAR_KEYS and sidecar["synthetic"] is True
        assert sidecar["label_name"] == ("osteoid" if sidecar["label"] == 1 else "chondroid")
        assert sidecar["sex"] in ("female", "male") and AGE_RANGE[0] <= sidecar["age"] <= AGE_RANGE[1]
        assert sidecar["location"] in (*LOCATIONS, None) and sidecar["fracture"] in (True, False, None)
        assert {k: sidecar[k] for k in ("center_mm", "label", "age")} == {k: case[k] for k in ("center_mm", "label", "age")}
    # patient-level folds: one patient per case here, every fold holds both classes
    folds = {(c["fold"], c["label"]) for c in manifest["cases"]}
    assert folds == {(0, 0), (0, 1), (1, 0), (1, 1)}
    records = datalist(tiny_bone_data, BinaryTarget(class_names=("chondroid", "osteoid")), folds=[1],
                       optional_keys=["sex", "age", "location", "fracture"])
    assert records and all(r["fold"] == 1 and "age" in r for r in records)


def test_image_geometry_and_roi(tiny_bone_data):
    out = tiny_bone_data.parent
    for case in json.loads(tiny_bone_data.read_text())["cases"]:
        img = nib.load(out / case["image"])
        assert img.shape == TINY_SHAPE and img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.header.get_zooms(), TINY_SPACING)
        centre = img.affine @ np.r_[case["center_ijk"], 1.0]
        np.testing.assert_allclose(centre[:3], case["center_mm"], atol=1e-2)
        lo, hi = np.array(case["roi"])
        assert np.all(lo <= case["center_ijk"]) and np.all(np.array(case["center_ijk"]) <= hi)
        data = np.asanyarray(img.dataobj)
        assert data.max() > 900  # cortex
        assert (data > 900).mean() < 0.2 and (np.abs(data - 40) < 60).mean() > 0.3  # mostly soft tissue


def test_generation_is_deterministic(tmp_path):
    kwargs = {"num_cases": 2, "seed": 3, "num_folds": 2, "shape": (32, 32, 24), "spacing": (1.2, 1.2, 2.0),
              "bayes_draws": 1000}
    first = generate(tmp_path / "a", **kwargs)
    second = generate(tmp_path / "b", **kwargs)
    assert first == second
    for case in first["cases"]:
        a = np.asanyarray(nib.load(tmp_path / "a" / case["image"]).dataobj)
        b = np.asanyarray(nib.load(tmp_path / "b" / case["image"]).dataobj)
        np.testing.assert_array_equal(a, b)


def _render(tmp_path, score: float, seed: int) -> np.ndarray:
    """HU values within 6 mm of the tumor centre of one rendered case."""
    task = CaseTask("x", (seed,), score, (64, 64, 40), (0.8, 0.8, 1.5), str(tmp_path / f"x{seed}_{score}.nii.gz"))
    geometry = render_case(task)
    data = np.asanyarray(nib.load(task.image_path).dataobj).astype(float)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in data.shape], indexing="ij"), -1)
    distance = np.linalg.norm((grid - geometry["center_ijk"]) * np.array(task.spacing), axis=-1)
    return data[distance <= 6.0]


def test_matrix_follows_the_image_score(tmp_path):
    """Osteoid-like scores give amorphous mid-density cloud, chondroid-like scores dense punctate foci in a
    low-density matrix: the share of cloud-density voxels separates the two on average."""
    cloud = [np.mean((_render(tmp_path, 3.0, s) > 250) & (_render(tmp_path, 3.0, s) < 750)) for s in range(3)]
    rings = [np.mean((_render(tmp_path, -3.0, s) > 250) & (_render(tmp_path, -3.0, s) < 750)) for s in range(3)]
    assert np.mean(cloud) > np.mean(rings)
    low = [np.mean(np.abs(_render(tmp_path, -3.0, s) - 10) < 40) for s in range(3)]
    assert np.mean(low) > 0.1  # cartilage-like matrix around the calcifications


def test_clinical_tables_follow_the_literature():
    rng = np.random.default_rng(0)
    labels = sample_labels(rng, 20_000)
    clinical = sample_clinical(rng, labels)
    osteoid, chondroid = labels == 1, labels == 0
    assert np.median(clinical["age"][osteoid]) + 10 < np.median(clinical["age"][chondroid])  # younger
    metaphysis = LOCATIONS.index("metaphysis")
    assert np.mean(clinical["location"][osteoid] == metaphysis) > 1.5 * np.mean(clinical["location"][chondroid] == metaphysis)
    assert np.mean(clinical["male"][osteoid]) > np.mean(clinical["male"][chondroid])
    assert 0.02 < np.mean(clinical["location"] == -1) < 0.1  # missing completely at random


def _declared_age_probability(age: np.ndarray, label: int) -> np.ndarray:
    """P(age | label) from the declared mixture: normal mass within half a year, clipped ends keep the tails."""
    low = np.where(age <= AGE_RANGE[0], -np.inf, age - 0.5)
    high = np.where(age >= AGE_RANGE[1], np.inf, age + 0.5)
    return sum(w * (norm.cdf(high, m, s) - norm.cdf(low, m, s)) for w, m, s in AGE_MIXTURE[label])


def _declared_terms(clinical: dict) -> dict[str, np.ndarray]:
    """Each field's log P(value | osteoid) / P(value | chondroid) from the generator's declared tables;
    a missing value (missing completely at random) carries no evidence."""
    location, fracture = clinical["location"], clinical["fracture"]
    p_location = {y: np.array(P_LOCATION[y])[np.clip(location, 0, None)] for y in (0, 1)}
    p_fracture = {y: np.where(fracture == 1, P_FRACTURE[y], 1 - P_FRACTURE[y]) for y in (0, 1)}
    p_male = {y: np.where(clinical["male"], P_MALE[y], 1 - P_MALE[y]) for y in (0, 1)}
    return {
        "male": np.log(p_male[1] / p_male[0]),
        "age": np.log(_declared_age_probability(clinical["age"], 1) / _declared_age_probability(clinical["age"], 0)),
        "location": np.where(location >= 0, np.log(p_location[1] / p_location[0]), 0.0),
        "fracture": np.where(fracture >= 0, np.log(p_fracture[1] / p_fracture[0]), 0.0),
    }


def _empirical_log_odds(labels: np.ndarray, members: np.ndarray) -> tuple[float, float]:
    """log(#osteoid / #chondroid) among ``members`` and its standard error."""
    osteoid, chondroid = int(labels[members].sum()), int((1 - labels[members]).sum())
    return float(np.log(osteoid / chondroid)), float(np.sqrt(1 / osteoid + 1 / chondroid))


def test_label_model_likelihoods_are_proper():
    ages = np.arange(AGE_RANGE[0], AGE_RANGE[1] + 1)
    for label in AGE_MIXTURE:
        assert _age_probability(ages, label).sum() == pytest.approx(1.0, abs=1e-9)
        assert sum(P_LOCATION[label]) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    labels = sample_labels(rng, 400_000)
    clinical = sample_clinical(rng, labels)
    # the exact log-likelihood ratio is the sum of the declared tables' per-field log ratios
    declared = _declared_terms(clinical)
    np.testing.assert_allclose(clinical_log_likelihood_ratio(clinical), sum(declared.values()), rtol=0, atol=1e-9)
    # the draws follow the declared tables: with prevalence 1/2 and fields independent given the label, the
    # log-odds of osteoid among the cases with one field value is that value's declared log ratio
    prior = np.log(PREVALENCE / (1 - PREVALENCE))
    cells = {
        "male": {"male": clinical["male"], "female": ~clinical["male"]},
        "age": {f"age {a}": clinical["age"] == a for a in (8, 12, 16, 20, 25, 30, 40, 50, 60, 70)},
        "location": {**{name: clinical["location"] == i for i, name in enumerate(LOCATIONS)},
                     "location missing": clinical["location"] == -1},
        "fracture": {"fracture": clinical["fracture"] == 1, "no fracture": clinical["fracture"] == 0,
                     "fracture missing": clinical["fracture"] == -1},
    }
    observed = {}
    for field, values in cells.items():
        for name, members in values.items():
            (expected,) = set(np.round(declared[field][members], 12))
            observed[name], se = _empirical_log_odds(labels, members)
            assert observed[name] == pytest.approx(prior + expected, abs=4 * se), name
    # the direction of each effect, as the literature has it: osteogenic tumors in younger, more often male
    # patients, mostly metaphyseal and more often with a pathological fracture; chondrogenic ones older,
    # in the diaphysis, flat bones and epiphysis (chondroblastoma)
    assert observed["male"] > 0 > observed["female"]
    assert observed["age 12"] > 0 and observed["age 16"] > 0 > observed["age 50"] and observed["age 60"] < 0
    assert observed["metaphysis"] > 0 and max(observed[k] for k in ("epiphysis", "diaphysis", "flat bone")) < 0
    assert observed["fracture"] > 0 > observed["no fracture"]


def _hanley_mcneil_variance(auc: float, positives: int, negatives: int) -> float:
    """The sampling variance of an AUROC estimated on ``positives`` and ``negatives`` cases."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    spread = auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    return spread / (positives * negatives)


def test_bayes_aurocs_are_consistent():
    draws = 50_000
    result = bayes_aurocs(num_draws=draws, seed=0)
    assert result["bayes_auroc_image"] == pytest.approx(float(ndtr(np.sqrt(2) * IMAGE_MU)), abs=1e-4)
    assert result["bayes_auroc_image_monte_carlo"] == pytest.approx(result["bayes_auroc_image"], abs=0.01)
    # fresh draws scored with the declared model, not with the generator's own functions: the image score is
    # N(+mu, 1) for osteoid and N(-mu, 1) for chondroid, and the posterior log-odds adds 2 mu z to the prior and
    # the clinical log ratio
    rng = np.random.default_rng(5)
    labels = sample_labels(rng, draws)
    clinical = sample_clinical(rng, labels)
    z = sample_image_score(rng, labels)
    for label, mean in ((1, IMAGE_MU), (0, -IMAGE_MU)):
        scores = z[labels == label]
        assert scores.mean() == pytest.approx(mean, abs=4 / np.sqrt(scores.size))
        assert scores.std() == pytest.approx(1.0, abs=0.02)
    clinical_llr = sum(_declared_terms(clinical).values())
    posterior = np.log(PREVALENCE / (1 - PREVALENCE)) + clinical_llr + 2 * IMAGE_MU * z
    np.testing.assert_allclose(posterior_log_odds(clinical, z), posterior, rtol=0, atol=1e-9)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    for key, scores in (("bayes_auroc_clinical", clinical_llr), ("bayes_auroc", posterior)):
        expected = roc_auc_score(labels, scores)
        tolerance = 4 * np.sqrt(2 * _hanley_mcneil_variance(expected, positives, negatives))
        assert result[key] == pytest.approx(expected, abs=tolerance), key
    assert 0.5 < result["bayes_auroc_clinical"] and 0.5 < result["bayes_auroc_image"]
    assert result["bayes_auroc"] > max(result["bayes_auroc_image"], result["bayes_auroc_clinical"]) + 0.02


def test_cli_defaults():
    args = parse_args([])
    assert args.num_cases == 200 and args.seed == 0 and args.num_folds == 5
    assert tuple(args.shape) == (96, 96, 64) and tuple(args.spacing) == (0.8, 0.8, 1.5)
