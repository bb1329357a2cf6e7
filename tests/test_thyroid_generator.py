"""The synthetic thyroid ultrasound generator: layout, DICOM read back with its calibration, masks on the
nodule, the label model's documented directions, patient-level folds, the recorded AUROCs, determinism."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UltrasoundImageStorage

from oncofusion.contract import Roi
from oncofusion.data.manifest import datalist
from oncofusion.io.readers import read_frame
from oncofusion.models.thyroid_llnm.morphology import (
    echogenicity_contrast,
    frame_spacing_mm,
    morphology_scalars,
)
from oncofusion.targets import BinaryTarget
from sample_data.generate_thyroid import (
    LABEL_MODEL,
    REPORT_KEYWORDS,
    build_report,
    generate,
    latent_score,
    logistic_oof_auroc,
    parse_args,
    report_features,
)

TINY_SHAPE = (96, 88)  # (W, H): not square, so that a swapped axis shows
TINY_SPACING = (0.5, 0.45)  # mm (x, y): not square either
SIDECAR_KEYS = {"case_id", "patient_id", "bundle", "label", "label_name", "label_meaning", "report", "age", "sex",
                "roi", "center_ijk", "center_mm", "synthetic"}


def _tiny(out: Path, seed: int = 0, workers: int = 1, photometric: str = "MONOCHROME2", num_cases: int = 12) -> dict:
    return generate(out, num_cases=num_cases, seed=seed, num_folds=2, shape=TINY_SHAPE, spacing=TINY_SPACING,
                    photometric=photometric, workers=workers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Twelve small synthetic cases in two patient-level folds; returns the manifest path."""
    out = tmp_path_factory.mktemp("thyroid")
    _tiny(out)
    return out / "manifest.json"


def _cases(manifest_path: Path) -> list[dict]:
    return json.loads(manifest_path.read_text())["cases"]


def test_layout_sidecars_and_manifest(tiny):
    out = tiny.parent
    manifest = json.loads(tiny.read_text())
    assert manifest["description"].startswith("SYNTHETIC") and manifest["synthetic"] is True
    assert len(manifest["cases"]) == 12 and manifest["num_folds"] == 2
    assert manifest["shape"] == list(TINY_SHAPE) and manifest["spacing_mm"] == list(TINY_SPACING)
    assert manifest["label_names"] == {"0": "no LLNM", "1": "LLNM"}
    assert manifest["label_model"]["coefficients"] == LABEL_MODEL
    for key in ("latent_oracle_auroc", "generating_variables_auroc", "observable_logistic_oof_auroc"):
        assert key in manifest and key in manifest["auroc_notes"]
    assert set(manifest["observable_logistic_oof_auroc_by_group"]) == {"morphology", "report", "demographics"}
    # the datastore holds the studies and their sidecars only; masks live next to the manifest
    assert {p.name for p in (out / "datastore").iterdir()} == {f"{c['case_id']}.dcm" for c in manifest["cases"]} | {
        "sidecars"}
    for case in manifest["cases"]:
        assert case["image"] == f"datastore/{case['case_id']}.dcm"
        assert case["nodule_mask"] == f"masks/{case['case_id']}_nodule.png" and (out / case["nodule_mask"]).is_file()
        assert case["lobe_mask"] == f"masks/{case['case_id']}_lobe.png" and (out / case["lobe_mask"]).is_file()
        sidecar = json.loads((out / "datastore" / "sidecars" / f"{case['case_id']}.json").read_text())
        assert set(sidecar) == SIDECAR_KEYS
        assert sidecar["synthetic"] is True and sidecar["bundle"] == "thyroid_llnm"
        assert sidecar["label"] in (0, 1) and sidecar["label_name"] == ("LLNM" if sidecar["label"] else "no LLNM")
        assert sidecar["sex"] in ("female", "male") and 18 <= sidecar["age"] <= 85
        assert {k: sidecar[k] for k in ("label", "report", "roi", "patient_id")} == {
            k: case[k] for k in ("label", "report", "roi", "patient_id")}
        assert "lobe" in sidecar["report"] and " mm " in sidecar["report"]
    records = datalist(tiny, BinaryTarget(class_names=("no LLNM", "LLNM")), folds=[0],
                       keys=["report", "roi", "age", "sex"])
    assert records and all(r["fold"] == 0 and r["image"].endswith(".dcm") for r in records)


