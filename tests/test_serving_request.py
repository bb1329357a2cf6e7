"""Request parsing, validation messages, the image cache and the bundle tasks, without a server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import NibabelReader
from monailabel.datastore.local import LocalDatastore

from oncofusion.contract import InvalidRequest
from oncofusion.io.cache import ImageCache
from oncofusion.io.readers import image_affine, read_volume
from oncofusion.serving.discovery import discover_bundles
from oncofusion.serving.infer_task import PREDICTIONS_KEY, BundleInferTask
from oncofusion.serving.request import (
    merge_fields,
    parse_box,
    parse_points,
    parse_roi,
    prompt_on_frame,
    read_sidecar,
    request_fields,
)
from oncofusion.serving.summary_task import BundleSummaryTask
from oncofusion.serving.train_task import BundleTrainTask, publish
from tests.dicom_series import write_ct_series
from tests.serving_fakes import (
    AFFINE,
    SHAPE,
    make_datastore,
    make_fake_bundle,
    make_two_image_bundle,
    make_whole_image_bundle,
    read_label_file,
    volume_with_blob,
    write_nifti,
)


def _message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# -- points and boxes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        ([[1, 2, 3], [4, 5, 6]], [(1, 2, 3), (4, 5, 6)]),  # what Slicer sends
        ([1, 2, 3], [(1, 2, 3)]),  # a single point
        ("[[1, 2, 3]]", [(1, 2, 3)]),  # form-encoded JSON
        ("[7.5, 2, 3]", [(7.5, 2, 3)]),
        ([], []),
        (None, []),
    ],
)
def test_parse_points_accepts_slicer_and_json_forms(value, expected):
    assert parse_points(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ([[1, 2]], "'foreground' point 0 must have 3 coordinates (i, j, k) on this 3D image, got [1, 2]"),
        ([[1, 2, 3], [1, 2, 3, 4]], "'foreground' point 1 must have 3 coordinates"),
        ([["a", 2, 3]], "'foreground' point 0 has a non-numeric coordinate 'a'"),
        ([[True, 2, 3]], "non-numeric coordinate True"),
        ([[float("nan"), 2, 3]], "non-finite coordinate"),
        ("[[1, 2, 3]", "'foreground' is not valid JSON"),
        ({"i": 1}, "'foreground' must be a point (i, j, k) or a list of points"),
        (5, "'foreground' must be a point"),
    ],
)
def test_parse_points_rejects_malformed_with_param_name(value, message):
    with pytest.raises(InvalidRequest, match=None) as e:
        parse_points(value, "foreground")
    assert message in _message(e)
    assert e.value.status_code == 422


def test_prompts_take_the_dimension_of_the_image():
    assert parse_points([[3, 4]], "foreground", dims=2) == [(3.0, 4.0)]
    with pytest.raises(InvalidRequest, match=r"must have 2 coordinates \(i, j\) on this 2D image, got \[1, 2, 3\]"):
        parse_points([[1, 2, 3]], "foreground", dims=2)
    assert parse_box([9, 2, 1, 7], "roi", dims=2) == ((2.0, 1.0), (9.0, 7.0))
    assert parse_box([[9, 1], [2, 7]], "roi", dims=2) == ((2.0, 1.0), (9.0, 7.0))
    with pytest.raises(InvalidRequest, match=r"\[i0, i1, j0, j1\] on this 2D image"):
        parse_box([1, 2, 3, 4, 5, 6], "roi", dims=2)
    roi = parse_roi({"foreground": [[3, 4]], "background": [[1, 1]]}, (10, 8))
    assert roi.points == [(3.0, 4.0)] and roi.background == [(1.0, 1.0)] and roi.spatial_dims == 2
    with pytest.raises(InvalidRequest, match=r"ROI point \(12, 1\) lies outside image 10x8"):
        parse_roi({"foreground": [[3, 4]], "background": [[12, 1]]}, (10, 8))


def test_slicer_clicks_on_a_2d_model_carry_the_frame_as_k():
    """Slicer sends a ``dimension: 2`` model ``[i, j, k]`` with k the slice (a cine's frame)."""
    request = {"foreground": [[30, 40, 5]], "background": "[[1, 2, 5]]", "roi": [9, 2, 1, 7, 5, 5], "slice": 5}
    flat, frame = prompt_on_frame(request)
    assert frame == 5
    assert flat["foreground"] == [[30, 40]] and flat["background"] == [[1, 2]] and flat["roi"] == [9, 2, 1, 7]
    assert parse_roi(flat, (64, 64)).box == ((2.0, 1.0), (9.0, 7.0))
    assert prompt_on_frame({"roi": [[9, 1, 2], [2, 7, 2]]}) == ({"roi": [[9, 1], [2, 7]]}, 2)
    assert prompt_on_frame({"foreground": [3, 4, 0.4]})[0]["foreground"] == [3, 4]  # a single point stays one
    untouched = {"foreground": [[3, 4]], "frame": "7"}
    assert prompt_on_frame(untouched) == (untouched, "7")  # 2D clicks: the frame option decides
    assert prompt_on_frame({"foreground": [[3, 4, 7]], "frame": "7"})[1] == "7"


@pytest.mark.parametrize("request_, message", [
    ({"foreground": [[1, 2, 0], [3, 4, 1]]}, r"the prompt lies on frames \[0, 1\]"),
    ({"foreground": [[1, 2, 3]], "roi": [0, 4, 0, 4, 2, 2]}, r"frames \[2, 3\]"),
    ({"foreground": [[1, 2, 3]], "frame": 4}, "'frame' is 4 but the prompt was placed on frame 3"),
    ({"foreground": [[1, 2, "x"]]}, r"'foreground' point's k \(frame\) has a non-numeric coordinate 'x'"),
])
def test_a_prompt_across_frames_or_against_the_frame_option_is_refused(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        prompt_on_frame(request_)


def test_prompt_kinds_a_model_does_not_take_are_refused():
    with pytest.raises(InvalidRequest, match="does not use a box; it accepts clicks"):
        parse_roi({"foreground": [[1, 2, 3]], "roi": [0, 4, 0, 4, 0, 4]}, (8, 8, 8), kinds=("points",))
    with pytest.raises(InvalidRequest, match=r"no lesion given: send an 'roi' box \[i0, i1, j0, j1\]$"):
        parse_roi({}, (8, 8), kinds=("box",))


def test_parse_box_slicer_flat_form_is_sorted_per_axis():
    # Slicer maps each RAS corner to IJK separately: a flipped axis arrives reversed
    assert parse_box([10, 4, 2, 8, 5, 5]) == ((4, 2, 5), (10, 8, 5))
    assert parse_box([[1, 9, 3], [4, 2, 6]]) == ((1, 2, 3), (4, 9, 6))
    assert parse_box("[1, 2, 3, 4, 5, 6]") == ((1, 3, 5), (2, 4, 6))
    assert parse_box([]) is None


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2, 3]], [[1, 2], [3, 4]], "box"])
def test_parse_box_rejects_malformed_naming_roi(value):
    with pytest.raises(InvalidRequest) as e:
        parse_box(value)
    assert "'roi'" in _message(e)


