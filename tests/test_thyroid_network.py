"""LLNM-Net: shapes for both heads, the padding mask, missing scalars, attention maps, gradients to every
input group, the fusion really running both ways, layer counts, checkpoints, parameter count, a bundle-style
build checked against a ``network_data_format``, pretrained ViT weights, and the real packaged MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oncofusion.models.thyroid_llnm.network import BidirectionalBlock, LLNMNet
from oncofusion.networks.towers import packaged_minilm_path

torch.set_num_threads(1)

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "meta_schema_20240725.json"
SCALARS = ("aspect_ratio", "echogenicity_contrast", "capsule_distance_mm", "age", "sex")
TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64,
        "num_fusion_layers": 2, "num_joint_layers": 1, "max_text_tokens": 16, "scalar_names": SCALARS,
        "dropout": 0.0}
WORDS = ("hypoechoic nodule solid irregular margin smooth capsule near far upper middle lower lobe "
         "microcalcification shadowing taller than wide thyroid left right echoes no the a with of").split()


def save_tiny_bert(path: Path) -> Path:
    """A 2-layer BERT (hidden 24, so the projection to the fusion width is exercised) with a word vocab."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokens), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def save_tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-6)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


def build(tiny_bert: str, seed: int = 0, **changes) -> LLNMNet:
    torch.manual_seed(seed)
    return LLNMNet(**{**TINY, "text_encoder": tiny_bert, **changes}).eval()


def inputs(net: LLNMNet, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, 32, 32, generator=generator)
    texts = ["hypoechoic solid nodule with irregular margin near the capsule .", "smooth nodule"] * batch
    tokens = net.tokenize(texts[:batch])
    scalars = torch.tensor([[1.3, -12.0, 1.5, 41.0, 0.0], [0.8, -3.0, 6.0, 63.0, 1.0]] * batch)[:batch]
    return image, tokens["input_ids"], tokens["attention_mask"], scalars


@pytest.mark.parametrize("num_classes", [1, 3])
def test_output_shapes_for_binary_and_three_risk_levels(tiny_bert, num_classes):
    net = build(tiny_bert, num_classes=num_classes)
    image, ids, mask, scalars = inputs(net, batch=3)
    with torch.no_grad():
        logits = net(image, ids, mask, scalars)
        from_strings = net(image, ["hypoechoic solid nodule with irregular margin near the capsule .",
                                   "smooth nodule", "hypoechoic solid nodule with irregular margin near the "
                                   "capsule ."], None, scalars)
    assert logits.shape == (3, num_classes) and torch.isfinite(logits).all()
    torch.testing.assert_close(from_strings, logits)


def test_tokenize_truncates_to_the_limit_and_says_which(tiny_bert):
    net = build(tiny_bert)
    tokens = net.tokenize(["nodule " * 40, "smooth nodule", ""])
    assert tokens["input_ids"].shape == (3, 16) and tokens["input_ids"].dtype == torch.long
    assert tokens["truncated"].tolist() == [True, False, False]
    assert tokens["attention_mask"].sum(dim=1).tolist() == [16, 4, 2]  # [CLS] ... [SEP]; empty keeps both
    assert net.tokenize(["smooth nodule"], padding="max_length")["input_ids"].shape == (1, 16)
    with pytest.raises(TypeError, match="wrap it in a list"):
        net.tokenize("smooth nodule")