def test_dicom_is_synthetic_ultrasound_read_back_with_its_calibration(tiny):
    out = tiny.parent
    for case in _cases(tiny):
        header = pydicom.dcmread(out / case["image"], stop_before_pixels=True)
        assert header.SOPClassUID == UltrasoundImageStorage and header.Modality == "US"
        assert "SYNTHETIC" in header.SeriesDescription and "SYNTHETIC" in header.ImageComments
        assert header.PatientID == case["patient_id"] and header.PhotometricInterpretation == "MONOCHROME2"
        assert (header.Columns, header.Rows) == TINY_SHAPE
        frame = read_frame(out / case["image"])
        assert tuple(frame.shape) == (1, *TINY_SHAPE)  # (C, W, H)
        assert frame.meta["spacing_source"] == "ultrasound_region" and frame.meta["spacing_unit"] == "mm"
        assert frame_spacing_mm(frame) == pytest.approx(TINY_SPACING, rel=1e-9)


def test_rgb_studies_read_as_three_equal_channels(tmp_path):
    manifest = _tiny(tmp_path, photometric="RGB", num_cases=2)
    for case in manifest["cases"]:
        frame = read_frame(tmp_path / case["image"])
        assert tuple(frame.shape) == (3, *TINY_SHAPE) and frame.meta["photometric_interpretation"] == "RGB"
        assert bool((frame[0] == frame[1]).all()) and bool((frame[1] == frame[2]).all())
        assert frame_spacing_mm(frame) == pytest.approx(TINY_SPACING)


def test_masks_sit_on_the_dark_nodule_inside_the_lobe(tiny):
    out = tiny.parent
    checked_off_nodule = 0
    for case in _cases(tiny):
        frame = read_frame(out / case["image"])
        nodule = read_frame(out / case["nodule_mask"])[0].numpy() > 0  # PNGs read on the frame's (W, H) grid
        lobe = read_frame(out / case["lobe_mask"])[0].numpy() > 0
        assert nodule.shape == lobe.shape == TINY_SHAPE
        assert not (nodule & ~lobe).any()  # the lobe outline includes its nodule
        idx = np.argwhere(nodule)
        assert case["roi"] == [idx.min(0).tolist(), idx.max(0).tolist()]  # box in the reader's (i, j)
        assert nodule[tuple(case["center_ijk"])]
        assert case["center_mm"] == pytest.approx([c * s for c, s in zip(case["center_ijk"], TINY_SPACING, strict=True)])
        image = frame[0].numpy()
        assert echogenicity_contrast(frame, nodule, TINY_SPACING) > 10.0  # darker than its ring
        assert image[lobe & ~nodule].mean() - image[nodule].mean() > 10.0  # hypoechoic against the gland
        # the same mask moved along the lobe, off the nodule, is not darker than its ring
        towards_centre = 1 if np.argwhere(lobe)[:, 0].mean() > idx[:, 0].mean() else -1
        moved = np.roll(nodule, towards_centre * (int(np.ptp(idx[:, 0])) + 9), axis=0)
        if not (moved & ~lobe).any() and not (moved & nodule).any():
            assert echogenicity_contrast(frame, moved, TINY_SPACING) < 10.0
            checked_off_nodule += 1
        # the manifest's morphology is what morphology_scalars measures on these files
        measured = morphology_scalars(frame, Roi(mask=nodule), frame_spacing_mm(frame), lobe)
        for key, value in case["morphology"].items():
            assert measured[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float) else value), key
        assert case["oracle"]["capsule_distance_mm"] == pytest.approx(measured["capsule_distance_mm"], abs=1e-4)
        assert case["oracle"]["third"] == measured["lobe_third"]
    assert checked_off_nodule >= 6


BASE = {"capsule_distance_mm": 6.0, "third": "lower", "irregular_margin": 0, "microcalcifications": 0,
        "central_node": 0, "vascularity": 0, "age": 45, "male": 0}


def _z(**changes) -> float:
    return float(latent_score({k: np.array([v]) for k, v in {**BASE, **changes}.items()})[0])