def test_point_outside_volume_message():
    with pytest.raises(InvalidRequest) as e:
        parse_roi({"foreground": [[612, 40, 7]]}, (512, 512, 300))
    assert _message(e) == "ROI point (612, 40, 7) lies outside image 512x512x300"
    with pytest.raises(InvalidRequest, match=r"ROI point \(-1, 0, 0\) lies outside"):
        parse_roi({"foreground": [-1, 0, 0]}, (512, 512, 300))
    # the last voxel is inside; Slicer rounds, so 511.4 is too
    assert parse_roi({"foreground": [[511.4, 0, 299]]}, (512, 512, 300)).points == [(511.4, 0, 299)]


def test_roi_needs_a_point_box_or_mask():
    for request in (
        {},
        {"foreground": []},
        {"foreground": [], "roi": [], "label": "lesion", "background": [[1, 1, 1]]},
    ):
        with pytest.raises(InvalidRequest, match="no lesion given: send a 'foreground' point"):
            parse_roi(request, SHAPE)


def test_box_is_clipped_or_rejected():
    roi = parse_roi({"roi": [-5, 30, 2, 4, 3, 5]}, SHAPE)
    assert roi.box == ((0, 2, 3), (23, 4, 5))
    with pytest.raises(
        InvalidRequest, match=r"ROI box \(30, 2, 3\)-\(40, 4, 5\) lies outside image 24x20x16"
    ):
        parse_roi({"roi": [30, 40, 2, 4, 3, 5]}, SHAPE)


