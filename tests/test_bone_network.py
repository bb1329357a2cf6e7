"""SC-Net / S-Net: shapes, the attention switch, one code path for both variants, the fused model
really reading the clinical vector, the multi-input I/O check against the metadata, and the explainers."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from oncofusion.explain.attribution import field_contributions, integrated_gradients
from oncofusion.explain.gradcam import gradcam_map, heat_levels
from oncofusion.models.bone_scnet.network import CBAM, SCNet, attention_block
from oncofusion.networks.trainable import TrainableWeights
from tests.bone_helpers import BONE_BUNDLE, bone_bundle_config

torch.set_num_threads(1)


@pytest.mark.parametrize("attention", ["none", "se", "cbam"])
@pytest.mark.parametrize("fusion", [True, False])
def test_shapes_for_every_attention_and_variant(attention, fusion):
    torch.manual_seed(0)
    net = SCNet(attention=attention, fusion=fusion).eval()
    image, clinical = torch.rand(2, 1, 24, 24, 24), torch.rand(2, 11)
    logits = net(image, clinical) if fusion else net(image)
    assert logits.shape == (2, 2)
    assert (net.clinical_encoder is not None) == fusion


def test_two_and_a_half_d_and_blocks_keep_shapes():
    net = SCNet(spatial_dims=2, in_channels=5, fusion=False).eval()
    assert net(torch.rand(3, 5, 32, 32)).shape == (3, 2)
    x = torch.rand(2, 8, 6, 6, 6)
    assert CBAM(3, 8)(x).shape == x.shape and attention_block("se", 3, 8)(x).shape == x.shape
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_block("transformer", 3, 8)


def test_fused_model_uses_the_clinical_input():
    torch.manual_seed(0)
    net = SCNet(fusion=True).eval()
    image = torch.rand(1, 1, 24, 24, 24)
    young = torch.tensor([[0, 1, 0.15, 0, 1, 0, 0, 0, 0, 1, 0]], dtype=torch.float32)
    old = torch.tensor([[1, 0, 0.70, 0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(net(image, young), net(image, old))
        gradient_free = net(image, young)
    clinical = young.clone().requires_grad_(True)
    net(image, clinical)[0, 1].backward()
    assert clinical.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the clinical vector"):
        net(image)
    with pytest.raises(ValueError, match=r"clinical vector of shape \(1, 5\)"):
        net(image, torch.rand(1, 5))
    # the image-only variant from the same code path ignores a clinical vector entirely
    image_only = net.variant(fusion=False).eval()
    assert image_only.config == {**net.config, "fusion": False}
    with torch.no_grad():
        assert torch.equal(image_only(image), image_only(image, young))
    assert gradient_free.shape == (1, 2)


def test_multi_input_network_matches_the_metadata():
    """What ``verify_net_in_out`` checks, for the two-input fused network it cannot call."""
    metadata = json.loads((BONE_BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]
    parser = bone_bundle_config("inference.json")
    net = parser.get_parsed_content("network_def").eval()
    image_spec, clinical_spec = metadata["inputs"]["image"], metadata["inputs"]["clinical"]
    image = torch.rand(2, image_spec["num_channels"], *image_spec["spatial_shape"])
    clinical = torch.rand(2, clinical_spec["num_channels"])
    with torch.no_grad():
        logits = net(image, clinical)
    assert logits.shape == (2, metadata["outputs"]["pred"]["num_channels"])
    assert logits.dtype == getattr(torch, metadata["outputs"]["pred"]["dtype"])
    schema = parser.get_parsed_content("clinical_schema")
    assert len(clinical_spec["channel_def"]) == schema.size
    for index in (0, 1, 3, 4, 8, 10):  # the one-hot and missing-indicator columns are named as the schema names them
        assert clinical_spec["channel_def"][str(index)] == schema.columns[index]
    assert parser.get_parsed_content("crop_voxels") == image_spec["spatial_shape"][0]


def test_train_and_inference_configs_agree():
    """The target and the clinical fields are written once (train.json takes them from inference.json by
    macro); the network and the crop are written in both and must not drift apart."""
    train = json.loads((BONE_BUNDLE / "configs" / "train.json").read_text())
    inference = json.loads((BONE_BUNDLE / "configs" / "inference.json").read_text())
    for key in ("target", "clinical_fields"):
        assert train[key] == f"%configs/inference.json#{key}", key
    assert train["class_names"] == inference["class_names"] == "@target#class_names"
    for key in ("network_def", "crop_voxels", "crop_spacing_mm", "bone_window", "padding_hu", "fusion", "attention",
                "hu_range"):
        assert train[key] == inference[key], key


def test_checkpoint_is_small():
    buffer = io.BytesIO()
    torch.save(TrainableWeights(SCNet()).state_dict(), buffer)
    assert buffer.tell() < 400_000  # ten checkpoints (5 folds x 2 variants) stay a few MB


def test_integrated_gradients_are_complete_per_field():
    torch.manual_seed(1)
    net = SCNet(fusion=True).eval()
    features = net.image_features(torch.rand(1, 1, 24, 24, 24)).detach()

    def log_odds(vectors: torch.Tensor) -> torch.Tensor:
        logits = net.fuse(features.expand(vectors.shape[0], -1), vectors)
        return logits[:, 1] - logits[:, 0]

    x = torch.tensor([0, 1, 0.15, 0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.float32)
    baseline = torch.tensor([0, 0, 0.4, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.float32)
    attributions = integrated_gradients(log_odds, x, baseline, steps=64)
    with torch.no_grad():
        gap = float(log_odds(x[None]) - log_odds(baseline[None]))
    assert float(attributions.sum()) == pytest.approx(gap, abs=0.02 * max(1.0, abs(gap)))
    per_field = field_contributions(attributions, {"sex": slice(0, 2), "age": slice(2, 3), "rest": slice(3, 11)})
    assert sum(per_field.values()) == pytest.approx(float(attributions.sum()), abs=1e-5)
    assert integrated_gradients(log_odds, baseline, baseline).abs().sum() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        integrated_gradients(log_odds, x, baseline[:3])


def test_gradcam_map_and_levels():
    torch.manual_seed(2)
    members = [SCNet(fusion=True).eval(), SCNet(fusion=True).eval()]
    image = torch.rand(1, 1, 24, 24, 24)
    heat = gradcam_map(members, image, "image_encoder.resnet.layer3", 1, clinical=torch.rand(1, 11))
    assert heat.shape == (24, 24, 24) and heat.min() >= 0 and heat.max() <= 1
    assert all(not m.training for m in members)
    levels = heat_levels(np.array([0.1, 0.45, 0.65, 0.95]), (0.4, 0.6, 0.8))
    assert levels.tolist() == [0, 1, 2, 3] and levels.dtype == np.uint8