def test_padded_tokens_change_nothing(tiny_bert):
    net = build(tiny_bert)
    image, ids, mask, scalars = inputs(net)
    assert (mask[1] == 0).any()  # the short report is padded
    garbage = ids.clone()
    garbage[mask == 0] = 7
    longer_ids = torch.cat([ids, torch.full((2, 3), 9)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        reference = net(image, ids, mask, scalars)
        torch.testing.assert_close(net(image, garbage, mask, scalars), reference)
        torch.testing.assert_close(net(image, longer_ids, longer_mask, scalars), reference)
        # a real token is not ignored
        changed = ids.clone()
        changed[1, 1] = 8
        assert not torch.allclose(net(image, changed, mask, scalars), reference)


def test_missing_scalar_uses_its_own_embedding_and_never_propagates_nan(tiny_bert):
    net = build(tiny_bert)
    net.scalar_missing.requires_grad_(True)
    image, ids, mask, scalars = inputs(net)
    missing, zero = scalars.clone(), scalars.clone()
    missing[0, 3], zero[0, 3] = float("nan"), 0.0
    tokens = net.embed_scalars(missing, 2)
    torch.testing.assert_close(tokens[0, 3], net.scalar_missing[3] + net.scalar_position[0, 3])
    torch.testing.assert_close(tokens[1], net.embed_scalars(scalars, 2)[1])
    logits_missing = net(image, ids, mask, missing)
    assert torch.isfinite(logits_missing).all()
    with torch.no_grad():
        assert not torch.allclose(logits_missing[0], net(image, ids, mask, zero)[0])
        torch.testing.assert_close(logits_missing[1], net(image, ids, mask, zero)[1])
    logits_missing.sum().backward()
    for name, parameter in net.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name
    assert net.scalar_missing.grad[3].abs().sum() > 0 and net.scalar_missing.grad[0].abs().sum() == 0
    # no scalars at all means every one is missing; infinities count as missing too
    all_missing = torch.full_like(scalars, float("nan"))
    with torch.no_grad():
        torch.testing.assert_close(net(image, ids, mask, None), net(image, ids, mask, all_missing))
        torch.testing.assert_close(net(image, ids, mask, torch.full_like(scalars, float("inf"))),
                                   net(image, ids, mask, all_missing))


def test_scalars_are_standardised_by_the_configured_center_and_scale(tiny_bert):
    plain = build(tiny_bert)
    standardised = build(tiny_bert, scalar_center=[1, 0, 2, 50, 0.5], scalar_scale=[0.5, 10, 2, 15, 0.5])
    standardised.load_state_dict(plain.state_dict())
    _, _, _, scalars = inputs(plain)
    expected = (scalars - torch.tensor([1, 0, 2, 50, 0.5])) / torch.tensor([0.5, 10, 2, 15, 0.5])
    torch.testing.assert_close(standardised.embed_scalars(scalars, 2), plain.embed_scalars(expected, 2))
    with pytest.raises(ValueError, match="one per scalar"):
        build(tiny_bert, scalar_scale=[1, 1])


def test_attention_maps_cover_every_layer_with_documented_shapes(tiny_bert):
    net = build(tiny_bert, num_fusion_layers=2, num_joint_layers=3)
    image, ids, mask, scalars = inputs(net)
    with torch.no_grad():
        logits, attentions = net(image, ids, mask, scalars, return_attention=True)
        torch.testing.assert_close(logits, net(image, ids, mask, scalars))  # fused kernel == explicit path
    slices = net.token_slices(ids.shape[1])
    n = 1 + 16 + ids.shape[1] + len(SCALARS)
    assert slices["scalars"].stop == n and slices["patches"] == slice(1, 17) and slices["text"].start == 17
    assert len(attentions) == 5
    for weights in attentions:
        assert weights.shape == (2, 2, n, n)
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, n))
        padded_keys = slices["text"].start + torch.nonzero(mask[1] == 0).flatten()
        assert weights[1][..., padded_keys].abs().max() == 0
    # fusion layers: each query spends half its attention on its own stream and half on the other
    image_rows = attentions[0][:, :, : slices["text"].start]
    torch.testing.assert_close(image_rows[..., : slices["text"].start].sum(-1), torch.full((2, 2, 17), 0.5))


def test_gradients_reach_image_text_projection_and_scalar_tokens(tiny_bert):
    net = build(tiny_bert).train()
    image, ids, mask, scalars = inputs(net)
    image.requires_grad_(True)
    net(image, ids, mask, scalars).sum().backward()
    assert image.grad.abs().sum() > 0
    for module in (net.patch_embedding, net.text_projection, *net.scalar_embeddings, net.head):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    for parameter in (net.cls_token, net.image_position, net.text_position, net.scalar_position):
        assert parameter.grad.abs().sum() > 0
    # no dead weights (the authors' text output projection is never used): every trainable parameter but
    # the missing-value embeddings (no value is missing here) takes part
    dead = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None and n != "scalar_missing"]
    assert not dead
    # frozen (the default): the encoder takes no gradient and stays in eval mode while the rest trains
    assert all(p.grad is None and not p.requires_grad for p in net.text_tower.parameters())
    assert not net.text_tower.training and net.fusion_layers[0].training


