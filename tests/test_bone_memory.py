"""Bone predictions hold no memory once answered (the server grew from 1.4 to 3.8 GB over 200 requests).

The cause was Grad-CAM: MONAI's ``GradCAM`` registers a forward and a backward hook on the served
model's target layer each time it is built and never removes them, and its ``ModelWithHooks`` wrapper
keeps the class score, whose autograd graph holds those hooks, which hold the wrapper: a cycle the
garbage collector cannot see through. Each request left two more hooks (each run on every later forward)
and a wrapper with its activations and graph. These tests count what accumulated rather than RSS, so
they are exact and fast.
"""

from __future__ import annotations

import gc

import pytest
import torch
from monai.visualize.class_activation_maps import ModelWithHooks

from oncofusion.contract import Roi
from oncofusion.models.bone_scnet.network import SCNet
from oncofusion.networks.trainable import TrainableWeights
from tests.bone_helpers import blob_image, bone_bundle_config

FIELDS = {"sex": "male", "age": 14, "location": "metaphysis", "fracture": "no"}
BLOB = (20, 18, 15)
REQUESTS = 3
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    """The bundle's own predictor config over two random fold checkpoints, as the server builds it."""
    root = tmp_path_factory.mktemp("bone_ckpt")
    for fold in (0, 1):
        torch.manual_seed(fold)
        path = root / f"fold{fold}" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": TrainableWeights(SCNet(fusion=True)).state_dict()}, path)
    return bone_bundle_config("inference.json", ckpt_dir=str(root), device="cpu").get_parsed_content("predictor")


def _predict(predictor) -> None:
    prediction = predictor.predict({"image": blob_image(blob_ijk=BLOB)}, Roi(points=[BLOB]), FIELDS)
    assert "heatmap" in prediction.result  # Grad-CAM ran


def _hooks(models) -> list[int]:
    """Hooks registered anywhere in each model."""
    return [sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
            for model in models]


def _count(kind: type) -> int:
    """Instances of ``kind`` the interpreter tracks, garbage not yet collected included."""
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def test_predictions_leave_no_hooks_and_no_gradients_on_the_served_models(predictor):
    models = list(predictor.ensemble.models)
    assert _hooks(models) == [0, 0]
    for _ in range(REQUESTS):
        _predict(predictor)
    assert _hooks(models) == [0, 0]
    assert all(p.grad is None for model in models for p in model.parameters())
    assert not any(model.training for model in models)


def test_a_prediction_frees_what_it_built_without_waiting_for_the_garbage_collector(predictor):
    """Reference counting alone must free each request's Grad-CAM wrappers, model copies and tensors:
    a server runs full garbage collections too rarely, and cycles holding tensors piled up between them
    (45 MB per bone request)."""
    _predict(predictor)  # first-call allocations (MONAI lazy imports, caches) happen here
    gc.collect()
    counts = {kind: _count(kind) for kind in (ModelWithHooks, SCNet, torch.Tensor)}
    gc.disable()
    try:
        for _ in range(REQUESTS):
            _predict(predictor)
        after = {kind: _count(kind) for kind in counts}
    finally:
        gc.enable()
    assert after[ModelWithHooks] == 0
    assert after[SCNet] == counts[SCNet]
    assert after[torch.Tensor] <= counts[torch.Tensor]
