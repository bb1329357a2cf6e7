"""The synthetic bone tumor generator: layout, geometry, determinism, class-dependent appearance and
clinical tables, and the Bayes-optimal AUROCs it records."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.special import ndtr

from oncofusion.data.manifest import datalist
from oncofusion.metrics.classification import auroc
from oncofusion.targets import BinaryTarget
from sample_data.generate_bone import (
    AGE_MIXTURE,
    AGE_RANGE,
    IMAGE_MU,
    LOCATIONS,
    P_LOCATION,
    CaseTask,
    _age_probability,
    bayes_aurocs,
    clinical_log_likelihood_ratio,
    generate,
    parse_args,
    render_case,
    sample_clinical,
    sample_labels,
)
from tests.bone_helpers import TINY_SHAPE, TINY_SPACING

pytest_plugins = ["tests.conftest_bone"]

SIDECAR_KEYS = {"case_id", "patient_id", "center_ijk", "center_mm", "roi", "label", "label_name", "label_meaning",
                "sex", "age", "location", "fracture", "synthetic"}
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


def test_label_model_likelihoods_are_proper():
    ages = np.arange(AGE_RANGE[0], AGE_RANGE[1] + 1)
    for label in AGE_MIXTURE:
        assert _age_probability(ages, label).sum() == pytest.approx(1.0, abs=1e-9)
        assert sum(P_LOCATION[label]) == pytest.approx(1.0)
    # the exact clinical log-likelihood ratio is the log of empirical frequency ratios
    rng = np.random.default_rng(1)
    labels = sample_labels(rng, 400_000)
    clinical = sample_clinical(rng, labels)
    llr = clinical_log_likelihood_ratio(clinical)
    young_metaphysis = (clinical["age"] == 16) & (clinical["location"] == LOCATIONS.index("metaphysis"))
    empirical = np.log(np.mean(labels[young_metaphysis & clinical["male"] & (clinical["fracture"] == 0)] == 1)
                       / np.mean(labels[young_metaphysis & clinical["male"] & (clinical["fracture"] == 0)] == 0))
    assert empirical == pytest.approx(np.median(llr[young_metaphysis & clinical["male"] & (clinical["fracture"] == 0)]),
                                      abs=0.35)


def test_bayes_aurocs_are_consistent():
    result = bayes_aurocs(num_draws=50_000, seed=0)
    assert result["bayes_auroc_image"] == pytest.approx(float(ndtr(np.sqrt(2) * IMAGE_MU)), abs=1e-4)
    assert result["bayes_auroc_image_monte_carlo"] == pytest.approx(result["bayes_auroc_image"], abs=0.01)
    assert result["bayes_auroc"] > max(result["bayes_auroc_image"], result["bayes_auroc_clinical"]) + 0.02
    # the posterior from both sources ranks better than either alone on the same draws
    rng = np.random.default_rng(5)
    labels = sample_labels(rng, 20_000)
    clinical = sample_clinical(rng, labels)
    assert auroc(labels, clinical_log_likelihood_ratio(clinical)) == pytest.approx(result["bayes_auroc_clinical"],
                                                                                   abs=0.015)


def test_cli_defaults():
    args = parse_args([])
    assert args.num_cases == 200 and args.seed == 0 and args.num_folds == 5
    assert tuple(args.shape) == (96, 96, 64) and tuple(args.spacing) == (0.8, 0.8, 1.5)