def test_label_mask_file(tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:7, 5:8, 6:9] = 1
    path = write_nifti(tmp_path / "mask.nii.gz", mask)
    roi = parse_roi({"label": str(path)}, SHAPE)
    np.testing.assert_allclose(roi.center(), [5, 6, 7])

    with pytest.raises(
        InvalidRequest, match="label mask 'mask.nii.gz' has shape 24x20x16 but the image is 24x20x17"
    ):
        parse_roi({"label": str(path)}, (24, 20, 17))
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InvalidRequest, match="label mask 'empty.nii.gz' is empty"):
        parse_roi({"label": str(empty)}, SHAPE)
    with pytest.raises(InvalidRequest, match="label mask file 'gone.nii.gz' not found") as e:
        parse_roi({"label": str(tmp_path / "gone.nii.gz"), "foreground": [[1, 1, 1]]}, SHAPE)
    assert e.value.status_code == 400
    # Slicer's segment name is not a mask
    assert parse_roi({"label": "lesion", "foreground": [[1, 1, 1]]}, SHAPE).mask is None


# -- fields -----------------------------------------------------------------------------------------
def test_fields_request_then_sidecar_then_defaults(tmp_path):
    (tmp_path / "case.json").write_text(
        json.dumps({"report": "spiculated", "age": 70, "label": 1, "center_ijk": [1, 2, 3]})
    )
    sidecar = read_sidecar(tmp_path, "case")
    request = {
        "model": "m",
        "image": "/x.nii.gz",
        "foreground": [[1, 2, 3]],
        "label": "lesion",
        "age": 71,
        "client_id": None,
        "result_extension": ".nrrd",
    }
    fields = merge_fields(request, sidecar, {"threshold": 0.5, "mode": ["fast", "slow"], "age": 0})
    # the training target and the training ROI never reach the predictor
    assert fields == {"threshold": 0.5, "mode": "fast", "age": 71, "report": "spiculated"}
    assert "foreground" not in request_fields(request)
    survival = merge_fields({}, {"os_months": 12.0, "death": 1, "report": "r"}, {}, target_keys=("os_months", "death"))
    assert survival == {"report": "r"}  # a survival target's time and event stay private too

    assert read_sidecar(tmp_path, "other") == {}
    assert read_sidecar(tmp_path, "../case") == {}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidRequest, match="sidecar 'bad.json' is not valid JSON"):
        read_sidecar(tmp_path, "bad")


# -- image loading and cache -------------------------------------------------------------------------
def test_read_volume_keeps_voxel_order_and_affine(tmp_path):
    volume = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    path = write_nifti(tmp_path / "ct.nii.gz", volume)
    image = read_volume(path)
    assert tuple(image.shape) == (1, *SHAPE)
    assert image.dtype == torch.float32
    assert float(image[0, 3, 4, 5]) == float(volume[3, 4, 5])  # IJK index the array directly
    np.testing.assert_allclose(image.affine.numpy(), AFFINE)
    np.testing.assert_allclose(image_affine(path), AFFINE)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((24, 20), np.float32), "has shape 24x20: a 3D volume"),
        (np.zeros((24, 20, 1), np.float32), "has shape 24x20x1: a 3D volume"),
        (np.zeros((24, 20, 16, 3), np.float32), "has shape 24x20x16x3: a 3D volume"),
    ],
)
def test_read_volume_rejects_non_3d(tmp_path, array, message):
    path = write_nifti(tmp_path / "img.nii.gz", array)
    with pytest.raises(InvalidRequest) as e:
        read_volume(path)
    assert f"image 'img.nii.gz' {message}" in _message(e)


def test_read_volume_trailing_singleton_is_3d(tmp_path):
    path = write_nifti(tmp_path / "img.nii", np.zeros((*SHAPE, 1), np.float32))
    assert tuple(read_volume(path).shape) == (1, *SHAPE)


