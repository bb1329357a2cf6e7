"""Towers load through the real code path; LoRA leaves base weights frozen; the model's shapes."""

import pytest
import torch

from oncofusion.models.lung_nodule.network import ContrastiveOutput, NoduleCLIP
from oncofusion.networks.towers import ConvImageTower, HFImageTower, HFTextTower, packaged_minilm_path
from tests.tiny_models import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny_clip")))


def _lora_split(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    return trainable, frozen


def test_lora_trains_only_adapters_on_qkv_and_base_weights_stay_put(tiny_clip):
    tower = HFImageTower(tiny_clip, tuning="lora", lora_rank=2)
    trainable, frozen = _lora_split(tower)
    assert trainable and all("lora_" in name for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj"}
    assert any("out_proj" in name for name in frozen) and any("q_proj.base_layer" in name for name in frozen)
    base_before = {n: p.detach().clone() for n, p in tower.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in tower.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        tower(torch.rand(3, 1, 32, 32)).pow(2).sum().backward()
        optimizer.step()
    for name, parameter in tower.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, base_before[name]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in tower.named_parameters() if "lora_B" in n)


def test_projection_only_and_full_tuning(tiny_clip):
    projection_only, _ = _lora_split(HFTextTower(tiny_clip, tuning="projection"))
    assert projection_only == ["encoder.text_projection.weight"]
    full, frozen = _lora_split(HFImageTower(tiny_clip, tuning="full"))
    assert full and not frozen
    with pytest.raises(ValueError, match="tuning must be one of"):
        HFImageTower(tiny_clip, tuning="most")


def test_clip_text_tower_embeds_sentences(tiny_clip):
    tower = HFTextTower(tiny_clip, tuning="lora")
    embedding = tower(["the nodule is solid.", "a spiculated margin"])
    assert embedding.shape == (2, tower.out_features) == (2, 24)


def test_packaged_minilm_gives_meaningful_sentence_embeddings():
    tower = HFTextTower(packaged_minilm_path(), tuning="lora").eval()
    with torch.no_grad():
        a, b, c = torch.nn.functional.normalize(
            tower(["The nodule has a spiculated margin.", "Spiculated nodule margin.", "The weather is sunny."]),
            dim=-1,
        )
    assert tower.out_features == 384
    assert float(a @ b) > float(a @ c) + 0.2


def test_nodule_clip_image_only_and_training_outputs(tiny_clip):
    model = NoduleCLIP(ConvImageTower(out_features=64, channels=(8, 8, 16, 16)), HFTextTower(tiny_clip))
    views = torch.rand(2, 9, 32, 32)
    logits = model(views)
    assert logits.shape == (2, 2)
    output = model(views, ["solid nodule.", "ground glass nodule."])
    assert isinstance(output, ContrastiveOutput)
    assert output.image_embedding.shape == output.text_embedding.shape == (2, 256)
    torch.testing.assert_close(output.image_embedding.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(output.attention.sum(dim=1), torch.ones(2))
    assert output.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_logit_scale_is_clamped_at_one_hundred():
    model = NoduleCLIP(ConvImageTower(out_features=16, channels=(4, 4, 8, 8)))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    with pytest.raises(RuntimeError, match="without a text tower"):
        model.encode_text(["x"])
