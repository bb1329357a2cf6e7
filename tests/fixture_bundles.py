"""Three tiny bundles, built in ``tmp_path``, that hold the contract to shapes the shipped bundles do not use.

- ``frame_blob``: a 2D classifier on PNG frames (reader ``frame``) with a 2D click, a MONAI CNN on the
  patch around the click, a :class:`~oncofusion.targets.BinaryTarget`;
- ``cox_volume``: a whole-image Cox model (no prompt) on 3D volumes, a
  :class:`~oncofusion.targets.SurvivalTarget`, an ensemble of log-hazards;
- ``lesion_booster``: LightGBM boosters over fixed intensity features around a 3D click, a two-stage plan
  (``extract`` once, ``fit`` per fold).

Each builder writes a complete bundle (``configs/metadata.json``, ``inference.json``, training configs,
``evaluate.json``, ``plan.json``); each data writer puts synthetic studies, their sidecars and a case
manifest under one root, so that one datastore can hold the studies of every bundle at once. The model
code the configs name (transforms, predictors, the feature extractor, the booster fit) lives here too:
the bundles reference it as ``tests.fixture_bundles.<name>``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from oncofusion.data.folds import assign_folds
from oncofusion.io.readers import read_image
from oncofusion.predictor import Context, PredictorTemplate
from oncofusion.targets import Target
from oncofusion.transforms.geometry import voxel_to_world, world_to_voxel

logger = logging.getLogger(__name__)

FRAME_BUNDLE = "frame_blob"
COX_BUNDLE = "cox_volume"
BOOSTER_BUNDLE = "lesion_booster"
NUM_FOLDS = 2
FEATURE_NAMES = ("inner_mean", "inner_std", "inner_max", "shell_mean", "contrast")
SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)


# -- model code the bundles name ------------------------------------------------------------------------
def crop_around(
    image: torch.Tensor, center_index: Sequence[float], size: int, padding_value: float = 0.0
) -> torch.Tensor:
    """The ``size``-wide patch of ``image`` ``(C, *spatial)`` whose index ``size // 2`` lies on the voxel
    nearest ``center_index``; what falls outside the image is ``padding_value``. Returns ``(C, size, ...)``."""
    array = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    array = array.detach().cpu().float()
    dims = array.ndim - 1
    center = np.asarray(center_index, float).reshape(dims)
    start = np.floor(center + 0.5).astype(int) - size // 2
    patch = torch.full((array.shape[0], *[size] * dims), float(padding_value))
    source, target = [slice(None)], [slice(None)]
    for axis in range(dims):
        lo, hi = max(start[axis], 0), min(start[axis] + size, array.shape[axis + 1])
        if hi <= lo:
            return patch
        source.append(slice(lo, hi))
        target.append(slice(lo - start[axis], hi - start[axis]))
    patch[tuple(target)] = array[tuple(source)]
    return patch


class CropAroundd(MapTransform):
    """Crop a ``size``-wide patch (2D or 3D) around ``data[center_key]``, a point in world mm mapped to
    indices through the image's own affine."""

    def __init__(
        self, keys: KeysCollection, size: int, center_key: str = "center_mm", padding_value: float = 0.0
    ):
        super().__init__(keys)
        self.size = int(size)
        self.center_key = center_key
        self.padding_value = padding_value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            center = world_to_voxel(image.affine.numpy(), np.asarray([d[self.center_key]], float))[0]
            d[key] = crop_around(image, center, self.size, self.padding_value)
        return d


class PatchClassifierPredictor(PredictorTemplate):
    """A classifier of the patch around the click on the primary image (2D or 3D).

    ``preprocessing`` maps ``{"image", "center_mm"}`` to the network's patch ``(C, *patch)``; the label
    drawn is the patch's footprint on the image, named by the predicted class and its probability.
    """

    def __init__(self, ensemble, preprocessing, patch_size: int, **kwargs):
        super().__init__(ensemble, **kwargs)
        self.preprocessing = preprocessing
        self.patch_size = int(patch_size)

    def model_inputs(self, context: Context) -> tuple[torch.Tensor]:
        image = context.images[self.inputs.primary.name]
        sample = self.preprocessing({"image": image, "center_mm": context.center_mm})
        return (torch.as_tensor(sample["image"])[None].to(self.device),)

    def draw(self, result, output, model_inputs, context):
        shape = tuple(context.images[self.inputs.primary.name].shape[1:])
        start = np.floor(context.center_index + 0.5).astype(int) - self.patch_size // 2
        label = np.zeros(shape, np.uint8)
        label[tuple(slice(max(s, 0), max(s + self.patch_size, 0)) for s in start)] = 1
        return label, {self.summarize(result): 1}


