"""The synthetic lung CT generator: layout, manifest schema, geometry, nodule appearance, folds."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from oncofusion.data.manifest import datalist, load_manifest
from oncofusion.models.lung_nodule.lidc import load_nodules
from oncofusion.models.lung_nodule.reports import semantic_features
from oncofusion.targets import BinaryTarget
from sample_data.generate_lung import (
    HU,
    NODULE_PAD_MM,
    RENDERED_FEATURES,
    CaseTask,
    build_nodule_model,
    generate,
    greatest_axial_diameter_mm,
    observable_ceiling,
    parse_args,
    patients_of,
    render_case,
    render_nodule,
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
    "report_graded",
    "impression_graded",
    "semantics",
    "ratings",
    "malignancy_mean",
    "diameter_mm",
    "long_axis_mm",
    "rendered",
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
    "report_graded",
    "impression_graded",
    "semantics",
    "ratings",
    "malignancy_mean",
    "diameter_mm",
    "long_axis_mm",
    "rendered",
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


# ----------------------------------------------------------------------------- what is drawn, and the ceiling


def test_rendered_features_are_recorded(dataset):
    _, manifest = dataset
    for case in manifest["cases"]:
        drawn = case["rendered"]
        assert list(drawn) == list(RENDERED_FEATURES)
        assert case["diameter_mm"] == pytest.approx(drawn["diameter_mm"], abs=0.05)
        assert 1.0 < case["diameter_mm"] <= case["long_axis_mm"] + 1.0
        assert drawn["spicules"] == 0 or drawn["spicule_length_mm"] >= 3.0
        assert 0.0 <= drawn["solid_fraction"] <= 1.0 and drawn["margin_blur_mm"] > 0
    ceiling = manifest["ceiling"]
    assert "ceiling" in ceiling["name"] and "oracle" not in ceiling["name"]
    assert ceiling["features"][0] == "log(diameter_mm)" and ceiling["features"][1:] == list(RENDERED_FEATURES[1:])
    assert ceiling["auroc"] is None or 0.0 <= ceiling["auroc"] <= 1.0


def test_ceiling_is_recorded_and_above_chance(tmp_path, nodules):
    manifest = generate(tmp_path, num_cases=30, seed=2, num_folds=3, shape=(32, 32, 24), spacing=(1.0, 1.0, 1.5),
                        nodules=nodules)
    assert 0.5 < manifest["ceiling"]["auroc"] <= 1.0
    assert json.loads((tmp_path / "manifest.json").read_text())["ceiling"] == manifest["ceiling"]


def _drawn(diameter, **overrides):
    """Rendered-feature rows whose diameter (only) follows the label, other features constant."""
    return [{**dict.fromkeys(RENDERED_FEATURES, 1.0), "diameter_mm": d, **overrides} for d in diameter]


def test_observable_ceiling_follows_the_drawn_features():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    folds = np.tile(np.arange(5), 16)
    separable = observable_ceiling(_drawn(np.where(labels, 20.0, 5.0) + rng.uniform(0, 1, 80)), labels, folds)
    assert separable["auroc"] == 1.0
    noise = observable_ceiling(_drawn(rng.uniform(4, 20, 80)), labels, folds)
    assert 0.25 < noise["auroc"] < 0.75
    assert observable_ceiling(_drawn(rng.uniform(4, 20, 80)), np.zeros(80, int), folds)["auroc"] is None
    assert observable_ceiling(_drawn(rng.uniform(4, 20, 80)), labels, np.zeros(80, int))["auroc"] is None


def _solid_nodule(nodules):
    """A mid-sized solid nodule rated round, sharp, smooth and uncalcified, to vary one rating at a time."""
    for nodule in nodules:
        r = nodule.ratings
        if (r["texture"] == 5 and r["margin"] == 5 and r["spiculation"] == 1 and r["lobulation"] == 1
                and r["calcification"] == 6 and r["internalStructure"] == 1 and nodule.label is not None
                and 3 <= nodule.mask()[0].shape[0] * nodule.pixel_spacing <= 12):
            return nodule
    raise LookupError("no smooth solid nodule of 3-12 mm")


def _drawn_ct(nodule, spacing=SPACING, seed=0):
    """The nodule drawn over uniform lung (no anatomy), its mask, and what the renderer reports."""
    rng = np.random.default_rng(seed)
    model = build_nodule_model(nodule, spacing, NODULE_PAD_MM, rng)
    hu, occupancy, drawn = render_nodule(model, semantic_features(nodule.ratings), nodule.ratings, spacing, rng)
    return HU["lung"] + occupancy * (hu - HU["lung"]), model.mask, drawn


def _shell(mask, inner_mm, outer_mm, spacing=SPACING):
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return (outside > inner_mm) & (outside <= outer_mm)


def _spiky(ct, mask):
    """Share of the lung 1.5-8 mm outside the nodule that is denser than ground glass: spicules."""
    return float((ct[_shell(mask, 1.5, 8.0)] > -500).mean())


def _fuzzy(ct, mask):
    """Mean density 1-4 mm outside the nodule above the lung's: a blurred or haloed margin."""
    return float(ct[_shell(mask, 1.0, 4.0)].mean() - HU["lung"])