def test_lora_and_full_tuning_of_the_text_encoder(tiny_bert):
    lora = build(tiny_bert, tuning="lora", lora_rank=2).train()
    trainable = [n for n, p in lora.text_tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable) and lora.text_tower.training
    image, ids, mask, scalars = inputs(lora)
    lora(image, ids, mask, scalars).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)
    full = build(tiny_bert, tuning="full")
    assert all(p.requires_grad for p in full.text_tower.parameters())


def test_bidirectional_block_runs_both_ways():
    torch.manual_seed(0)
    block = BidirectionalBlock(hidden_size=16, num_heads=2, mlp_dim=32).eval()
    image, text = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        image_out, text_out, _ = block(image, text, mask)
        _, text_from_other_image, _ = block(image + torch.randn_like(image), text, mask)
        image_from_other_text, _, _ = block(image, text + torch.randn_like(text), mask)
    assert not torch.allclose(text_from_other_image, text_out)  # text -> image attention
    assert not torch.allclose(image_from_other_text, image_out)  # image -> text attention
    # a stream alone is plain self-attention
    alone, none, weights = block(image, None, None, need_weights=True)
    assert none is None and alone.shape == image.shape and weights.shape == (2, 2, 5, 5)


def test_network_fusion_layers_mix_the_streams(tiny_bert):
    net = build(tiny_bert)
    captured = []
    net.fusion_layers[0].register_forward_hook(lambda module, args, output: captured.append(output))
    image, ids, mask, scalars = inputs(net)
    other_ids = ids.clone()
    other_ids[:, 1] = 9
    with torch.no_grad():
        net(image, ids, mask, scalars)
        net(image, other_ids, mask, scalars)
        net(image.flip(-1), ids, mask, scalars)
    (image_a, text_a, _), (image_b, _, _), (_, text_c, _) = captured
    assert not torch.allclose(image_a, image_b)  # the report reaches the image stream
    assert not torch.allclose(text_a, text_c)  # the image reaches the text stream


@pytest.mark.parametrize(("fusion", "joint"), [(0, 0), (1, 0), (0, 2), (3, 1)])
def test_layer_counts_are_configurable(tiny_bert, fusion, joint):
    net = build(tiny_bert, num_fusion_layers=fusion, num_joint_layers=joint)
    assert len(net.fusion_layers) == fusion and len(net.joint_layers) == joint
    image, ids, mask, scalars = inputs(net)
    with torch.no_grad():
        logits, attentions = net(image, ids, mask, scalars, return_attention=True)
    assert logits.shape == (2, 1) and len(attentions) == fusion + joint


@pytest.mark.parametrize("ablation", [{"use_image": False}, {"text_encoder": None}, {"scalar_names": ()},
                                      {"use_image": False, "text_encoder": None},
                                      {"text_encoder": None, "scalar_names": ()}])
def test_ablations_drop_a_modality(tiny_bert, ablation):
    net = build(tiny_bert, **ablation)
    image, ids, mask, scalars = inputs(build(tiny_bert))
    kwargs = {"image": image if net.patch_embedding is not None else None,
              "input_ids": ids if net.text_tower is not None else None,
              "attention_mask": mask if net.text_tower is not None else None,
              "scalars": scalars if net.scalar_names else None}
    with torch.no_grad():
        logits, attentions = net(**kwargs, return_attention=True)
    slices = net.token_slices(ids.shape[1])
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    assert attentions[0].shape[-1] == slices["scalars"].stop


def test_state_dict_round_trip(tiny_bert, tmp_path):
    net = build(tiny_bert, seed=0)
    other = build(tiny_bert, seed=1)
    image, ids, mask, scalars = inputs(net)
    with torch.no_grad():
        assert not torch.allclose(net(image, ids, mask, scalars), other(image, ids, mask, scalars))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(other(image, ids, mask, scalars), net(image, ids, mask, scalars))