class WholeImageRiskPredictor(PredictorTemplate):
    """A Cox model of the whole primary image: the risk is the mean of the fold members' log-hazards.

    ``preprocessing`` maps ``{"image"}`` to the network's input ``(C, *spatial)``. Nothing is drawn.
    """

    def __init__(self, ensemble, preprocessing, **kwargs):
        super().__init__(ensemble, **kwargs)
        self.preprocessing = preprocessing

    def model_inputs(self, context: Context) -> tuple[torch.Tensor]:
        sample = self.preprocessing({"image": context.images[self.inputs.primary.name]})
        return (torch.as_tensor(sample["image"])[None].to(self.device),)

    def result(self, output: torch.Tensor, model_inputs, context: Context) -> dict[str, Any]:
        """``output``: ``(M, 1)`` member log-hazards."""
        per_member = output[:, 0].cpu().numpy()
        return {self.score_key: float(per_member.mean()), "fold_log_hazards": [float(v) for v in per_member]}

    def summarize(self, result: Mapping[str, Any]) -> str:
        return f"log-hazard {result[self.score_key]:+.2f}"


def lesion_features(image: torch.Tensor, center_index: Sequence[float], radius: float) -> np.ndarray:
    """Intensity statistics of ``image`` ``(C, *spatial)`` around ``center_index``: mean, spread and
    maximum inside the ball of ``radius`` voxels, mean of the shell out to twice the radius, and the
    contrast between the two. Returns ``(len(FEATURE_NAMES),)`` float32."""
    size = 4 * int(np.ceil(radius)) + 3
    patch = crop_around(image, center_index, size, padding_value=float("nan"))[0].numpy()
    dims = patch.ndim
    center = np.asarray(center_index, float).reshape(dims)
    offset = center - np.floor(center + 0.5)
    grid = np.stack(np.meshgrid(*[np.arange(size) - size // 2] * dims, indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - offset, axis=-1)
    inside = np.isfinite(patch)
    inner = patch[(distance <= radius) & inside]
    shell = patch[(distance > radius) & (distance <= 2 * radius) & inside]
    if inner.size == 0 or shell.size == 0:
        raise ValueError(
            f"no voxel of the lesion ball or shell lies inside the image around {center.tolist()}"
        )
    return np.array(
        [inner.mean(), inner.std(), inner.max(), shell.mean(), inner.mean() - shell.mean()], np.float32
    )


def extract_features(
    datalist: Sequence[Mapping], cache_file: str, radius: float, kind: str = "volume"
) -> dict:
    """The :func:`lesion_features` of every record (its ``center_mm`` on its image), written to
    ``cache_file`` as ``{"feature_names", "features": {case_id: [...]}}``; returns that object."""
    features = {}
    for record in datalist:
        image = read_image(record["image"], kind)
        center = world_to_voxel(image.affine.numpy(), np.asarray([record["center_mm"]], float))[0]
        features[str(record["case_id"])] = lesion_features(image, center, radius).tolist()
    cache = {"feature_names": list(FEATURE_NAMES), "radius": radius, "features": features}
    Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
    Path(cache_file).write_text(json.dumps(cache))
    logger.info("wrote the features of %d cases to %s", len(features), cache_file)
    return cache


def _feature_matrix(
    cache: Mapping, records: Sequence[Mapping], target: Target
) -> tuple[np.ndarray, np.ndarray]:
    missing = [r["case_id"] for r in records if str(r["case_id"]) not in cache["features"]]
    if missing:
        raise ValueError(f"cases {missing[:5]} have no cached features: run the 'extract' stage first")
    x = np.array([cache["features"][str(r["case_id"])] for r in records], np.float64)
    y = np.array([target.stratum(r) for r in records], np.float64)
    return x, y


def fit_booster(
    cache_file: str,
    train_records: Sequence[Mapping],
    validation_records: Sequence[Mapping],
    target: Target,
    params: Mapping[str, Any],
    num_boost_round: int,
    early_stopping_rounds: int,
    model_file: str,
) -> dict[str, Any]:
    """Fit a LightGBM booster on the cached features of ``train_records``, stop early on
    ``validation_records`` (the inner split) and save its best iteration to ``model_file``."""
    import lightgbm

    cache = json.loads(Path(cache_file).read_text())
    x_train, y_train = _feature_matrix(cache, train_records, target)
    x_valid, y_valid = _feature_matrix(cache, validation_records, target)
    train_set = lightgbm.Dataset(x_train, y_train, feature_name=list(cache["feature_names"]))
    valid_set = lightgbm.Dataset(x_valid, y_valid, reference=train_set)
    booster = lightgbm.train(
        dict(params),
        train_set,
        num_boost_round=int(num_boost_round),
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lightgbm.early_stopping(int(early_stopping_rounds), verbose=False)],
    )
    Path(model_file).parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(model_file, num_iteration=booster.best_iteration)
    summary = {
        "best_iteration": int(booster.best_iteration),
        "train_cases": len(train_records),
        "validation_cases": len(validation_records),
    }
    logger.info("saved booster %s: %s", model_file, summary)
    return summary


class FeatureBoosterPredictor(PredictorTemplate):
    """Boosters over :func:`lesion_features` at the click: the same features the ``extract`` stage caches."""

    def __init__(self, ensemble, radius: float, **kwargs):
        super().__init__(ensemble, **kwargs)
        self.radius = float(radius)

    def model_inputs(self, context: Context) -> tuple[torch.Tensor]:
        image = context.images[self.inputs.primary.name]
        return (torch.as_tensor(lesion_features(image, context.center_index, self.radius))[None],)

    def result(self, output: torch.Tensor, model_inputs, context: Context) -> dict[str, Any]:
        result = self.class_result(output)
        result["features"] = dict(zip(FEATURE_NAMES, map(float, model_inputs[0][0]), strict=True))
        return result


# -- synthetic studies -----------------------------------------------------------------------------------
def _save_png(path: Path, frame: np.ndarray) -> None:
    """``frame`` indexed ``[i, j]`` (column, row), as :func:`~oncofusion.io.frames.read_frame` returns it."""
    from PIL import Image

    Image.fromarray(np.clip(np.rint(frame), 0, 255).astype(np.uint8).T).save(path)


def _save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(path))


def _write_cases(
    root: Path, prefix: str, cases: list[dict], target: Target, sidecar_keys: Sequence[str]
) -> Path:
    """Folds (patient-grouped, stratified), one sidecar per study and ``<prefix>_manifest.json``."""
    folds = assign_folds(
        [c["patient_id"] for c in cases], [target.stratum(c) for c in cases], NUM_FOLDS, seed=0
    )
    sidecars = root / "datastore" / "sidecars"
    sidecars.mkdir(parents=True, exist_ok=True)
    for case, fold in zip(cases, folds, strict=True):
        case["fold"] = fold
        sidecar = {"patient_id": case["patient_id"], **{k: case[k] for k in sidecar_keys}}
        (sidecars / f"{case['case_id']}.json").write_text(json.dumps(sidecar))
    manifest = root / f"{prefix}_manifest.json"
    manifest.write_text(
        json.dumps(
            {"description": f"synthetic {prefix} studies", "num_folds": NUM_FOLDS, "cases": cases}, indent=1
        )
    )
    return manifest


def write_frame_cases(
    root: Path, num_cases: int = 24, seed: int = 0, size: tuple[int, int] = (40, 32)
) -> Path:
    """PNG frames ``(W, H)`` = ``size`` with a 7x7 blob at ``center_ijk``, bright (label 1) or dim (0), and
    a decoy blob of the other brightness elsewhere: only a model that reads the clicked patch can tell.
    Returns the manifest (``image`` relative to it, ``blob``, ``center_ijk``, ``center_mm``)."""
    rng = np.random.default_rng(seed)
    datastore = Path(root) / "datastore"
    datastore.mkdir(parents=True, exist_ok=True)
    cases = []
    for n in range(num_cases):
        label = n % 2
        frame = rng.normal(30.0, 6.0, size)
        left = (int(rng.integers(5, size[0] // 2 - 4)), int(rng.integers(5, size[1] - 5)))
        right = (int(rng.integers(size[0] // 2 + 4, size[0] - 5)), int(rng.integers(5, size[1] - 5)))
        lesion, decoy = (left, right) if rng.random() < 0.5 else (right, left)
        for (i, j), value in ((lesion, (80.0, 200.0)[label]), (decoy, (200.0, 80.0)[label])):
            frame[i - 3 : i + 4, j - 3 : j + 4] = value + rng.normal(0.0, 6.0, (7, 7))
        case_id = f"frame_{n:03d}"
        path = datastore / f"{case_id}.png"
        _save_png(path, frame)
        affine = read_image(path, "frame").affine.numpy()
        cases.append(
            {
                "case_id": case_id,
                "patient_id": f"P-{case_id}",
                "image": f"datastore/{case_id}.png",
                "blob": label,
                "center_ijk": list(lesion),
                "center_mm": voxel_to_world(affine, np.asarray([lesion], float))[0].tolist(),
                "decoy_ijk": list(decoy),
            }
        )
    from oncofusion.targets import BinaryTarget

    return _write_cases(Path(root), "frame", cases, BinaryTarget(key="blob"), ("blob", "center_ijk"))


VOLUME_AFFINE = np.array(
    [[-1.5, 0.0, 0.0, 12.0], [0.0, -1.5, 0.0, 9.0], [0.0, 0.0, 2.0, -20.0], [0, 0, 0, 1.0]]
)


def write_survival_cases(
    root: Path, num_cases: int = 16, seed: int = 0, shape: tuple[int, int, int] = (16, 16, 12)
) -> Path:
    """Volumes whose central cube brightens with a latent risk ``x``; survival times are exponential with
    hazard ``exp(3 x)``, right-censored at a uniform time. Returns the manifest (``os_months``, ``death``)."""
    from oncofusion.targets import SurvivalTarget

    rng = np.random.default_rng(seed)
    datastore = Path(root) / "datastore"
    datastore.mkdir(parents=True, exist_ok=True)
    cases = []
    for n in range(num_cases):
        x = (n + rng.random()) / num_cases
        volume = rng.normal(100.0, 10.0, shape)
        c = [s // 2 for s in shape]
        volume[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 2 : c[2] + 2] += 600.0 * x
        event_time = rng.exponential(30.0 / np.exp(3.0 * x))
        censor_time = rng.uniform(8.0, 60.0) if n % 3 else 0.5 * event_time  # every third one censored
        time = max(round(float(min(event_time, censor_time)), 2), 0.1)
        case_id = f"cox_{n:03d}"
        _save_nifti(datastore / f"{case_id}.nii.gz", volume, VOLUME_AFFINE)
        cases.append(
            {
                "case_id": case_id,
                "patient_id": f"P-{case_id}",
                "image": f"datastore/{case_id}.nii.gz",
                "os_months": time,
                "death": int(event_time <= censor_time),
                "latent_risk": round(x, 4),
            }
        )
    target = SurvivalTarget(time_key="os_months", event_key="death")
    return _write_cases(Path(root), "cox", cases, target, ("os_months", "death"))


def write_lesion_cases(
    root: Path, num_cases: int = 32, seed: int = 0, shape: tuple[int, int, int] = (20, 20, 16)
) -> Path:
    """Volumes with a ball of radius 3 voxels at ``center_ijk``: on average brighter and more heterogeneous
    when malignant (``diagnosis`` 1) than when benign, with overlap. Returns the manifest."""
    from oncofusion.targets import BinaryTarget

    rng = np.random.default_rng(seed)
    datastore = Path(root) / "datastore"
    datastore.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    cases = []
    for n in range(num_cases):
        label = n % 2
        center = [int(rng.integers(5, s - 5)) for s in shape]
        volume = rng.normal(100.0, 15.0, shape)
        ball = np.linalg.norm(grid - center, axis=-1) <= 3.0
        mean = rng.normal((220.0, 270.0)[label], 15.0)
        volume[ball] = rng.normal(mean, rng.uniform(15.0, 35.0), int(ball.sum()))
        case_id = f"lesion_{n:03d}"
        _save_nifti(datastore / f"{case_id}.nii.gz", volume, VOLUME_AFFINE)
        cases.append(
            {
                "case_id": case_id,
                "patient_id": f"P-{case_id}",
                "image": f"datastore/{case_id}.nii.gz",
                "diagnosis": label,
                "center_ijk": center,
                "center_mm": voxel_to_world(VOLUME_AFFINE, np.asarray([center], float))[0].tolist(),
            }
        )
    return _write_cases(
        Path(root), "lesion", cases, BinaryTarget(key="diagnosis"), ("diagnosis", "center_ijk")
    )


# -- bundles ---------------------------------------------------------------------------------------------
def _metadata(
    name: str,
    task: str,
    description: str,
    data_type: str,
    image_classes: str,
    label_classes: str,
    pred_classes: str,
    network_data_format: dict,
    packages: Mapping[str, str] | None = None,
) -> dict:
    import nibabel
    import scipy

    return {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": "fixture bundle built by tests/fixture_bundles.py"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "oncofusion": "0.1.0",
            "nibabel": nibabel.__version__,
            "scipy": scipy.__version__,
            **dict(packages or {}),
        },
        "optional_packages_version": {"monailabel": "0.8.5"},
        "name": name,
        "task": task,
        "description": description,
        "authors": "OncoFusion contributors",
        "copyright": "Copyright (c) OncoFusion contributors",
        "data_source": "SYNTHETIC studies written by tests/fixture_bundles.py; no patient data",
        "data_type": data_type,
        "image_classes": image_classes,
        "label_classes": label_classes,
        "pred_classes": pred_classes,
        "intended_use": "Testing the bundle contract only.",
        "references": [],
        "network_data_format": network_data_format,
    }


def _tensor(fmt: str, channels: int, shape: list, value_range: list, **extra: Any) -> dict:
    return {
        "type": extra.pop("type", "image"),
        "format": fmt,
        "num_channels": channels,
        "spatial_shape": shape,
        "dtype": "float32",
        "value_range": value_range,
        **extra,
    }


def _write_bundle(bundles_dir: Path, name: str, configs: Mapping[str, dict]) -> Path:
    bundle = Path(bundles_dir) / name
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    for file, content in configs.items():
        (bundle / "configs" / f"{file}.json").write_text(json.dumps(content, indent=2))
    return bundle


IMPORTS = [
    "$import json",
    "$import os",
    "$import torch",
    "$import monai",
    "$import oncofusion",
    "$import oncofusion.contract",
    "$import oncofusion.data.manifest",
    "$import oncofusion.ensemble",
    "$import oncofusion.evaluation.predict",
    "$import oncofusion.evaluation.registry",
    "$import oncofusion.targets",
    "$import tests.fixture_bundles as fixtures",
]
COMMON = {
    "imports": IMPORTS,
    "bundle_root": ".",
    "datalist_file": "$@bundle_root + '/manifest.json'",
    "ckpt_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/runs'",
    "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
}
MODEL_VERSION = "$json.load(open(os.path.join(@bundle_root, 'configs', 'metadata.json')))['version']"


def _inputs(reader: str, prompt: list[str], description: str) -> dict:
    return {
        "_target_": "oncofusion.contract.InputSpec",
        "images": [
            {
                "_target_": "oncofusion.contract.ImageInput",
                "name": "image",
                "reader": reader,
                "description": description,
            }
        ],
        "prompt": prompt,
    }


def _evaluate(num_bootstrap: int = 200) -> dict:
    """Out-of-fold predictions of the served predictor and the report its target calls for."""
    return {
        "out_of_fold": True,
        "num_bootstrap": num_bootstrap,
        "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target, folds=@ensemble.fold_ids if "
        "@out_of_fold else None)",
        "predictions": "$oncofusion.evaluation.predict.predict_datalist(@predictor, @datalist, "
        "os.path.join(@output_dir, 'predictions.json'), out_of_fold=@out_of_fold)",
        "data_description": "$('out-of-fold predictions (folds ' + str(@ensemble.fold_ids) + ') of ' if "
        "@out_of_fold else 'fold-ensemble predictions of ') + os.path.abspath(@datalist_file)",
        "run": [
            "$oncofusion.evaluation.registry.evaluate(@target, @predictions, @output_dir, @data_description, "
            "@predictor.score_key, @num_bootstrap)"
        ],
    }


def _plan(stages: list[dict]) -> dict:
    return {"num_folds": NUM_FOLDS, "stages": stages, "variants": {"default": []}}


def _torch_training(
    preprocessing: list,
    loss: dict | str,
    batch_size: int,
    learning_rate: float,
    max_epochs: int,
    validation: bool,
    shared: Sequence[str] = (),
) -> dict:
    """A MONAI ``SupervisedTrainer`` over the training folds: with ``validation`` the checkpoint is the
    best validation AUROC on the inner split, else the last epoch's. ``shared``: ids copied from
    ``inference.json`` (sizes its network and preprocessing read)."""
    part = ", part='train', validation_fraction=@validation_fraction, seed=@seed" if validation else ""
    dataset = {"_target_": "CacheDataset", "cache_rate": 1.0, "num_workers": 0, "progress": False}
    save_dir = "$os.path.join(@ckpt_dir, 'fold' + str(@fold))"
    config: dict[str, Any] = {
        **COMMON,
        "fold": 0,
        "seed": 0,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "validation_fraction": 0.25,
        **{key: f"%configs/inference.json#{key}" for key in shared},
        "target": "%configs/inference.json#target",
        "reader": "%configs/inference.json#inputs#images#0#reader",
        "network_def": "%configs/inference.json#network_def",
        "network": "$@network_def.to(@device)",
        "loss": loss,
        "optimizer": {
            "_target_": "torch.optim.Adam",
            "params": "$@network.parameters()",
            "lr": "@learning_rate",
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "oncofusion.transforms.io.ReadImaged", "keys": "image", "kind": "@reader"},
                *preprocessing,
                {"_target_": "Lambda", "func": "$lambda d: {**d, 'label': @target.to_tensor(d)}"},
                {"_target_": "SelectItemsd", "keys": ["image", "label"]},
            ],
        },
        "train": {
            "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target, exclude_folds=[@fold]"
            + part
            + ")",
            "dataset": {**dataset, "data": "@train#datalist", "transform": "@preprocessing"},
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": "@batch_size",
                "shuffle": True,
                "num_workers": 0,
            },
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": "@max_epochs",
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "loss_function": "@loss",
                "optimizer": "@optimizer",
                "train_handlers": "@train#handlers",
                "amp": False,
            },
        },
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@train#trainer.run()"],
    }
    if not validation:
        config["train"]["handlers"] = [
            {
                "_target_": "CheckpointSaver",
                "save_dir": save_dir,
                "save_dict": {"model": "@network"},
                "save_final": True,
                "final_filename": "model.pt",
            }
        ]
        return config
    config["train"]["handlers"] = [
        {
            "_target_": "ValidationHandler",
            "validator": "@validate#evaluator",
            "epoch_level": True,
            "interval": 1,
        }
    ]
    config["validate"] = {
        "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target, exclude_folds=[@fold], "
        "part='validation', validation_fraction=@validation_fraction, seed=@seed)",
        "dataset": {**dataset, "data": "@validate#datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": "@batch_size",
            "shuffle": False,
            "num_workers": 0,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "label", "to_onehot": "$@target.num_outputs"},
            ],
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": {
                "val_auc": {
                    "_target_": "ROCAUC",
                    "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                }
            },
            "val_handlers": [
                {
                    "_target_": "CheckpointSaver",
                    "save_dir": save_dir,
                    "save_dict": {"model": "@network"},
                    "save_key_metric": True,
                    "key_metric_filename": "model.pt",
                }
            ],
            "amp": False,
        },
    }
    return config


FRAME_PATCH = 16


def build_frame_bundle(bundles_dir: Path, name: str = FRAME_BUNDLE) -> Path:
    """The 2D classifier: a 16x16 patch of the PNG frame around a 2D click, a MONAI ``Classifier``."""
    inference = {
        **COMMON,
        "patch_size": FRAME_PATCH,
        "target": {
            "_target_": "oncofusion.targets.BinaryTarget",
            "key": "blob",
            "class_names": ["dim", "bright"],
        },
        "inputs": _inputs("frame", ["points", "box"], "grey-scale 2D frame (PNG)"),
        "network_def": {
            "_target_": "monai.networks.nets.Classifier",
            "in_shape": [1, "@patch_size", "@patch_size"],
            "classes": "$@target.num_outputs",
            "channels": [4, 8],
            "strides": [2, 2],
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "tests.fixture_bundles.CropAroundd", "keys": "image", "size": "@patch_size"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": 0.0,
                    "a_max": 255.0,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "checkpoints": "$oncofusion.ensemble.fold_checkpoints(@ckpt_dir)",
        "ensemble": {
            "_target_": "oncofusion.ensemble.Ensemble",
            "network": "@network_def",
            "checkpoints": "@checkpoints",
            "aggregation": "mean_probability",
            "device": "@device",
        },
        "predictor": {
            "_target_": "tests.fixture_bundles.PatchClassifierPredictor",
            "ensemble": "@ensemble",
            "preprocessing": "@preprocessing",
            "patch_size": "@patch_size",
            "inputs": "@inputs",
            "class_names": "@target#class_names",
            "model_version": MODEL_VERSION,
            "device": "@device",
        },
        "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target)",
        "run": [
            "$oncofusion.evaluation.predict.predict_datalist(@predictor, @datalist, "
            "os.path.join(@output_dir, 'predictions.json'))"
        ],
    }
    train = _torch_training(
        ["%configs/inference.json#preprocessing"],
        "$@target.default_loss()",
        batch_size=4,
        learning_rate=0.01,
        max_epochs=8,
        validation=True,
        shared=["patch_size"],
    )
    metadata = _metadata(
        "Bright vs dim blob on a 2D frame (fixture)",
        "Binary classification of the clicked blob on a 2D frame",
        "A 16x16 patch of a grey-scale PNG frame around a 2D click, scaled from [0, 255] to [0, 1], classified "
        "by a two-layer MONAI Classifier; the mean probability of the fold models, and the patch's footprint "
        "as a label.",
        "png",
        "grey-scale 2D frame (C, W, H), values 0-255",
        "0 = dim blob, 1 = bright blob",
        "2 logits: dim, bright",
        {
            "inputs": {
                "image": _tensor(
                    "magnitude",
                    1,
                    [FRAME_PATCH, FRAME_PATCH],
                    [0, 1],
                    is_patch_data=True,
                    channel_def={"0": "grey level / 255"},
                )
            },
            "outputs": {
                "pred": _tensor("classes", 2, [1], [], type="logits", channel_def={"0": "dim", "1": "bright"})
            },
        },
    )
    plan = _plan([{"name": "train", "config_file": ["configs/train.json"], "per_fold": True}])
    return _write_bundle(
        bundles_dir,
        name,
        {"metadata": metadata, "inference": inference, "train": train, "evaluate": _evaluate(), "plan": plan},
    )


COX_SHAPE = 16


def build_cox_bundle(bundles_dir: Path, name: str = COX_BUNDLE) -> Path:
    """The whole-image Cox model: the volume resized to 16^3, a MONAI ``Regressor`` giving a log-hazard."""
    inference = {
        **COMMON,
        "input_size": COX_SHAPE,
        "target": {
            "_target_": "oncofusion.targets.SurvivalTarget",
            "time_key": "os_months",
            "event_key": "death",
            "time_unit": "months",
        },
        "inputs": _inputs("volume", [], "3D scan, read whole"),
        "network_def": {
            "_target_": "monai.networks.nets.Regressor",
            "in_shape": [1, "@input_size", "@input_size", "@input_size"],
            "out_shape": ["$@target.num_outputs"],
            "channels": [4, 8],
            "strides": [2, 2],
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "Resized",
                    "keys": "image",
                    "spatial_size": ["@input_size", "@input_size", "@input_size"],
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": 0.0,
                    "a_max": 1000.0,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "checkpoints": "$oncofusion.ensemble.fold_checkpoints(@ckpt_dir)",
        "ensemble": {
            "_target_": "oncofusion.ensemble.Ensemble",
            "network": "@network_def",
            "checkpoints": "@checkpoints",
            "aggregation": "mean_log_hazard",
            "device": "@device",
        },
        "predictor": {
            "_target_": "tests.fixture_bundles.WholeImageRiskPredictor",
            "ensemble": "@ensemble",
            "preprocessing": "@preprocessing",
            "inputs": "@inputs",
            "model_version": MODEL_VERSION,
            "device": "@device",
        },
        "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target)",
        "run": [
            "$oncofusion.evaluation.predict.predict_datalist(@predictor, @datalist, "
            "os.path.join(@output_dir, 'predictions.json'))"
        ],
    }
    train = _torch_training(
        ["%configs/inference.json#preprocessing"],
        {"_target_": "oncofusion.losses.survival.CoxPartialLikelihoodLoss"},
        batch_size=16,
        learning_rate=0.01,
        max_epochs=3,
        validation=False,
        shared=["input_size"],
    )
    metadata = _metadata(
        "Whole-volume Cox model (fixture)",
        "Overall survival risk from a whole 3D volume",
        "The whole volume resized to 16^3 and scaled from [0, 1000] to [0, 1]; a MONAI Regressor gives one "
        "log-hazard, trained with the negative Cox partial likelihood. The risk is the mean of the fold models' "
        "log-hazards (higher = shorter survival), never a probability.",
        "nibabel",
        "single-channel 3D volume, any spacing",
        "os_months (time to death or last contact), death (1 event, 0 censored)",
        "1 log-hazard",
        {
            "inputs": {
                "image": _tensor(
                    "magnitude",
                    1,
                    [COX_SHAPE] * 3,
                    [0, 1],
                    is_patch_data=False,
                    channel_def={"0": "intensity / 1000"},
                )
            },
            "outputs": {
                "pred": _tensor("hazard", 1, [1], [], type="log-hazard", channel_def={"0": "log-hazard"})
            },
        },
    )
    plan = _plan([{"name": "train", "config_file": ["configs/train.json"], "per_fold": True}])
    return _write_bundle(
        bundles_dir,
        name,
        {"metadata": metadata, "inference": inference, "train": train, "evaluate": _evaluate(), "plan": plan},
    )


BOOSTER_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.1,
    "num_leaves": 4,
    "min_data_in_leaf": 3,
    "min_data_in_bin": 1,
    "lambda_l2": 10.0,
    "num_threads": 1,
    "deterministic": True,
    "seed": 0,
    "verbose": -1,
}


def build_booster_bundle(bundles_dir: Path, name: str = BOOSTER_BUNDLE) -> Path:
    """LightGBM over fixed features: stage ``extract`` (``configs/extract.json``) caches the features once,
    stage ``fit`` (``configs/train.json``, the config the app looks for) trains one booster per fold."""
    inference = {
        **COMMON,
        "feature_radius": 3.0,
        "target": {
            "_target_": "oncofusion.targets.BinaryTarget",
            "key": "diagnosis",
            "class_names": ["benign", "malignant"],
        },
        "inputs": _inputs("volume", ["points", "box", "mask"], "3D scan of the lesion"),
        "checkpoints": "$oncofusion.ensemble.fold_checkpoints(@ckpt_dir, 'model.txt')",
        "ensemble": {
            "_target_": "oncofusion.ensemble.Ensemble",
            "member": "lightgbm",
            "checkpoints": "@checkpoints",
            "aggregation": "mean_probability",
            "device": "@device",
        },
        "predictor": {
            "_target_": "tests.fixture_bundles.FeatureBoosterPredictor",
            "ensemble": "@ensemble",
            "radius": "@feature_radius",
            "inputs": "@inputs",
            "class_names": "@target#class_names",
            "model_version": MODEL_VERSION,
            "device": "@device",
        },
        "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target)",
        "run": [
            "$oncofusion.evaluation.predict.predict_datalist(@predictor, @datalist, "
            "os.path.join(@output_dir, 'predictions.json'))"
        ],
    }
    extract = {
        **COMMON,
        "target": "%configs/inference.json#target",
        "feature_radius": "%configs/inference.json#feature_radius",
        "reader": "%configs/inference.json#inputs#images#0#reader",
        "feature_cache": "$os.path.join(@output_dir, 'features.json')",
        "datalist": "$oncofusion.data.manifest.datalist(@datalist_file, @target)",
        "run": ["$fixtures.extract_features(@datalist, @feature_cache, @feature_radius, @reader)"],
    }
    fit = {
        **COMMON,
        "fold": 0,
        "seed": 0,
        "validation_fraction": 0.25,
        "target": "%configs/inference.json#target",
        "feature_cache": "%configs/extract.json#feature_cache",
        "booster_params": BOOSTER_PARAMS,
        "num_boost_round": 60,
        "early_stopping_rounds": 10,
        "train_records": "$oncofusion.data.manifest.datalist(@datalist_file, @target, exclude_folds=[@fold], "
        "part='train', validation_fraction=@validation_fraction, seed=@seed)",
        "validation_records": "$oncofusion.data.manifest.datalist(@datalist_file, @target, exclude_folds=[@fold], "
        "part='validation', validation_fraction=@validation_fraction, seed=@seed)",
        "model_file": "$os.path.join(@ckpt_dir, 'fold' + str(@fold), 'model.txt')",
        "run": [
            "$fixtures.fit_booster(@feature_cache, @train_records, @validation_records, @target, "
            "@booster_params, @num_boost_round, @early_stopping_rounds, @model_file)"
        ],
    }
    import lightgbm

    metadata = _metadata(
        "Lesion intensity features + LightGBM (fixture)",
        "Benign vs malignant lesion from intensity features",
        "Five intensity statistics of the ball of radius 3 voxels around the click and of its shell (computed "
        "once for every case by the 'extract' stage), classified by one LightGBM booster per fold, early-stopped "
        "on the inner validation split; the mean of the boosters' probabilities.",
        "nibabel",
        "single-channel 3D volume, any spacing",
        "0 = benign, 1 = malignant",
        "booster log-odds of malignant",
        {
            "inputs": {
                "features": _tensor(
                    "features",
                    len(FEATURE_NAMES),
                    [],
                    [],
                    type="tabular",
                    is_patch_data=False,
                    channel_def=dict(enumerate(FEATURE_NAMES)),
                )
            },
            "outputs": {
                "pred": _tensor("classes", 1, [1], [], type="log-odds", channel_def={"0": "malignant"})
            },
        },
        packages={"lightgbm": lightgbm.__version__},
    )
    plan = _plan(
        [
            {"name": "extract", "config_file": ["configs/extract.json"], "per_fold": False},
            {"name": "fit", "config_file": ["configs/train.json"], "per_fold": True},
        ]
    )
    return _write_bundle(
        bundles_dir,
        name,
        {
            "metadata": metadata,
            "inference": inference,
            "extract": extract,
            "train": fit,
            "evaluate": _evaluate(),
            "plan": plan,
        },
    )


#: bundle name -> (bundle builder, data writer)
FIXTURES = {
    FRAME_BUNDLE: (build_frame_bundle, write_frame_cases),
    COX_BUNDLE: (build_cox_bundle, write_survival_cases),
    BOOSTER_BUNDLE: (build_booster_bundle, write_lesion_cases),
}


def bundle_parser(bundle: Path, *files: str, **overrides: Any):
    """The bundle's configs (``files`` under ``configs/``) parsed in-process, ``bundle_root`` set, overridden."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(Path(bundle) / "configs" / f) for f in files])
    parser["bundle_root"] = str(bundle)
    parser["device"] = torch.device("cpu")
    for key, value in overrides.items():
        parser[key] = value
    return parser