def test_label_model_moves_as_documented():
    m = LABEL_MODEL
    base = _z()
    # closer to the capsule is riskier, most of the step around 2.5 mm
    distances = [0.0, 1.0, 2.0, 2.5, 3.0, 4.0, 6.0]
    scores = [_z(capsule_distance_mm=d) for d in distances]
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert _z(capsule_distance_mm=0.5) - base > 0.9 * m["b_capsule"]
    assert _z(capsule_distance_mm=2.5) - base == pytest.approx(m["b_capsule"] / 2, abs=0.01)
    assert _z(irregular_margin=1) - base == pytest.approx(m["b_irregular"]) and m["b_irregular"] > 0
    assert _z(microcalcifications=1) - base == pytest.approx(m["b_microcalcification"]) and m["b_microcalcification"] > 0
    assert _z(central_node=1) - base == pytest.approx(m["b_central_node"]) and m["b_central_node"] > 0
    assert _z(vascularity=1) - base == pytest.approx(m["b_vascularity"]) and m["b_vascularity"] > 0
    assert _z(third="upper") > _z(third="middle") > base  # upper and middle thirds are high risk
    assert _z(male=1) > base and _z(age=30) > base > _z(age=70)  # men and younger patients
    unobserved = np.array([0.7])
    variables = {k: np.array([v]) for k, v in BASE.items()}
    assert float(latent_score(variables, unobserved)[0]) == pytest.approx(base + 0.7)


def test_manifest_oracle_follows_the_label_model(tiny):
    for case in _cases(tiny):
        oracle = case["oracle"]
        variables = {"capsule_distance_mm": oracle["capsule_distance_mm"], "third": oracle["third"],
                     "irregular_margin": oracle["irregular_margin"], "microcalcifications": oracle["microcalcifications"],
                     "central_node": oracle["central_node"], "vascularity": oracle["vascularity"],
                     "age": case["age"], "male": case["sex"] == "male"}
        z = float(latent_score({k: np.array([v]) for k, v in variables.items()})[0]) + oracle["unobserved"]
        assert oracle["latent_score"] == pytest.approx(z, abs=2e-4)
        assert oracle["probability"] == pytest.approx(1 / (1 + np.exp(-z)), abs=2e-4)


def test_folds_are_patient_level_and_stratified(tiny):
    cases = _cases(tiny)
    by_patient: dict[str, set[int]] = {}
    for case in cases:
        by_patient.setdefault(case["patient_id"], set()).add(case["fold"])
    assert all(len(folds) == 1 for folds in by_patient.values())
    for label in (0, 1):
        counts = [sum(c["fold"] == f and c["label"] == label for c in cases) for f in (0, 1)]
        assert abs(counts[0] - counts[1]) <= 1


def test_generation_is_deterministic(tmp_path, tiny):
    again = tmp_path / "again"
    _tiny(again, workers=2)  # parallel rendering writes the same bytes as the serial fixture
    for path in sorted(tiny.parent.rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(tiny.parent)).read_bytes() == path.read_bytes(), path.name
    other = _tiny(tmp_path / "other", seed=1, num_cases=2)
    first = _cases(tiny)[:2]
    assert [c["report"] for c in other["cases"]] != [c["report"] for c in first]
    assert (tmp_path / "other" / other["cases"][0]["image"]).read_bytes() != (
        tiny.parent / first[0]["image"]).read_bytes()


def test_report_keywords_read_back_what_the_report_says():
    rng = np.random.default_rng(0)
    flags = ("irregular_margin", "microcalcifications", "taller_than_wide", "capsule_contact", "vascularity",
             "central_node", "markedly_hypoechoic")
    for values in itertools.product((False, True), repeat=len(flags)):
        findings = dict(zip(flags, values, strict=True))
        third = ("upper", "middle", "lower")[int(rng.integers(3))]
        findings.update({"side": "left", "third": third, "width_mm": 7.25, "depth_mm": 9.0})
        report = build_report(findings, rng)
        features = report_features(report)
        assert set(features) == {*REPORT_KEYWORDS, "size_mm"}
        for flag in flags:
            assert features[flag] == float(findings[flag]), (flag, report)
        assert (features["upper_third"], features["middle_third"]) == (third == "upper", third == "middle")
        assert features["size_mm"] == 9.0 and f"{third} third" in report and "left" in report.lower()


def test_logistic_oof_auroc():
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 40)
    folds = np.repeat([0, 1, 2, 3], 20)
    separable = (labels + 0.1 * rng.standard_normal(80))[:, None]
    assert logistic_oof_auroc(separable, labels, folds) == 1.0
    noise = rng.standard_normal((80, 3))
    assert 0.25 < logistic_oof_auroc(noise, labels, folds) < 0.75
    assert logistic_oof_auroc(separable, np.zeros(80, int), folds) is None


def test_cli_defaults():
    args = parse_args([])
    assert (args.num_cases, args.seed, args.num_folds) == (200, 0, 5)
    assert tuple(args.shape) == (256, 256) and tuple(args.spacing) == (0.2, 0.2)
    assert parse_args(["--shape", "320,240", "--spacing", "0.15,0.2"]).shape == (320, 240)