def own_parameter_count(d: int, m: int, fusion: int, joint: int, patches: int, in_channels: int, patch: int,
                        text_width: int, max_tokens: int, scalars: int, classes: int) -> int:
    """The closed form: catches a shared projection, a missing norm or a forgotten embedding."""
    attention = 4 * (d * d + d)  # q, k, v, out
    mlp = d * m + m + m * d + d
    norms = 2 * 2 * d
    image = in_channels * patch * patch * d + d + d + (1 + patches) * d
    text = text_width * d + d + max_tokens * d
    scalar = scalars * 2 * d + scalars * d + scalars * d  # Linear(1 -> d) each, missing, position
    return (image + text + scalar + fusion * 2 * (attention + mlp + norms) + joint * (attention + mlp + norms)
            + 2 * d + d * classes + classes)


def test_parameter_count_matches_the_architecture(tiny_bert):
    net = build(tiny_bert, num_classes=3)
    encoder = sum(p.numel() for p in net.text_tower.parameters())
    total = sum(p.numel() for p in net.parameters())
    assert total - encoder == own_parameter_count(32, 64, 2, 1, 16, 3, 8, 24, 16, len(SCALARS), 3)
    default = LLNMNet()  # the packaged MiniLM and the ViT-B/16-sized default
    default_total = sum(p.numel() for p in default.parameters())
    default_encoder = sum(p.numel() for p in default.text_tower.parameters())
    trainable = sum(p.numel() for p in default.parameters() if p.requires_grad)
    assert default_total - default_encoder == own_parameter_count(768, 3072, 2, 10, 196, 3, 16, 384, 50, 4, 1)
    assert trainable == default_total - default_encoder
    print(f"\nLLNM-Net default: {default_total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trainable "
          f"({default_encoder / 1e6:.2f} M in the frozen MiniLM)")


def network_data_format(max_tokens: int, num_classes: int) -> dict:
    return {
        "inputs": {
            "image": {"type": "image", "format": "magnitude", "modality": "US", "num_channels": 3,
                      "spatial_shape": [32, 32], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                      "channel_def": {"0": "R", "1": "G", "2": "B"}},
            "input_ids": {"type": "tokens", "format": "token-ids", "num_channels": 1,
                          "spatial_shape": [max_tokens], "dtype": "int64", "value_range": [0, 30521],
                          "channel_def": {"0": "report token ids from network.tokenize"}},
            "attention_mask": {"type": "tokens", "format": "mask", "num_channels": 1,
                               "spatial_shape": [max_tokens], "dtype": "int64", "value_range": [0, 1],
                               "channel_def": {"0": "1 real token, 0 padding"}},
            "scalars": {"type": "vector", "format": "standardised-or-nan", "num_channels": len(SCALARS),
                        "spatial_shape": [], "dtype": "float32", "value_range": [],
                        "channel_def": {str(i): name for i, name in enumerate(SCALARS)}},
        },
        "outputs": {
            "pred": {"type": "logits", "format": "classification", "num_channels": num_classes, "spatial_shape": [],
                     "dtype": "float32", "value_range": [], "channel_def": {"0": "lateral lymph-node metastasis"}},
        },
    }


@pytest.mark.parametrize("num_classes", [1, 3])
def test_bundle_style_build_matches_its_network_data_format(tiny_bert, num_classes):
    """What ``monai.bundle verify_net_in_out`` checks, for a network with four inputs it cannot feed."""
    import jsonschema
    from monai.bundle import ConfigParser

    io_format = network_data_format(16, num_classes)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(io_format, {"$defs": schema["$defs"], "$ref": "#/$defs/network_io"})
    parser = ConfigParser({
        "text_encoder": tiny_bert,
        "scalar_names": list(SCALARS),
        "network_def": {
            "_target_": "oncofusion.models.thyroid_llnm.network.LLNMNet", "num_classes": num_classes,
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64,
            "num_fusion_layers": 2, "num_joint_layers": 1, "text_encoder": "@text_encoder", "max_text_tokens": 16,
            "scalar_names": "@scalar_names", "scalar_center": [1, 0, 2, 50, 0.5], "scalar_scale": [0.5, 10, 2, 15, 0.5],
        },
        "network": "$@network_def.to('cpu')",
    })
    net = parser.get_parsed_content("network").eval()
    spec = io_format["inputs"]
    image = torch.rand(2, spec["image"]["num_channels"], *spec["image"]["spatial_shape"])
    tokens = net.tokenize(["smooth nodule .", "nodule " * 40], padding="max_length")
    assert tuple(tokens["input_ids"].shape[1:]) == tuple(spec["input_ids"]["spatial_shape"])
    assert tokens["input_ids"].dtype == getattr(torch, spec["input_ids"]["dtype"])
    assert tuple(net.scalar_names) == tuple(spec["scalars"]["channel_def"][str(i)] for i in range(len(SCALARS)))
    scalars = torch.rand(2, spec["scalars"]["num_channels"])
    scalars[1, 2] = float("nan")
    with torch.no_grad():
        logits = net(image, tokens["input_ids"], tokens["attention_mask"], scalars)
    out = io_format["outputs"]["pred"]
    assert logits.shape == (2, out["num_channels"]) and logits.dtype == getattr(torch, out["dtype"])


