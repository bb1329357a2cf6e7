"""The synthetic rectal ERUS generator: DICOM read back with its calibration, the five wall layers, the
tumor's depth per uT stage, reports that state the hidden variables, the label model and its recorded
AUROCs, patient-level folds over several frames, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UltrasoundImageStorage
from scipy import ndimage

from oncofusion.io.frames import read_frame
from sample_data.generate_rectal import (
    ANATOMY,
    EXTENT_WORDS,
    LABEL_MODEL,
    FrameTask,
    build_report,
    generate,
    latent_score,
    measure_frame,
    parse_args,
    render,
    report_features,
)

TINY_SHAPE = (128, 132)  # (W, H): not square, so that a swapped axis shows
TINY_SPACING = (0.45, 0.44)  # mm (x, y): about the smallest field the radial view fits in
FRAMES = 2
SIDECAR_KEYS = {"case_id", "patient_id", "bundle", "label", "label_name", "label_meaning", "report", "sex", "roi",
                "center_ijk", "center_mm", "frame", "frames", "synthetic"}
LAYER_LABELS = [ANATOMY[k] for k in ("interface", "mucosa", "submucosa", "muscularis_propria", "serosa")]


def _tiny(out: Path, seed: int = 0, workers: int = 1, num_cases: int = 8, **kwargs) -> dict:
    options = {"num_folds": 2, "shape": TINY_SHAPE, "spacing": TINY_SPACING, "frames_per_patient": FRAMES, **kwargs}
    return generate(out, num_cases=num_cases, seed=seed, workers=workers, **options)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Eight small synthetic patients of two frames each in two patient-level folds; the manifest path."""
    out = tmp_path_factory.mktemp("rectal")
    _tiny(out)
    return out / "manifest.json"


def _cases(manifest_path: Path) -> list[dict]:
    return json.loads(manifest_path.read_text())["cases"]


def _task(stage: int, seed: int = 0, **changes) -> FrameTask:
    fields = {"case_id": "rectal_test", "patient_id": "SYN-TEST", "frame": 0, "seed": (seed, 0, 2),
              "shape": TINY_SHAPE, "spacing": TINY_SPACING, "photometric": "MONOCHROME2", "stage": stage,
              "extent": 0.3, "heterogeneity": 0.5, "nodes": 1, "flow_grade": 2, "male": True,
              "image_path": "", "tumor_path": "", "anatomy_path": ""}
    return FrameTask(**{**fields, **changes})


def test_layout_sidecars_and_manifest_say_synthetic(tiny):
    out = tiny.parent
    manifest = json.loads(tiny.read_text())
    assert manifest["description"].startswith("SYNTHETIC") and manifest["synthetic"] is True
    assert len(manifest["cases"]) == 8 and manifest["frames_per_patient"] == FRAMES
    assert manifest["shape"] == list(TINY_SHAPE) and manifest["spacing_mm"] == list(TINY_SPACING)
    assert manifest["label_names"] == {"0": "poor response", "1": "good response"}
    assert manifest["label_model"]["coefficients"] == LABEL_MODEL
    for key in ("latent_oracle_auroc", "generating_variables_auroc", "observable_logistic_oof_auroc"):
        assert key in manifest and key in manifest["auroc_notes"]
    assert set(manifest["observable_logistic_oof_auroc_by_group"]) == {"image", "report"}
    stems = {f"{c['case_id']}_f{k}" for c in manifest["cases"] for k in range(FRAMES)}
    assert {p.name for p in (out / "datastore").iterdir()} == {f"{s}.dcm" for s in stems} | {"sidecars"}
    for case in manifest["cases"]:
        frames = [f"{case['case_id']}_f{k}" for k in range(FRAMES)]
        assert case["images"] == [f"datastore/{f}.dcm" for f in frames] and case["image"] == case["images"][0]
        assert case["tumor_masks"] == [f"masks/{f}_tumor.png" for f in frames]
        assert case["tumor_mask"] == case["tumor_masks"][0] and case["anatomy_mask"] == case["anatomy_masks"][0]
        assert all((out / p).is_file() for p in case["tumor_masks"] + case["anatomy_masks"])
        for k, frame in enumerate(frames):
            sidecar = json.loads((out / "datastore" / "sidecars" / f"{frame}.json").read_text())
            assert set(sidecar) == SIDECAR_KEYS and sidecar["synthetic"] is True
            assert sidecar["bundle"] == "rectal_erus_clip" and sidecar["frame"] == k and sidecar["frames"] == frames
            assert sidecar["label_name"] == ("good response" if sidecar["label"] else "poor response")
            assert "TRG 0" in sidecar["label_meaning"]
            assert {k: sidecar[k] for k in ("label", "report", "patient_id")} == {
                k: case[k] for k in ("label", "report", "patient_id")}


