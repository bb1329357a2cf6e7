"""Checkpoints keep only trained weights; the frozen pretrained encoder comes back from its source."""

import pytest
import torch

from oncofusion.models.lung_nodule.network import NoduleCLIP
from oncofusion.networks.towers import ConvImageTower, HFTextTower
from oncofusion.networks.trainable import TrainableWeights, load_trainable_state, trainable_keys
from tests.tiny_models import save_tiny_clip


def _network(clip_dir: str) -> NoduleCLIP:
    return NoduleCLIP(ConvImageTower(out_features=32, channels=(4, 4, 8, 8)), HFTextTower(clip_dir, tuning="lora"))


def test_trainable_checkpoint_round_trip_restores_outputs(tmp_path):
    clip_dir = str(save_tiny_clip(tmp_path / "clip"))
    torch.manual_seed(0)
    trained = _network(clip_dir)
    with torch.no_grad():
        for _name, parameter in trained.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    state = TrainableWeights(trained).state_dict()
    assert all("base_layer" not in key and "token_embedding" not in key for key in state)
    assert any("lora_A" in key for key in state) and "image_head.weight" in state
    assert len(state) < len(trained.state_dict())
    torch.save(state, tmp_path / "model.pt")

    restored = _network(clip_dir)
    load_trainable_state(restored, torch.load(tmp_path / "model.pt", weights_only=True))
    trained.eval(), restored.eval()
    views = torch.rand(2, 9, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(views), trained(views))
        torch.testing.assert_close(restored.encode_text(["solid nodule"]), trained.encode_text(["solid nodule"]))


def test_a_checkpoint_missing_trained_weights_is_refused(tmp_path):
    network = _network(str(save_tiny_clip(tmp_path / "clip")))
    state = TrainableWeights(network).state_dict()
    state.pop("image_head.weight")
    with pytest.raises(RuntimeError, match="missing trainable"):
        load_trainable_state(network, state)
    assert "image_head.weight" in trainable_keys(network)