def _convexity(ct, mask):
    """Axial solidity (area / convex-hull area) of the drawn solid part, mean over slices; lobules lower it."""
    from skimage.morphology import convex_hull_image

    solid = ct > -400
    values = [solid[:, :, k].sum() / convex_hull_image(solid[:, :, k]).sum()
              for k in range(solid.shape[2]) if solid[:, :, k].sum() >= 20]
    return -float(np.mean(values))  # higher = more lobulated


def _density(ct, mask):
    return float(np.median(ct[mask]))


def _brightest(ct, mask):
    return float(np.percentile(ct[mask], 99))


@pytest.mark.parametrize(
    ("rating", "plain", "marked", "statistic", "gap"),
    [
        ("spiculation", 1, 5, _spiky, 0.02),
        ("margin", 5, 1, _fuzzy, 60.0),
        ("lobulation", 1, 5, _convexity, 0.03),
        ("texture", 5, 1, lambda ct, mask: -_density(ct, mask), 300.0),
        ("calcification", 6, 3, _brightest, 200.0),
    ],
)
def test_each_rating_changes_a_measurable_image_statistic(nodules, rating, plain, marked, statistic, gap):
    base = _solid_nodule(nodules)
    values = {}
    for level in (plain, marked):
        nodule = dataclasses.replace(base, ratings={**base.ratings, rating: float(level)})
        ct, mask, _ = _drawn_ct(nodule)
        values[level] = statistic(ct, mask)
    assert values[marked] > values[plain] + gap, values


def test_spiculated_and_smooth_cases_differ_in_the_written_image(tmp_path, nodules):
    """The statistic read back from the NIfTI file, around the recorded centre: more dense voxels in the
    shell just outside a spiculated nodule than outside the same nodule drawn smooth."""
    base = _solid_nodule(nodules)
    fractions = {}
    for level in (1.0, 5.0):
        nodule = dataclasses.replace(base, ratings={**base.ratings, "spiculation": level})
        path = tmp_path / f"spiculation{level:g}.nii.gz"
        geometry = render_case(CaseTask("case", nodule, (0, 0), (64, 64, 40), SPACING, str(path)))
        data = np.asanyarray(nib.load(path).dataobj).astype(float)
        idx = np.indices(data.shape)
        dist = np.sqrt(sum(((idx[a] - geometry["center_ijk"][a]) * SPACING[a]) ** 2 for a in range(3)))
        radius = geometry["long_axis_mm"] / 2
        shell = (dist > radius + 1.5) & (dist < radius + 6.0)
        fractions[level] = float((data[shell] > -500).mean())
        assert (geometry["rendered"]["spicules"] > 0) == (level == 5.0)
    assert fractions[5.0] > fractions[1.0] + 0.02, fractions


def test_greatest_axial_diameter():
    x, y = np.ogrid[:40, :40]
    disc = ((x - 20) ** 2 + (y - 20) ** 2 <= 10**2)[:, :, None] & np.ones((1, 1, 3), bool)
    assert greatest_axial_diameter_mm(disc, (0.5, 0.5, 2.0)) == pytest.approx(10.5, abs=0.3)
    bar = np.zeros((30, 5, 2), bool)
    bar[5:25, 2, 1] = True
    assert greatest_axial_diameter_mm(bar, (1.0, 1.0, 1.0)) == pytest.approx(20.0)


# ----------------------------------------------------------------------------- seeds and held-out sets


def test_another_seed_draws_other_images_of_the_same_nodules(tmp_path, nodules):
    """Two labelled nodules of two patients make the pool, so both seeds pick them: only the seed differs."""
    benign = next(n for n in nodules if n.label == 0)
    pool = [benign, next(n for n in nodules if n.label == 1 and n.patient_id != benign.patient_id)]
    kwargs = {"num_cases": 2, "num_folds": 2, "shape": SHAPE, "spacing": SPACING, "nodules": pool}
    first, second = generate(tmp_path / "a", seed=5, **kwargs), generate(tmp_path / "b", seed=6, **kwargs)
    assert [c["patient_id"] for c in first["cases"]] == [c["patient_id"] for c in second["cases"]]
    for a, b in zip(first["cases"], second["cases"], strict=True):
        assert a["center_mm"] != b["center_mm"]
        image = np.asanyarray(nib.load(tmp_path / "a" / a["image"]).dataobj)
        other = np.asanyarray(nib.load(tmp_path / "b" / b["image"]).dataobj)
        assert not np.array_equal(image, other)


def test_held_out_set_shares_no_patient(tmp_path, nodules, dataset):
    out, manifest = dataset
    train = patients_of([out / "manifest.json"])
    assert train == {c["patient_id"] for c in manifest["cases"]}
    chosen = select_nodules(nodules, 300, seed=1, exclude_patients=train)
    assert len(chosen) == 300 and not {n.patient_id for n in chosen} & train
    assert {n.patient_id for n in select_nodules(nodules, 300, seed=1)} & train  # without exclusion they overlap


def test_exclude_patients_option_and_its_error(tmp_path):
    args = parse_args(["--exclude-patients-of", "a/manifest.json", "--exclude-patients-of", "b/manifest.json"])
    assert [str(p) for p in args.exclude_patients_of] == ["a/manifest.json", "b/manifest.json"]
    assert parse_args([]).exclude_patients_of == []
    (tmp_path / "notes.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"notes\.json.*--exclude-patients-of"):
        patients_of([tmp_path / "notes.json"])
    with pytest.raises(ValueError, match="absent.json"):
        patients_of([tmp_path / "absent.json"])