def test_dicom_is_synthetic_ultrasound_read_back_in_mm(tiny):
    out = tiny.parent
    for case in _cases(tiny):
        headers = [pydicom.dcmread(out / p, stop_before_pixels=True) for p in case["images"]]
        for k, header in enumerate(headers):
            assert header.SOPClassUID == UltrasoundImageStorage and header.Modality == "US"
            assert "SYNTHETIC" in header.SeriesDescription and "SYNTHETIC" in header.ImageComments
            assert header.PatientID == case["patient_id"] and header.InstanceNumber == k + 1
            assert (header.Columns, header.Rows) == TINY_SHAPE
            region = header.SequenceOfUltrasoundRegions[0]
            assert region.PhysicalUnitsXDirection == 3 and region.PhysicalDeltaX == pytest.approx(TINY_SPACING[0] / 10)
        assert len({h.StudyInstanceUID for h in headers}) == 1 and len({h.SOPInstanceUID for h in headers}) == FRAMES
        frame = read_frame(out / case["image"])
        assert tuple(frame.shape) == (1, *TINY_SHAPE)  # (C, W, H)
        assert frame.meta["spacing_source"] == "ultrasound_region" and frame.meta["spacing_unit"] == "mm"
        assert np.diag(frame.affine.numpy())[:2] == pytest.approx(TINY_SPACING, rel=1e-9)


def test_masks_box_and_measurements_match_the_written_files(tiny):
    out = tiny.parent
    for case in _cases(tiny):
        per_frame = []
        for image, tumor_path, anatomy_path in zip(case["images"], case["tumor_masks"], case["anatomy_masks"],
                                                   strict=True):
            frame = read_frame(out / image)
            tumor = read_frame(out / tumor_path)[0].numpy() > 0  # PNGs read on the frame's (W, H) grid
            anatomy = np.rint(read_frame(out / anatomy_path)[0].numpy()).astype(int)
            assert tumor.shape == anatomy.shape == TINY_SHAPE
            assert not (tumor & (anatomy == ANATOMY["probe"])).any()  # the tumor starts in the wall
            per_frame.append(measure_frame(frame.numpy(), tumor, anatomy, TINY_SPACING))
            if image == case["image"]:
                idx = np.argwhere(tumor)
                assert case["roi"] == [idx.min(0).tolist(), idx.max(0).tolist()] and tumor[tuple(case["center_ijk"])]
                grey = frame[0].numpy()
                assert grey[anatomy == ANATOMY["probe"]].mean() < 20  # the anechoic balloon
                wall = (anatomy >= ANATOMY["interface"]) & (anatomy <= ANATOMY["serosa"]) & ~tumor
                assert grey[wall].mean() - grey[tumor].mean() > 10  # the tumor is hypoechoic
        for key, value in case["measurements"].items():
            assert np.mean([m[key] for m in per_frame]) == pytest.approx(value, abs=2e-4), key
        assert case["measurements"]["suspicious_nodes"] == case["oracle"]["nodes"]
        assert case["measurements"]["extent"] == pytest.approx(case["oracle"]["extent"], abs=0.04)