def test_inputs_that_do_not_fit_are_named(tiny_bert):
    net = build(tiny_bert)
    image, ids, mask, scalars = inputs(net)
    with pytest.raises(ValueError, match=r"image of shape \(2, 3, 48, 48\), expected \(B, 3, 32, 32\)"):
        net(torch.rand(2, 3, 48, 48), ids, mask, scalars)
    with pytest.raises(ValueError, match="more than|L <= 16"):
        net(image, torch.ones(2, 20, dtype=torch.long), None, scalars)
    with pytest.raises(ValueError, match=r"expected \(2, 5\) with columns \['aspect_ratio'"):
        net(image, ids, mask, scalars[:, :3])
    with pytest.raises(ValueError, match="needs the report"):
        net(image, None, None, scalars)
    with pytest.raises(ValueError, match="no valid token"):
        net(image, ids, torch.zeros_like(mask), scalars)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build(tiny_bert, image_size=30)
    with pytest.raises(ValueError, match="takes no scalars"):
        build(tiny_bert, scalar_names=())(image, ids, mask, scalars)


def test_pretrained_vit_weights_fill_the_image_stream(tiny_bert, tmp_path):
    """With only the image, the fusion blocks are self-attention and the whole encoder is that ViT."""
    from transformers import ViTModel

    vit_path = save_tiny_vit(tmp_path / "vit")
    net = build(tiny_bert, text_encoder=None, scalar_names=(), num_fusion_layers=2, num_joint_layers=1,
                image_pretrained=str(vit_path))
    vit = ViTModel.from_pretrained(vit_path, add_pooling_layer=False).eval()
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens, mask, _ = net.encode(image)
        torch.testing.assert_close(tokens, vit(pixel_values=image).last_hidden_state, atol=1e-5, rtol=1e-4)
    assert mask.all()
    # a larger image grid gets the position table resized; a different width is refused by name
    bigger = build(tiny_bert, image_size=48, image_pretrained=str(vit_path))
    assert bigger.image_position.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(bigger.image_position[:, 0], net.image_position[:, 0])
    with pytest.raises(ValueError, match="ViT checkpoint"):
        build(tiny_bert, hidden_size=48, image_pretrained=str(vit_path))


def test_packaged_minilm_encodes_reports_for_the_fusion():
    """The default text encoder: the real pretrained MiniLM, offline; small image to stay fast."""
    torch.manual_seed(0)
    net = LLNMNet(image_size=32, patch_size=16, hidden_size=32, num_heads=2, mlp_dim=32, num_joint_layers=1).eval()
    assert net.text_projection.in_features == 384 and net.scalar_names == ("aspect_ratio", "echogenicity_contrast",
                                                                           "age", "sex")
    reports = ["Solid hypoechoic nodule, irregular margin, microcalcifications, abutting the capsule.",
               "Small smooth isoechoic nodule in the lower pole. " * 10]
    tokens = net.tokenize(reports)
    assert tokens["input_ids"].shape == (2, 50) and tokens["truncated"].tolist() == [False, True]
    scalars = torch.tensor([[1.4, -20.0, 38.0, 0.0], [0.7, float("nan"), 55.0, 1.0]])
    with torch.no_grad():
        logits, attentions = net(torch.rand(2, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"], scalars,
                                 return_attention=True)
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    assert attentions[-1].shape == (2, 2, 1 + 4 + 50 + 4, 1 + 4 + 50 + 4)
    assert net.text_tower.encoder.config.name_or_path == packaged_minilm_path()
