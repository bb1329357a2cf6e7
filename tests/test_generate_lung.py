"""The synthetic lung CT generator: layout, manifest schema, geometry, nodule appearance, folds."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from oncofusion.data.manifest import datalist, load_manifest
from oncofusion.models.lung_nodule.lidc import load_nodules
from oncofusion.models.lung_nodule.reports import semantic_features
from oncofusion.targets import BinaryTarget
from sample_data.generate_lung import (
    CaseTask,
    generate,
    parse_args,
    render_case,
    select_nodules,
)

SHAPE = (48, 48, 32)
SPACING = (0.7, 0.7, 1.25)
MANIFEST_CASE_KEYS = {
    "case_id",
    "patient_id",
    "image",
    "center_mm",
    "center_ijk",
    "label",
    "report",
    "impression",
    "semantics",
    "ratings",
    "malignancy_mean",
    "fold",
}
SIDECAR_KEYS = {
    "bundle",
    "case_id",
    "patient_id",
    "center_ijk",
    "center_mm",
    "label",
    "label_name",
    "report",
    "impression",
    "semantics",
    "ratings",
    "malignancy_mean",
    "synthetic",
}


@pytest.fixture(scope="module")
def nodules():
    return load_nodules()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, nodules):
    out = tmp_path_factory.mktemp("lung")
    manifest = generate(out, num_cases=4, seed=1, num_folds=2, shape=SHAPE, spacing=SPACING, nodules=nodules)
    return out, manifest


def test_layout_and_manifest_schema(dataset):
    out, manifest = dataset
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["description"].startswith("SYNTHETIC")
    assert manifest["seed"] == 1 and manifest["num_folds"] == 2
    assert len(manifest["cases"]) == 4
    for case in manifest["cases"]:
        assert set(case) == MANIFEST_CASE_KEYS
        assert case["image"] == f"datastore/{case['case_id']}.nii.gz"
        assert (out / case["image"]).is_file()
        assert case["label"] in (0, 1) and case["fold"] in (0, 1)
        assert case["report"].startswith("Findings: ") and case["report"].endswith(case["impression"])
        assert case["semantics"] == semantic_features(case["ratings"])
        sidecar = json.loads((out / "datastore" / "sidecars" / f"{case['case_id']}.json").read_text())
        assert set(sidecar) == SIDECAR_KEYS
        assert sidecar["synthetic"] is True
        assert sidecar["label_name"] == ("malignant" if case["label"] else "benign")
        assert sidecar["center_mm"] == case["center_mm"] and sidecar["report"] == case["report"]


def test_labels_follow_mean_malignancy_and_are_balanced(dataset):
    _, manifest = dataset
    labels = [c["label"] for c in manifest["cases"]]
    assert sorted(labels) == [0, 0, 1, 1]
    for case in manifest["cases"]:
        assert case["malignancy_mean"] != 3
        assert case["label"] == int(case["malignancy_mean"] > 3)


def test_image_geometry(dataset):
    out, manifest = dataset
    for case in manifest["cases"]:
        img = nib.load(out / case["image"])
        assert img.shape == SHAPE
        assert img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.header.get_zooms(), SPACING)
        assert all(isinstance(v, int) for v in case["center_ijk"])
        centre = img.affine @ np.r_[case["center_ijk"], 1.0]
        assert np.allclose(centre[:3], case["center_mm"], atol=1e-2)
        data = np.asanyarray(img.dataobj)
        assert data.min() >= -1024 and (data < -700).mean() > 0.2  # mostly lung or air around a nodule


def test_manifest_folds_are_patient_level(dataset):
    _, manifest = dataset
    fold_of = {}
    for case in manifest["cases"]:
        assert fold_of.setdefault(case["patient_id"], case["fold"]) == case["fold"]


def test_selection_is_balanced_and_deterministic(nodules):
    chosen = select_nodules(nodules, 40, seed=3)
    assert chosen == select_nodules(nodules, 40, seed=3)
    assert chosen != select_nodules(nodules, 40, seed=4)
    assert sum(n.label for n in chosen) == 20
    assert len({(n.scan_id, n.nodule_index) for n in chosen}) == 40


def _pick(nodules, **wanted):
    for nodule in nodules:
        features = semantic_features(nodule.ratings)
        if nodule.label is not None and all(features[k] == v for k, v in wanted.items()):
            return nodule
    raise LookupError(wanted)


@pytest.mark.parametrize(
    ("wanted", "low", "high"),
    [
        (
            {"texture": "ground-glass", "calcification": "absent", "internal_structure": "soft tissue"},
            -800,
            -400,
        ),
        (
            {"texture": "part-solid", "calcification": "absent", "internal_structure": "soft tissue"},
            -250,
            150,
        ),
        ({"texture": "solid", "calcification": "absent", "internal_structure": "soft tissue"}, -250, 150),
        ({"texture": "solid", "calcification": "present", "internal_structure": "soft tissue"}, 200, 1100),
    ],
)
def test_centre_hu_matches_texture(tmp_path, nodules, wanted, low, high):
    nodule = _pick(nodules, **wanted)
    path = tmp_path / "case.nii.gz"
    geometry = render_case(CaseTask("case", nodule, (0, 0), (64, 64, 40), SPACING, str(path)))
    data = np.asanyarray(nib.load(path).dataobj)
    i, j, k = geometry["center_ijk"]
    assert low <= data[i, j, k] <= high, (wanted, data[i - 1 : i + 2, j, k])
    assert np.median(data[:8, :8, :8]) < low or np.median(data[:8, :8, :8]) > high  # background differs


def test_generation_is_deterministic(tmp_path, nodules):
    first = generate(
        tmp_path / "a", num_cases=2, seed=5, num_folds=2, shape=SHAPE, spacing=SPACING, nodules=nodules
    )
    second = generate(
        tmp_path / "b", num_cases=2, seed=5, num_folds=2, shape=SHAPE, spacing=SPACING, nodules=nodules
    )
    assert first == second
    for case in first["cases"]:
        a = np.asanyarray(nib.load(tmp_path / "a" / case["image"]).dataobj)
        b = np.asanyarray(nib.load(tmp_path / "b" / case["image"]).dataobj)
        assert np.array_equal(a, b)


TARGET = BinaryTarget(class_names=("benign", "malignant"))


def test_datalist_and_fold_filters(dataset):
    out, manifest = dataset
    path = out / "manifest.json"
    records = datalist(path, TARGET, keys=["impression"])
    assert len(records) == 4
    for record, case in zip(records, manifest["cases"], strict=True):
        assert {"image", "center_mm", "label", "impression", "case_id", "patient_id"} <= set(record)
        assert record["impression"] == case["impression"] and record["label"] == case["label"]
        assert record["image"].startswith("/") and (out / case["image"]).samefile(record["image"])
    for fold in (0, 1):
        val = datalist(path, TARGET, folds=[fold])
        train = datalist(path, TARGET, exclude_folds=[fold])
        assert len(val) + len(train) == 4
        assert not {r["case_id"] for r in val} & {r["case_id"] for r in train}
    assert load_manifest(path)[0]["fold"] in (0, 1)


def test_nested_parts_split_the_training_folds_by_patient(tmp_path):
    cases = [{"case_id": f"c{i}", "patient_id": f"p{i // 2}", "image": f"c{i}.nii.gz", "fold": i % 3,
              "label": (i // 2) % 2} for i in range(36)]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"cases": cases}))
    train = datalist(path, TARGET, exclude_folds=[0], part="train", validation_fraction=0.25)
    validation = datalist(path, TARGET, exclude_folds=[0], part="validation", validation_fraction=0.25)
    outer = {r["case_id"] for r in datalist(path, TARGET, exclude_folds=[0])}
    assert {r["case_id"] for r in train} | {r["case_id"] for r in validation} == outer
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in validation}
    assert all(r["fold"] != 0 for r in train + validation)
    assert {r["label"] for r in validation} == {0, 1} and 0.15 < len(validation) / len(outer) < 0.35
    with pytest.raises(ValueError, match="part"):
        datalist(path, TARGET, part="test")


def test_manifest_errors_name_file_and_key(tmp_path, dataset):
    missing = tmp_path / "absent.json"
    with pytest.raises(ValueError, match="absent.json"):
        load_manifest(missing)
    _, manifest = dataset
    broken = json.loads(json.dumps(manifest))
    del broken["cases"][1]["patient_id"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"broken\.json.*patient_id"):
        datalist(path, TARGET)
    broken = json.loads(json.dumps(manifest))
    broken["cases"][1]["center_mm"] = [1.0, "x", 2.0]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"broken\.json.*center_mm"):
        datalist(path, TARGET)
    broken["cases"][1]["center_mm"] = [1.0, 2.0, 3.0]
    broken["cases"][1]["label"] = 4
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"label"):
        datalist(path, TARGET)


def test_cli_options():
    args = parse_args(["--out", "x", "--num-cases", "3", "--shape", "32,32,16", "--spacing", "1,1,2"])
    assert args.num_cases == 3 and args.shape == (32, 32, 16) and args.spacing == (1.0, 1.0, 2.0)
    assert parse_args([]).num_cases == 120 and parse_args([]).num_folds == 5
    with pytest.raises(SystemExit):
        parse_args(["--shape", "32,32"])