def test_wall_layers_alternate_bright_dark_away_from_the_tumor(tiny):
    out = tiny.parent
    for case in _cases(tiny):
        grey = read_frame(out / case["image"])[0].numpy()
        tumor = read_frame(out / case["tumor_mask"])[0].numpy() > 0
        anatomy = np.rint(read_frame(out / case["anatomy_mask"])[0].numpy()).astype(int)
        away = ~ndimage.binary_dilation(tumor, iterations=4)
        means = [grey[(anatomy == label) & away].mean() for label in LAYER_LABELS]
        # interface > mucosa < submucosa > muscularis propria < serosa, each step by a clear margin
        steps = np.diff(means) * np.array([-1, 1, -1, 1])
        assert (steps > 15).all(), means


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deeper_stage_puts_the_tumor_further_out_through_the_layers(seed):
    depths = []
    for stage in (1, 2, 3, 4):
        _, tumor, anatomy, _ = render(_task(stage, seed))
        under = anatomy[tumor]
        deepest_layer = under[(under >= ANATOMY["interface"]) & (under <= ANATOMY["serosa"])].max()
        beyond_wall = (under == ANATOMY["background"]).any()
        into_organ = (under == ANATOMY["organ"]).any()
        assert not (under == ANATOMY["node"]).any()
        if stage == 1:
            assert deepest_layer == ANATOMY["submucosa"] and not beyond_wall
        elif stage == 2:
            assert deepest_layer == ANATOMY["muscularis_propria"] and not beyond_wall
        elif stage == 3:
            assert deepest_layer == ANATOMY["serosa"] and beyond_wall and not into_organ
        else:
            assert beyond_wall and into_organ
        pixels = np.zeros((*tumor.shape, 1))
        depths.append(measure_frame(pixels.transpose(2, 1, 0), tumor.T, anatomy.T, TINY_SPACING)["relative_depth"])
    assert depths[0] < 0.6 < depths[1] < 1.0 < depths[2] < depths[3], depths


def test_colour_flow_only_in_rgb_inside_the_tumor():
    grey, tumor, _, _ = render(_task(3, flow_grade=3))
    assert grey.ndim == 2
    rgb, tumor_rgb, _, _ = render(_task(3, flow_grade=3, photometric="RGB"))
    assert rgb.shape == (*grey.shape, 3) and (tumor_rgb == tumor).all()
    colour = rgb.max(axis=-1) != rgb.min(axis=-1)
    assert colour.sum() > 20 and not (colour & ~tumor).any()
    anatomy = render(_task(3, flow_grade=3, photometric="RGB"))[2]
    measured = measure_frame(rgb.transpose(2, 1, 0).astype(float), tumor.T, anatomy.T, TINY_SPACING)
    assert measured["colour_fraction"] == pytest.approx(colour[tumor].mean()) and measured["echo_contrast"] > 10
    none, _, _, _ = render(_task(3, flow_grade=0, photometric="RGB"))
    assert (none.max(axis=-1) == none.min(axis=-1)).all()


def test_report_states_the_hidden_variables(tiny):
    for case in _cases(tiny):
        oracle, features = case["oracle"], report_features(case["report"])
        assert features["uT"] == oracle["reported"]["stage"] and abs(features["uT"] - oracle["stage"]) <= 1
        reported_nodes = oracle["reported"]["nodes"]
        assert features["suspicious_nodes"] == reported_nodes and abs(reported_nodes - oracle["nodes"]) <= 1
        assert features["uN"] == (0 if reported_nodes == 0 else 1 if reported_nodes <= 3 else 2)
        assert features["distance_cm"] == pytest.approx(oracle["distance_cm"], abs=0.051)
        assert features["length_cm"] == pytest.approx(oracle["length_cm"], abs=0.051)
        assert features["flow_grade"] == oracle["flow_grade"]
        nearest = min(EXTENT_WORDS, key=lambda w: abs(w[1] - oracle["extent"]))[1]
        assert features["extent"] == pytest.approx(nearest)
        assert features["heterogeneous"] == oracle["reported"]["heterogeneous"]
    assert np.mean([report_features(c["report"])["uT"] == c["oracle"]["stage"] for c in _cases(tiny)]) >= 0.5


def test_report_round_trips_and_varies():
    rng = np.random.default_rng(0)
    reports = set()
    for i in range(60):
        stage, nodes, grade = i % 4 + 1, i % 6, i % 4
        findings = {"distance_cm": 2.0 + 0.25 * i, "length_cm": 1.5 + 0.1 * i, "extent": 0.2 + 0.01 * i,
                    "centre": 0.1 * i, "half_arc": 1.0, "stage": stage, "organ": "vagina", "heterogeneous": i % 2 == 1,
                    "nodes": nodes, "largest_node_mm": 6.0 if nodes else 0.0, "flow_grade": grade}
        report = build_report(findings, rng)
        reports.add(report.split(". ")[0])
        features = report_features(report)
        assert (features["uT"], features["suspicious_nodes"], features["flow_grade"]) == (stage, nodes, grade), report
        assert features["uN"] == (0 if nodes == 0 else 1 if nodes <= 3 else 2)
        assert features["distance_cm"] == pytest.approx(findings["distance_cm"], abs=0.051)
        assert features["length_cm"] == pytest.approx(findings["length_cm"], abs=0.051)
        assert features["heterogeneous"] == findings["heterogeneous"] and "anal verge" in report
        assert ("vagina" in report) == (stage == 4)
    assert len(reports) > 10  # phrasing and order vary


