"""A tiny fake bundle and datastore for the serving tests (no weights, milliseconds per call).

The fake predictor honours the same contract as a real one: it reads the image around the ROI centre,
validates its fields, and returns JSON plus a label volume on the image grid.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import torch
from monailabel.client.client import MONAILabelClientException

from oncofusion.contract import ImageInput, InputSpec, InvalidRequest, Prediction, Roi
from oncofusion.data import manifest
from oncofusion.targets import BinaryTarget

SHAPE = (24, 20, 16)
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


class SphereMeanPredictor:
    """Malignancy = logistic of the mean intensity in a sphere around the ROI centre."""

    label_names = ["lesion"]

    def __init__(
        self, radius: float = 2.0, threshold: float = 100.0, device: Any = "cpu", bundle_root: str = ""
    ):
        self.radius = radius
        self.threshold = threshold
        self.device = torch.device(device)
        self.bundle_root = bundle_root
        self.config_options = {"threshold": threshold, "radius": radius, "draw": [True, False]}

    def predict(self, images: dict[str, torch.Tensor], roi: Roi, fields: dict[str, Any]) -> Prediction:
        image = images["image"]
        threshold = self._number(fields, "threshold")
        radius = self._number(fields, "radius")
        if radius <= 0:
            raise InvalidRequest(f"'radius' must be > 0, got {radius:g}")
        center = roi.center()
        grid = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape[1:]], indexing="ij"), axis=-1)
        sphere = np.linalg.norm(grid - center, axis=-1) <= radius
        mean = float(image[0].cpu().numpy()[sphere].mean())
        probability = 1.0 / (1.0 + math.exp(-(mean - threshold) / 50.0))
        name = "malignant" if probability >= 0.5 else "benign"
        result = {
            "probability": round(probability, 4),
            "class": name,
            "mean_intensity": np.float32(mean),  # numpy on purpose: the task must make it JSON
            "fields": sorted(fields),
            "report": fields.get("report"),
            "device": str(self.device),
        }
        draw = fields.get("draw", True)
        draw = draw if isinstance(draw, bool) else str(draw).lower() == "true"
        label = sphere.astype(np.uint8)[None] if draw else None
        return Prediction(result=result, label=label, label_names={f"{name} {probability:.2f}": 1})

    @staticmethod
    def _number(fields: dict[str, Any], name: str) -> float:
        try:
            return float(fields[name])
        except (KeyError, TypeError, ValueError):
            raise InvalidRequest(f"'{name}' must be a number, got {fields.get(name)!r}") from None


class TwoImageMeanPredictor:
    """Reads a CT and a second volume of the same patient (e.g. a PET): the mean of each at the click."""

    config_options: dict[str, Any] = {}

    def __init__(self, device: Any = "cpu"):
        self.inputs = InputSpec(images=(ImageInput("image", "volume"), ImageInput("pet", "volume")),
                                prompt=("points",))

    def predict(self, images: dict[str, torch.Tensor], roi: Roi, fields: dict[str, Any]) -> Prediction:
        if images.get("pet") is None:
            raise InvalidRequest("missing image input(s) pet", 400)
        i, j, k = (int(round(v)) for v in roi.center())
        return Prediction(result={name: float(images[name][0, i, j, k]) for name in ("image", "pet")})


class WholeImageMeanPredictor:
    """A model that reads whole images and takes no prompt: the image's mean intensity."""

    config_options: dict[str, Any] = {}

    def __init__(self, device: Any = "cpu"):
        self.inputs = InputSpec(prompt=())

    def predict(self, images: dict[str, torch.Tensor], roi: Roi | None, fields: dict[str, Any]) -> Prediction:
        assert roi is None
        return Prediction(result={"mean": float(images["image"].mean())})


def make_whole_image_bundle(root: Path) -> Path:
    bundle = make_fake_bundle(root, "whole_image")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["predictor"] = {"_target_": "tests.serving_fakes.WholeImageMeanPredictor", "device": "@device"}
    config["inputs"] = {"_target_": "oncofusion.contract.InputSpec", "prompt": []}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