def test_read_volume_rejects_nan(tmp_path):
    volume = np.zeros(SHAPE, np.float32)
    volume[1, 2, 3] = np.nan
    with pytest.raises(InvalidRequest, match="image 'nan.nii.gz' contains 1 NaN/infinite voxels"):
        read_volume(write_nifti(tmp_path / "nan.nii.gz", volume))
    with pytest.raises(InvalidRequest, match="contains only NaN/infinite voxels"):
        read_volume(write_nifti(tmp_path / "allnan.nii.gz", np.full(SHAPE, np.nan, np.float32)))


def test_read_volume_unreadable(tmp_path):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"this is not a nifti file")
    with pytest.raises(InvalidRequest, match="cannot read image 'broken.nii.gz' with NibabelReader") as e:
        read_volume(garbage)
    assert e.value.status_code == 415
    assert str(tmp_path) not in str(e.value)  # no directories (they may name the patient)
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG")
    with pytest.raises(InvalidRequest, match="unsupported image format for 'photo.png'") as e:
        read_volume(png)
    assert e.value.status_code == 415
    with pytest.raises(InvalidRequest, match="image 'missing.nii.gz' not found") as e:
        read_volume(tmp_path / "missing.nii.gz")
    assert e.value.status_code == 400


def test_read_dicom_series_folder(tmp_path):
    rows, cols, slices = 4, 5, 3
    write_ct_series(tmp_path, rows, cols, slices, pixels=lambda k: np.arange(rows * cols).reshape(rows, cols) + 100 * k)

    image = read_volume(tmp_path)
    # Slicer's IJK for a DICOM series: I = column, J = row, K = slice
    assert tuple(image.shape) == (1, cols, rows, slices)
    assert float(image[0, 2, 1, 2]) == 1 * cols + 2 + 200
    # LPS patient coordinates become MONAI's RAS world; column spacing is PixelSpacing[1]
    expected = np.array([[-0.8, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 2, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine.numpy(), expected, atol=1e-6)


def test_cache_hit_skips_decoding(tmp_path, monkeypatch):
    calls = []
    original = NibabelReader.read

    def counting_read(self, data, **kwargs):
        calls.append(data)
        return original(self, data, **kwargs)

    monkeypatch.setattr(NibabelReader, "read", counting_read)
    a = write_nifti(tmp_path / "a.nii.gz", volume_with_blob((12, 10, 8), 400.0))
    b = write_nifti(tmp_path / "b.nii.gz", volume_with_blob((12, 10, 8), 20.0))
    cache = ImageCache(max_bytes=4 * int(np.prod(SHAPE)))  # room for one float32 volume

    first = cache.get(a)
    second = cache.get(str(a))
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(first, second)
    np.testing.assert_allclose(second.affine.numpy(), AFFINE)

    second[0] = -1.0  # a predictor normalising in place must not corrupt the cached copy
    assert float(cache.get(a)[0].max()) == 400.0 and len(calls) == 1

    cache.get(b)  # capacity 1: evicts a
    cache.get(a)
    assert len(calls) == 3

    # rewriting the study on disk invalidates its entry
    time.sleep(0.01)
    write_nifti(a, volume_with_blob((12, 10, 8), 50.0))
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert float(cache.get(a)[0].max()) == 50.0 and len(calls) == 4


def test_cache_missing_image_is_400(tmp_path):
    with pytest.raises(InvalidRequest, match="image 'nope.nii.gz' not found") as e:
        ImageCache().get(tmp_path / "nope.nii.gz")
    assert e.value.status_code == 400


# -- bundle tasks -----------------------------------------------------------------------------------
@pytest.fixture()
def served(tmp_path):
    bundle = make_fake_bundle(tmp_path / "bundles")
    studies = make_datastore(tmp_path / "datastore")
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii"])
    task = BundleInferTask(bundle, ImageCache(max_bytes=2**24), sidecar_dir=studies / "sidecars", datastore=datastore)
    return task, datastore, studies


def test_a_request_names_further_images_by_id_else_the_sidecar_does(tmp_path):
    bundle = make_two_image_bundle(tmp_path / "bundles")
    studies = make_datastore(tmp_path / "datastore")
    write_nifti(studies / "case_bright_pet.nii.gz", volume_with_blob((12, 10, 8), 7.0))
    write_nifti(studies / "case_dim_pet.nii.gz", volume_with_blob((12, 10, 8), 3.0))
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii"])
    task = BundleInferTask(bundle, ImageCache(max_bytes=2**24), sidecar_dir=studies / "sidecars", datastore=datastore)
    image = {"image": datastore.get_image_uri("case_bright"), "image_id": "case_bright", "foreground": [[12, 10, 8]]}

    _, result = task({**image, "images": {"pet": "case_dim_pet"}})
    assert (result["image"], result["pet"]) == (400.0, 3.0)
    _, result = task({**image, "images": '{"pet": "case_bright_pet"}'})  # form-encoded JSON
    assert result["pet"] == 7.0
    sidecar = studies / "sidecars" / "case_bright.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "images": {"pet": "case_bright_pet"}}))
    _, result = task(image)  # the sidecar names the study's PET
    assert result["pet"] == 7.0
    for images, status, message in [
        ({"ct2": "case_dim_pet"}, 422, r"'images' names unknown input\(s\) \['ct2'\]; this model reads \['pet'\]"),
        ({"pet": "nowhere"}, 404, "image 'nowhere' for input 'pet' is not in the datastore"),
        (["case_dim_pet"], 422, "'images' must map input names to image ids"),
    ]:
        with pytest.raises(InvalidRequest, match=message) as e:
            task({**image, "images": images})
        assert e.value.status_code == status
    assert task.info()["dimension"] == 3


def test_a_whole_image_model_says_that_it_did_not_use_the_click(tmp_path):
    bundle = make_whole_image_bundle(tmp_path / "bundles")
    image = write_nifti(tmp_path / "ct.nii.gz", volume_with_blob((12, 10, 8), 400.0))
    task = BundleInferTask(bundle, ImageCache())
    _, result = task({"image": str(image)})
    assert result["mean"] == pytest.approx(400.0 * 125 / np.prod(SHAPE)) and "prompt_ignored" not in result
    _, result = task({"image": str(image), "foreground": [[1, 2, 3]], "roi": [0, 1, 0, 1, 0, 1]})
    assert result["prompt_ignored"] == "this model reads whole images; the foreground and roi sent was not used"
    assert result["roi_center_ijk"] is None


def test_infer_task_info_is_deepgrow_with_options(served):
    task, _, _ = served
    info = task.info()
    assert info["type"] == "deepgrow" and info["dimension"] == 3
    assert info["labels"] == ["lesion"]
    assert info["config"] == {"threshold": 100.0, "radius": 2.0, "draw": [True, False]}
    assert info["version"] == "0.0.1"


def test_infer_task_predicts_writes_label_and_persists(served):
    task, datastore, studies = served
    request = {
        "image": datastore.get_image_uri("case_bright"),
        "image_id": "case_bright",
        "foreground": [[12, 10, 8]],
        "label": "lesion",
        "result_extension": ".nrrd",
    }
    label_file, result = task(request)
    try:
        assert result["class"] == "malignant" and result["probability"] > 0.9
        assert result["label_names"] == {"malignant 1.00": 1}
        assert result["model"] == "fake_nodule" and result["model_version"] == "0.0.1"
        assert set(result["latencies"]) == {"load", "predict", "write", "total"}
        assert result["report"] == "case_bright: solid nodule"  # from the sidecar
        assert result["device"] == "cpu"  # the task's device overrides the config's
        assert "label" not in result["fields"] and "patient_id" in result["fields"]
        json.dumps(result)  # numpy values were converted

        assert label_file.endswith(".nrrd")  # as asked
        label, affine = read_label_file(label_file)
        assert label.shape == SHAPE and label.dtype == np.uint8
        np.testing.assert_allclose(affine, AFFINE, atol=1e-9)
        assert label[12, 10, 8] == 1 and label[0, 0, 0] == 0
    finally:
        os.unlink(label_file)

    # request params win over the sidecar
    _, result = task({**request, "report": "typed by the user", "draw": False})
    assert result["report"] == "typed by the user"

    datastore.update_image_info(
        "case_bright", {"oncofusion_predictions": {"other_model": {"probability": 0.1}}}
    )
    _, result = task({**request, "draw": "false"})
    stored = json.loads((studies / "datastore_v2.json").read_text())["objects"]["case_bright"]["image"][
        "info"
    ]
    assert stored["name"] == "case_bright.nii.gz"  # existing info intact
    assert stored[PREDICTIONS_KEY]["other_model"] == {"probability": 0.1}
    assert stored[PREDICTIONS_KEY]["fake_nodule"]["probability"] == result["probability"]


def test_infer_task_errors_write_nothing(served):
    task, datastore, studies = served
    before = (studies / "datastore_v2.json").read_bytes()
    image = datastore.get_image_uri("case_dim")
    for request, message in [
        ({"foreground": [[30, 1, 1]]}, "ROI point (30, 1, 1) lies outside image 24x20x16"),
        ({"foreground": [[1, 1, 1]], "threshold": "high"}, "'threshold' must be a number, got 'high'"),
        ({}, "no lesion given"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            task({"image": image, "image_id": "case_dim", **request})
        assert message in _message(e)
    assert (studies / "datastore_v2.json").read_bytes() == before


def test_train_task_records_and_checks(tmp_path):
    bundle = make_fake_bundle(tmp_path / "bundles")
    studies = make_datastore(tmp_path / "datastore")
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii"])
    task = BundleTrainTask(bundle, studies / "sidecars", tmp_path / "runs", max_epochs=1)

    records = task.check(datastore, with_world=True)
    assert [r["case_id"] for r in records] == ["case_bright", "case_dim"]  # the unlabelled study is skipped
    bright = records[0]
    assert bright["label"] == 1 and bright["patient_id"] == "P-case_bright" and bright["age"] == 63
    assert bright["report"] == "case_bright: solid nodule" and "impression" not in bright  # sidecar as is
    assert {r["fold"] for r in records} == {0, 1}  # patient-level, one patient per label here
    np.testing.assert_allclose(bright["center_mm"], (AFFINE @ [12, 10, 8, 1])[:3], atol=1e-4)
    assert Path(bright["image"]).name == "case_bright.nii.gz"

    # a study another bundle owns is not this bundle's, whatever its sidecar holds
    dim = json.loads((studies / "sidecars" / "case_dim.json").read_text())
    (studies / "sidecars" / "case_dim.json").write_text(json.dumps({**dim, "bundle": "bone_tumor_matrix"}))
    with pytest.raises(InvalidRequest, match="1 labelled studies found"):
        task.check(datastore)
    (studies / "sidecars" / "case_dim.json").write_text(json.dumps({**dim, "bundle": ["x", "fake_nodule"]}))
    assert [r["case_id"] for r in task.check(datastore)] == ["case_bright", "case_dim"]

    (studies / "sidecars" / "case_dim.json").write_text(json.dumps({"label": 1, "center_ijk": [8, 6, 5]}))
    with pytest.raises(InvalidRequest, match="all 2 labelled studies fall in one binary stratum .1.; at least 2"):
        task.check(datastore)
    (studies / "sidecars" / "case_dim.json").write_text(json.dumps({"label": 3, "center_ijk": [8, 6, 5]}))
    with pytest.raises(InvalidRequest, match="sidecar of 'case_dim': .*label"):
        task.check(datastore)
    (studies / "sidecars" / "case_dim.json").unlink()
    with pytest.raises(InvalidRequest, match="1 labelled studies found, at least 2 are needed"):
        task.check(datastore)
    with pytest.raises(InvalidRequest, match="'max_epochs' must be a positive integer, got 'many'"):
        task({"max_epochs": "many"}, datastore)


def test_summary_task_finds_the_lesion_of_the_study(tmp_path):
    bundle = make_fake_bundle(tmp_path / "bundles")
    studies = make_datastore(tmp_path / "datastore")
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"])
    summary = BundleSummaryTask(BundleInferTask(bundle, ImageCache(), studies / "sidecars", datastore))
    assert summary.name == "fake_nodule_summary" and summary.info()["type"] == "segmentation"

    def run(image_id: str, **prompt) -> dict:
        label_file, result = summary({"image": datastore.get_image_uri(image_id), "image_id": image_id, **prompt})
        os.unlink(label_file)
        return result

    bright = run("case_bright")  # nothing predicted yet: the sidecar's center_ijk
    assert bright["lesion_from"] == "study record (center_ijk)" and bright["roi_center_ijk"] == [12, 10, 8]
    assert bright["label_names"] == {"malignant 1.00": 1}
    with pytest.raises(InvalidRequest, match="click on it with 'fake_nodule' first, then run 'fake_nodule_summary'"):
        run("case_unlabelled")
    run("case_unlabelled", foreground=[[12, 10, 7]])  # a prompt in the request is used as sent...
    assert run("case_unlabelled")["lesion_from"] == "last prediction"  # ...and remembered with the study
    assert run("case_unlabelled")["roi_center_ijk"] == [12, 10, 7]


def test_publish_swaps_the_served_checkpoints_in_one_step(tmp_path):
    first, second = tmp_path / "run1" / "models", tmp_path / "run2" / "models"
    for run in (first, second):
        (run / "fold0").mkdir(parents=True)
        (run / "fold0" / "model.pt").write_text(run.parent.name)
    link = tmp_path / "current"
    publish(first, link)
    assert (link / "fold0" / "model.pt").read_text() == "run1"
    publish(second, link)
    assert (link / "fold0" / "model.pt").read_text() == "run2" and link.is_symlink()
    assert (first / "fold0" / "model.pt").read_text() == "run1"  # the previous run is kept, not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "run1", "run2"]  # no temp link left


def test_infer_task_serves_the_published_checkpoints(tmp_path):
    bundle = make_fake_bundle(tmp_path / "bundles")
    link = tmp_path / "runs" / "current"
    task = BundleInferTask(bundle, ImageCache(), published=link)
    assert task._checkpoints_dir() == bundle / "models"
    assert task._parser().get("ckpt_dir") is None
    (tmp_path / "runs" / "r1" / "models").mkdir(parents=True)
    publish(tmp_path / "runs" / "r1" / "models", link)
    assert task._checkpoints_dir() == (tmp_path / "runs" / "r1" / "models").resolve()
    assert task._parser().get("ckpt_dir") == str((tmp_path / "runs" / "r1" / "models").resolve())


def test_discover_bundles(tmp_path):
    make_fake_bundle(tmp_path, "b_model")
    make_fake_bundle(tmp_path, "a_model")
    (tmp_path / "not_a_bundle").mkdir()
    assert list(discover_bundles(tmp_path, "all")) == ["a_model", "b_model"]
    assert list(discover_bundles(tmp_path, " b_model ")) == ["b_model"]
    with pytest.raises(
        ValueError, match=r"unknown model\(s\) lung in --conf models; bundles in .*: a_model, b_model"
    ):
        discover_bundles(tmp_path, "a_model,lung")
    with pytest.raises(ValueError, match="not found"):
        discover_bundles(tmp_path / "nope")


def test_unloadable_bundle_is_listed_as_unavailable_and_answers_503(tmp_path):
    bundle = make_fake_bundle(tmp_path / "bundles")
    config = bundle / "configs" / "inference.json"
    good = config.read_text()
    config.write_text(good.replace("SphereMeanPredictor", "NotTrainedYet"))
    image = write_nifti(tmp_path / "ct.nii.gz", volume_with_blob((12, 10, 8), 400.0))
    task = BundleInferTask(bundle, ImageCache())

    info = task.info()
    assert info["config"] == {} and "[unavailable: " in info["description"]
    with pytest.raises(InvalidRequest, match="model 'fake_nodule' is unavailable: .*NotTrainedYet") as e:
        task({"image": str(image), "foreground": [[12, 10, 8]]})
    assert e.value.status_code == 503

    config.write_text(good)  # e.g. training has written the weights: the next call loads the model
    _, result = task({"image": str(image), "foreground": [[12, 10, 8]]})
    assert result["class"] == "malignant"


def test_predictor_reloads_when_weights_change(served):
    task, datastore, _ = served
    first = task.predictor
    assert task.predictor is first  # cached while the weights stay the same
    (task.bundle_dir / "models").mkdir(exist_ok=True)
    (task.bundle_dir / "models" / "model.pt").write_bytes(b"new weights")
    assert task.predictor is not first