BASE = {"stage": 3, "extent": 0.5, "heterogeneity": 0.5, "nodes": 0, "distance_cm": 7.0, "length_cm": 4.5}


def _z(**changes) -> float:
    return float(latent_score({k: np.array([v]) for k, v in {**BASE, **changes}.items()})[0])


def test_label_model_moves_as_documented():
    base = _z()
    assert base == pytest.approx(LABEL_MODEL["b0"])
    assert _z(stage=1) > _z(stage=2) > base > _z(stage=4)  # shallower tumors respond better
    assert _z(extent=0.2) > base > _z(extent=0.8)
    assert _z(heterogeneity=0.0) > base > _z(heterogeneity=1.0)
    assert base > _z(nodes=1) > _z(nodes=4)
    assert _z(length_cm=3.0) > base > _z(length_cm=7.0)
    assert _z(distance_cm=3.0) > base > _z(distance_cm=12.0)
    variables = {k: np.array([v]) for k, v in BASE.items()}
    assert float(latent_score(variables, np.array([0.7]))[0]) == pytest.approx(base + 0.7)


def test_manifest_oracle_follows_the_label_model(tiny):
    for case in _cases(tiny):
        oracle = case["oracle"]
        z = _z(**{k: oracle[k] for k in BASE}) + oracle["unobserved"]
        assert oracle["latent_score"] == pytest.approx(z, abs=1e-3)
        assert oracle["probability"] == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-3)


def test_folds_are_patient_level(tiny):
    out = tiny.parent
    cases = _cases(tiny)
    assert len({c["patient_id"] for c in cases}) == len(cases)
    assert {c["fold"] for c in cases} == {0, 1}
    for case in cases:  # every frame of a patient is in its case row, hence in its fold
        headers = [pydicom.dcmread(out / p, stop_before_pixels=True) for p in case["images"]]
        assert {h.PatientID for h in headers} == {case["patient_id"]}
    for label in (0, 1):
        counts = [sum(c["fold"] == f and c["label"] == label for c in cases) for f in (0, 1)]
        assert abs(counts[0] - counts[1]) <= 1


def test_generation_is_deterministic(tmp_path, tiny):
    again = tmp_path / "again"
    _tiny(again, workers=2)  # parallel rendering writes the same bytes as the serial fixture
    for path in sorted(tiny.parent.rglob("*")):
        if path.is_file():
            assert (again / path.relative_to(tiny.parent)).read_bytes() == path.read_bytes(), path.name
    other = _tiny(tmp_path / "other", seed=1, num_cases=2, frames_per_patient=1)
    assert other["cases"][0]["image"] == "datastore/rectal_0000.dcm"  # one frame: named after the case
    assert [c["report"] for c in other["cases"]] != [c["report"] for c in _cases(tiny)[:2]]


def test_prevalence_and_ceilings_are_recorded_and_ordered(tmp_path):
    manifest = generate(tmp_path, num_cases=160, seed=0, num_folds=5, shape=TINY_SHAPE, spacing=TINY_SPACING,
                        workers=2)
    labels = [c["label"] for c in manifest["cases"]]
    assert manifest["prevalence"] == pytest.approx(np.mean(labels), abs=1e-4)
    assert 0.2 <= manifest["prevalence"] <= 0.4  # good responders are the minority
    observable = manifest["observable_logistic_oof_auroc"]
    assert manifest["latent_oracle_auroc"] >= observable > 0.6
    assert all(v > 0.55 for v in manifest["observable_logistic_oof_auroc_by_group"].values())


def test_too_small_a_field_is_refused(tmp_path):
    with pytest.raises(ValueError, match="raise --shape or --spacing"):
        generate(tmp_path, num_cases=2, shape=(64, 64), spacing=(0.45, 0.45))


def test_cli_defaults():
    args = parse_args([])
    assert (args.num_cases, args.seed, args.num_folds, args.frames_per_patient) == (200, 0, 5, 1)
    assert tuple(args.shape) == (320, 320) and args.photometric == "MONOCHROME2"
    assert parse_args(["--frames-per-patient", "3", "--photometric", "RGB"]).frames_per_patient == 3