def make_two_image_bundle(root: Path) -> Path:
    """A bundle whose model reads two images, declared in its inference.json like a real one."""
    bundle = make_fake_bundle(root, "two_images")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["predictor"] = {"_target_": "tests.serving_fakes.TwoImageMeanPredictor", "device": "@device"}
    config["inputs"] = {"_target_": "oncofusion.contract.InputSpec", "prompt": ["points"],
                        "images": [{"_target_": "oncofusion.contract.ImageInput", "name": "image"},
                                   {"_target_": "oncofusion.contract.ImageInput", "name": "pet"}]}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


class FakeTrainer:
    """What a bundle's ``train.json`` ``trainer`` does, in miniature: read the datalist, write a model."""

    def __init__(self, datalist_file: str, max_epochs: int, output_dir: str, ckpt_dir: str | None = None):
        self.datalist_file = datalist_file
        self.max_epochs = int(max_epochs)
        self.output_dir = Path(output_dir)
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None

    def run(self) -> None:
        # read the datalist the way the real bundles do: it is a case manifest
        records = manifest.datalist(self.datalist_file, BinaryTarget())
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "epochs": self.max_epochs,
            "records": len(records),
            "labels": sorted({r["label"] for r in records}),
            "center_mm": [r["center_mm"] for r in records],
        }
        (self.output_dir / "model.json").write_text(json.dumps(summary))
        if self.ckpt_dir is not None:  # a "checkpoint", where real bundles put theirs
            (self.ckpt_dir / "fold0").mkdir(parents=True, exist_ok=True)
            (self.ckpt_dir / "fold0" / "model.json").write_text(json.dumps(summary))
        print(f"fake training done: {summary['records']} records, {self.max_epochs} epochs", flush=True)


def make_fake_bundle(root: Path, name: str = "fake_nodule") -> Path:
    """A minimal valid MONAI bundle whose predictor and trainer are the fakes above."""
    bundle = Path(root) / name
    (bundle / "configs").mkdir(parents=True)
    metadata = {
        "name": "Fake nodule classifier",
        "version": "0.0.1",
        "description": "Test double: mean intensity around the click",
        "task": "Lung nodule malignancy (fake)",
        "monai_version": "1.5.0",
        "pytorch_version": "2.0",
        "numpy_version": "1.26",
        "required_packages_version": {},
    }
    inference = {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "target": {"_target_": "oncofusion.targets.BinaryTarget", "class_names": ["benign", "malignant"]},
        "inputs": {"_target_": "oncofusion.contract.InputSpec", "texts": ["report"]},
        "predictor": {
            "_target_": "tests.serving_fakes.SphereMeanPredictor",
            "radius": 2.0,
            "threshold": 100.0,
            "device": "@device",
            "bundle_root": "@bundle_root",
        },
    }
    train = {
        "bundle_root": ".",
        "datalist_file": "",
        "max_epochs": 1,
        "output_dir": "$@bundle_root + '/models'",
        "ckpt_dir": "$@bundle_root + '/models'",
        "trainer": {
            "_target_": "tests.serving_fakes.FakeTrainer",
            "datalist_file": "@datalist_file",
            "max_epochs": "@max_epochs",
            "output_dir": "@output_dir",
            "ckpt_dir": "@ckpt_dir",
        },
        "run": ["$@trainer.run()"],
    }
    for file, content in (("metadata", metadata), ("inference", inference), ("train", train)):
        (bundle / "configs" / f"{file}.json").write_text(json.dumps(content, indent=2))
    return bundle


def volume_with_blob(center: tuple[int, int, int], value: float, background: float = 0.0) -> np.ndarray:
    volume = np.full(SHAPE, background, np.float32)
    i, j, k = center
    volume[i - 2 : i + 3, j - 2 : j + 3, k - 2 : k + 3] = value
    return volume


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def make_datastore(root: Path, with_sidecars: bool = True) -> Path:
    """Three studies: a bright (malignant) and a dim (benign) labelled blob, and one unlabelled study."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases = {
        "case_bright": ((12, 10, 8), 400.0, 1),
        "case_dim": ((8, 6, 5), 20.0, 0),
        "case_unlabelled": ((12, 10, 8), 250.0, None),
    }
    for case_id, (center, value, label) in cases.items():
        write_nifti(root / f"{case_id}.nii.gz", volume_with_blob(center, value))
        if with_sidecars:
            sidecar: dict[str, Any] = {
                "report": f"{case_id}: solid nodule",
                "patient_id": f"P-{case_id}",
                "age": 63,
            }
            if label is not None:
                sidecar.update({"label": label, "center_ijk": list(center)})
            (root / "sidecars").mkdir(exist_ok=True)
            (root / "sidecars" / f"{case_id}.json").write_text(json.dumps(sidecar))
    return root


def status_and_detail(error: MONAILabelClientException) -> tuple[int, str]:
    """HTTP status and ``detail`` message of a failed MONAI Label client call."""
    match = re.match(r"Status: (\d+); Response: (.*)", error.msg, re.S)
    assert match, error.msg
    body = match.group(2)
    try:
        body = json.loads(body).get("detail", body)
    except ValueError:
        pass
    return int(match.group(1)), str(body)


class SlowPredictor(SphereMeanPredictor):
    """A model that takes ``delay_s`` per click: for the concurrency tests."""

    def __init__(self, delay_s: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.delay_s = delay_s

    def predict(self, images, roi, fields) -> Prediction:
        time.sleep(self.delay_s)
        return super().predict(images, roi, fields)


def make_slow_bundle(root: Path, delay_s: float) -> Path:
    bundle = make_fake_bundle(root, "slow")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["predictor"]["_target_"] = "tests.serving_fakes.SlowPredictor"
    config["predictor"]["delay_s"] = delay_s
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


def make_wide_bundle(root: Path, radius: float = 8.0, name: str = "fake_nodule") -> Path:
    """The fake bundle drawing a sphere of ``radius`` voxels: wide enough to see in a browser's viewport
    (OHIF sends a model's options only when the user edits them, so the default is what it gets)."""
    bundle = make_fake_bundle(root, name)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["predictor"]["radius"] = radius
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


class MarkerProbe:
    """Reports what lies under the click: the voxel value and the voxel's world position (RAS mm).

    For the geometry tests: a click at a marker's viewer IJK must read the marker."""

    label_names = ["lesion"]
    config_options: dict[str, Any] = {}

    def __init__(self, device: Any = "cpu", bundle_root: str = ""):
        self.device = device

    def predict(self, images: dict[str, torch.Tensor], roi: Roi, fields: dict[str, Any]) -> Prediction:
        image = images["image"]
        ijk = [int(round(c)) for c in roi.center()]
        world = np.asarray(image.affine, dtype=np.float64) @ [*ijk, 1.0]
        return Prediction(result={"value": float(image[0][tuple(ijk)]), "voxel_mm": world[:3].tolist(),
                                  "shape": list(image.shape[1:])})


def make_marker_bundle(root: Path) -> Path:
    bundle = make_fake_bundle(root, "marker")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["predictor"] = {"_target_": "tests.serving_fakes.MarkerProbe", "device": "@device"}
    config["inputs"] = {"_target_": "oncofusion.contract.InputSpec", "prompt": ["points"]}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return bundle


def read_label_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A returned label as (array, RAS affine), from NIfTI or NRRD (read back independently of the writer:
    nibabel, or pynrrd's header in LPS)."""
    path = Path(path)
    if path.suffix == ".nrrd":
        data, header = nrrd.read(str(path), index_order="F")
        assert header["space"] == "left-posterior-superior"
        lps = np.eye(4)
        lps[:3, : data.ndim] = np.asarray(header["space directions"], float).T
        lps[:3, 3] = header["space origin"]
        return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine
