"""SMuRF network and multitask loss: the three variants and three fusions from one class, the shared CT
encoder, the Kronecker product, the encoders' Swin hyper-parameters, fragment pooling, gradients, the
loss against a hand computation, the multi-input I/O check and inputs that do not fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatchExtraInput
from monai.networks.nets.swin_unetr import PatchMerging
from torch import nn

from oncofusion.losses import MultitaskGradeSurvivalLoss
from oncofusion.models.opscc_smurf.network import (
    MODALITIES,
    SmurfNet,
    batch_keys,
    check_network_io,
    grid_channel_statistics,
    kronecker_fusion,
    network_data_format,
)
from oncofusion.networks.trainable import load_trainable_state

torch.set_num_threads(1)

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "meta_schema_20240725.json"
VARIANTS = {"fusion": MODALITIES, "radiology": ("ct_tumor", "ct_nodes"), "pathology": ("wsi",)}
CT_SHAPE, GRID = (16, 16, 4), 8  # tiny stand-ins for 128 x 128 x 4 and S = 16


def inputs(batch: int = 2, seed: int = 0, fragments: int | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    wsi_shape = (batch, 192, GRID, GRID) if fragments is None else (batch, fragments, 192, GRID, GRID)
    return {"ct_tumor": torch.rand(batch, 4, *CT_SHAPE, generator=generator),
            "ct_nodes": torch.rand(batch, 4, *CT_SHAPE, generator=generator),
            "wsi": torch.randn(*wsi_shape, generator=generator)}


def build(**kwargs) -> SmurfNet:
    torch.manual_seed(0)
    return SmurfNet(**kwargs)


@pytest.mark.parametrize("fusion", ["attention", "kronecker", "concatenation"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_and_fusion_gives_a_grade_logit_and_a_log_hazard(variant, fusion):
    net = build(modalities=VARIANTS[variant], fusion=fusion).eval()
    tokens = 3 if variant == "fusion" else 2  # one modality is fused with itself
    expected_width = 25**tokens if fusion == "kronecker" else 24 * tokens
    assert net.fused_features == expected_width == net.hidden[0][0].in_features
    data = inputs()
    with torch.no_grad():
        out = net(**data)
        encoded = net.encode(**data)
        assert net.fuse(encoded).shape == (2, expected_width)
    assert out.shape == (2, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert encoded.shape == (2, tokens, 24)
    assert set(net.encoder_keys) == set(VARIANTS[variant])
    assert (net.attention is None) == (fusion == "concatenation")


def test_kronecker_fusion_is_the_outer_product_of_the_extended_tokens():
    tokens = torch.randn(2, 3, 4)
    a, b, c = (torch.cat([tokens[:, i], torch.ones(2, 1)], dim=1) for i in range(3))
    expected = torch.einsum("bi,bj,bk->bijk", a, b, c).flatten(1)
    fused = kronecker_fusion(tokens)
    assert fused.shape == (2, 125) and torch.allclose(fused, expected)
    # the trailing ones keep the tokens themselves among the features
    assert torch.allclose(fused.view(2, 5, 5, 5)[:, :4, 4, 4], tokens[:, 0])
    assert kronecker_fusion(torch.randn(3, 3, 24)).shape == (3, 15625)
    assert kronecker_fusion(torch.randn(3, 2, 24)).shape == (3, 625)


def test_tumor_and_nodes_share_one_encoder_unless_asked_otherwise():
    shared, separate = build(), build(share_ct_encoder=False)
    assert shared.encoder("ct_tumor") is shared.encoder("ct_nodes")
    assert shared.encoder("ct_tumor").patch_embed.proj.weight is shared.encoder("ct_nodes").patch_embed.proj.weight
    assert sorted(shared.encoders) == ["ct", "wsi"] and sorted(separate.encoders) == ["ct_nodes", "ct_tumor", "wsi"]
    assert separate.encoder("ct_tumor") is not separate.encoder("ct_nodes")
    ct_size = sum(p.numel() for p in shared.encoder("ct_tumor").parameters())
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(separate) - count(shared) == ct_size
    # with shared weights, the same crop gives the same token in either slot
    data = inputs()
    data["ct_nodes"] = data["ct_tumor"]
    with torch.no_grad():
        tokens = shared.eval().encode(**data)
    assert torch.allclose(tokens[:, 0], tokens[:, 1])


def test_encoders_have_the_papers_swin_hyper_parameters():
    net = build()
    for modality, kernel, conv in (("ct_tumor", (2, 2, 1), nn.Conv3d), ("wsi", (2, 2), nn.Conv2d)):
        encoder = net.encoder(modality)
        proj = encoder.patch_embed.proj
        assert proj.kernel_size == proj.stride == kernel and proj.out_channels == 12
        assert proj.in_channels == (4 if modality == "ct_tumor" else 192)
        assert [len(stage.blocks) for stage in encoder.stages] == [2, 2]
        assert [stage.blocks[0].attn.num_heads for stage in encoder.stages] == [3, 6]
        assert [stage.blocks[0].attn.dim for stage in encoder.stages] == [12, 24]
        assert all(stage.window_size == (4,) * len(kernel) for stage in encoder.stages)
        assert all(stage.blocks[1].shift_size == (2,) * len(kernel) for stage in encoder.stages)
        assert all(isinstance(stage.downsample, PatchMerging) for stage in encoder.stages)
        assert isinstance(encoder.norm, nn.LayerNorm) and encoder.norm.normalized_shape == (48,)
        assert isinstance(encoder.projection, conv) and encoder.projection.kernel_size == (1,) * len(kernel)
        assert (encoder.projection.in_channels, encoder.projection.out_channels) == (48, 24)
    assert isinstance(net.attention, nn.MultiheadAttention) and net.attention.embed_dim == 24
    for block, width in zip(net.hidden, (64, 16), strict=True):
        linear, act, norm, drop = block
        assert isinstance(linear, nn.Linear) and linear.out_features == width
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.1
        assert isinstance(norm, nn.BatchNorm1d) and isinstance(drop, nn.Dropout) and drop.p == 0.3
    assert (net.output.in_features, net.output.out_features) == (16, 2)


def test_one_backward_reaches_every_parameter():
    net = build(share_ct_encoder=False).train()
    target = torch.tensor([[1.0, 5.0, 1.0], [0.0, 3.0, 1.0], [1.0, 3.0, 0.0], [0.0, 1.0, 1.0]])
    MultitaskGradeSurvivalLoss()(net(**inputs(batch=4)), target).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic_and_training_is_not():
    net = build()
    data = inputs(batch=3)
    net.eval()
    with torch.no_grad():
        first, second = net(**data), net(**data)
    assert torch.equal(first, second)
    net.train()
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = net(**data)
    assert not torch.allclose(dropped, first)


def test_positional_named_and_unused_inputs():
    data = inputs()
    fusion = build().eval()
    radiology = build(modalities=("ct_nodes", "ct_tumor")).eval()  # order is canonical whatever is given
    pathology = build(modalities="wsi").eval()
    assert radiology.modalities == ("ct_tumor", "ct_nodes") and pathology.modalities == ("wsi",)
    with torch.no_grad():
        assert torch.equal(fusion(data["ct_tumor"], data["ct_nodes"], data["wsi"]), fusion(**data))
        assert torch.equal(fusion(data["ct_tumor"], ct_nodes=data["ct_nodes"], wsi=data["wsi"]), fusion(**data))
        assert torch.equal(radiology(data["ct_tumor"], data["ct_nodes"]), radiology(**data))
        assert torch.equal(pathology(data["wsi"]), pathology(**data))
        # the fusion model reads each modality: changing any input changes the prediction
        for key in MODALITIES:
            assert not torch.allclose(fusion(**{**data, key: data[key] * 0.5}), fusion(**data)), key
    assert pathology.variant(modalities=MODALITIES).config == {**pathology.config, "modalities": list(MODALITIES)}


def test_fragments_are_averaged_over_the_real_ones_only():
    net = build(modalities=("wsi",)).eval()
    data = inputs(fragments=3)
    wsi, mask = data["wsi"], torch.tensor([[1, 1, 0], [1, 0, 0]])
    with torch.no_grad():
        masked = net(wsi, wsi_mask=mask)
        garbage = wsi.clone()
        garbage[0, 2] = 100.0
        garbage[1, 1:] = -50.0
        assert torch.allclose(net(garbage, wsi_mask=mask), masked, atol=1e-6)
        assert torch.allclose(net(wsi[:1, :2]), masked[:1], atol=1e-6)
        assert torch.allclose(net(wsi[1:, :1]), masked[1:], atol=1e-6)
        # one grid per patient, (B, 192, S, S), is one fragment; fragment order does not matter
        assert torch.allclose(net(wsi[:, 0]), net(wsi[:, :1]), atol=1e-6)
        assert torch.allclose(net(wsi[:, [1, 0, 2]], wsi_mask=mask[:, [1, 0, 2]])[:1], masked[:1], atol=1e-6)
        assert not torch.allclose(net(wsi), masked, atol=1e-4)  # without a mask, every fragment counts


def cox_by_hand(log_hazard: list[float], time: list[float], event: list[int]) -> float:
    terms = []
    for i, (eta, t, e) in enumerate(zip(log_hazard, time, event, strict=True)):
        if e:
            at_risk = [math.exp(log_hazard[j]) for j in range(len(time)) if time[j] >= t]
            terms.append(eta - math.log(sum(at_risk)))
            assert len(at_risk) >= 1, i
    return -sum(terms) / len(terms)


def test_loss_is_the_weighted_bce_and_breslow_cox_sum():
    prediction = torch.tensor([[0.3, 1.2], [-1.0, -0.4], [2.0, 0.7], [0.1, 2.5], [-0.5, -3.0]])
    # times 3 and 3 tie, both events; the case at 8 is censored; a grade is unknown (NaN)
    target = torch.tensor([[1.0, 3.0, 1.0], [0.0, 3.0, 1.0], [1.0, 8.0, 0.0], [float("nan"), 1.0, 1.0],
                           [0.0, 5.0, 1.0]])
    eta, time, event = prediction[:, 1].tolist(), target[:, 1].tolist(), [1, 1, 0, 1, 1]
    known = [0, 1, 2, 4]
    bce = F.binary_cross_entropy_with_logits(prediction[known, 0], target[known, 0]).item()
    cox = cox_by_hand(eta, time, event)
    # the tied pair keeps each other in their risk sets (Breslow): both terms use {t >= 3}
    assert cox == pytest.approx(-(1.2 + -0.4 - 2 * math.log(sum(math.exp(e) for e in (1.2, -0.4, 0.7, -3.0)))
                                  + 2.5 - math.log(sum(math.exp(e) for e in eta))
                                  + -3.0 - math.log(math.exp(0.7) + math.exp(-3.0))) / 4)
    assert MultitaskGradeSurvivalLoss()(prediction, target).item() == pytest.approx(0.5 * bce + 0.5 * cox, rel=1e-5)
    weighted = MultitaskGradeSurvivalLoss(grade_weight=0.2, survival_weight=0.8)
    parts = weighted.components(prediction, target)
    assert parts["grade"].item() == pytest.approx(bce, rel=1e-5)
    assert parts["survival"].item() == pytest.approx(cox, rel=1e-5)
    assert parts["total"].item() == pytest.approx(0.2 * bce + 0.8 * cox, rel=1e-5)
    # columns can be swapped for a head that writes the log-hazard first
    swapped = MultitaskGradeSurvivalLoss(grade_channel=1, hazard_channel=0)(prediction.flip(1), target)
    assert swapped.item() == pytest.approx(0.5 * bce + 0.5 * cox, rel=1e-5)


def test_loss_without_known_grades_or_events_still_backpropagates():
    prediction = torch.randn(3, 2, requires_grad=True)
    target = torch.tensor([[float("nan"), 2.0, 0.0]] * 3)
    loss = MultitaskGradeSurvivalLoss()(prediction, target)
    loss.backward()
    assert loss.item() == 0.0 and prediction.grad is not None


def test_loss_names_targets_that_do_not_fit():
    loss = MultitaskGradeSurvivalLoss()
    with pytest.raises(ValueError, match=r"target of shape \(2, 2\), expected \(2, 3\) holding \[grade, time"):
        loss(torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"prediction of shape \(2,\), expected \(B, 2\)"):
        loss(torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"grade values \[2.0\] outside \[0, 1\]"):
        loss(torch.zeros(2, 2), torch.tensor([[2.0, 1.0, 1.0], [1.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="must differ"):
        MultitaskGradeSurvivalLoss(grade_channel=1, hazard_channel=1)
    with pytest.raises(ValueError, match="not both 0"):
        MultitaskGradeSurvivalLoss(grade_weight=0, survival_weight=0)


def test_inputs_that_do_not_fit_are_named():
    net = build()
    data = inputs()
    with pytest.raises(ValueError, match=r"wsi of shape \(2, 100, 8, 8\), expected \(B, 192, S, S\) or "):
        net(**{**data, "wsi": torch.rand(2, 100, GRID, GRID)})
    with pytest.raises(ValueError, match="channel-last"):
        net(**{**data, "wsi": data["wsi"].movedim(1, -1)})
    with pytest.raises(ValueError, match=r"ct_nodes of shape \(2, 3, 16, 16, 4\), expected \(B, 4, X, Y, Z\)"):
        net(**{**data, "ct_nodes": data["ct_nodes"][:, :3]})
    with pytest.raises(ValueError, match=r"ct_tumor of spatial size \(15, 16, 4\) is not a multiple of the patch"):
        net(**{**data, "ct_tumor": data["ct_tumor"][:, :, 1:]})
    with pytest.raises(ValueError, match=r"needs \['wsi'\]"):
        net(data["ct_tumor"], data["ct_nodes"])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        net(**{**data, "wsi": data["wsi"][:1]})
    with pytest.raises(ValueError, match="both positionally and by name"):
        net(data["ct_tumor"], ct_tumor=data["ct_tumor"], ct_nodes=data["ct_nodes"], wsi=data["wsi"])
    with pytest.raises(ValueError, match=r"unknown inputs \['ct_lymph'\]"):
        net(data["ct_tumor"], ct_lymph=data["ct_nodes"], wsi=data["wsi"])
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        net(**{**data, "ct_tumor": data["ct_tumor"].to(torch.uint8)})
    with pytest.raises(ValueError, match=r"wsi_mask of shape \(2, 2\), expected \(2, 1\)"):
        net(**data, wsi_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"no fragment as real for batch item\(s\) \[1\]"):
        net(**data, wsi_mask=torch.tensor([[1], [0]]))
    with pytest.raises(ValueError, match="batch of 1 in training mode"):
        net.train()(**inputs(batch=1))
    with pytest.raises(ValueError, match="modalities must be distinct names"):
        SmurfNet(modalities=("ct_tumor", "ct_lymph"))
    with pytest.raises(ValueError, match="fusion must be one of"):
        SmurfNet(fusion="fused_attention")
    with pytest.raises(ValueError, match="reads \\['wsi'\\], not 'ct_tumor'"):
        build(modalities=("wsi",)).encoder("ct_tumor")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_network_inputs_and_outputs_match_the_data_format(variant):
    """What ``verify_net_in_out`` checks, for a network of up to three inputs it cannot feed."""
    import jsonschema

    data_format = network_data_format(VARIANTS[variant], ct_shape=CT_SHAPE, wsi_grid=GRID)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(data_format, {"$defs": schema["$defs"], "$ref": "#/$defs/network_io"})
    assert tuple(data_format["inputs"]) == VARIANTS[variant]
    net = build(modalities=VARIANTS[variant])
    assert check_network_io(net, data_format, batch_size=3).shape == (3, 2)
    wrong = json.loads(json.dumps(data_format))
    wrong["outputs"]["pred"]["num_channels"] = 3
    with pytest.raises(ValueError, match=r"declares \(3, 3\) float32"):
        check_network_io(net, wrong, batch_size=3)


def test_paper_sizes_give_one_token_per_modality():
    """The real sizes: CT 128 x 128 x 4 (Z 4 -> 2 -> 1 through the mergings), grids of S = 16."""
    net = build().eval()
    data_format = network_data_format()
    assert data_format["inputs"]["ct_tumor"]["spatial_shape"] == [128, 128, 4]
    encoder = net.encoder("ct_tumor")
    with torch.no_grad():
        assert encoder.feature_map(torch.rand(1, 4, 128, 128, 4)).shape == (1, 48, 16, 16, 1)
        assert net.encoder("wsi").feature_map(torch.rand(1, 192, 16, 16)).shape == (1, 48, 2, 2)
    assert check_network_io(net, data_format, batch_size=1).shape == (1, 2)


def test_batch_keys_feed_monais_prepare_batch():
    assert batch_keys() == ("ct_tumor", {"ct_nodes": "ct_nodes", "wsi": "wsi", "wsi_mask": "wsi_mask"})
    assert batch_keys(("wsi",), wsi_mask_key=None) == ("wsi", {})
    assert batch_keys(("ct_tumor", "ct_nodes"), keys={"ct_nodes": "nodes"}) == ("ct_tumor", {"ct_nodes": "nodes"})
    for variant, modalities in VARIANTS.items():
        net = build(modalities=modalities).eval()
        data = inputs(fragments=2)
        first, extra = batch_keys(modalities)
        batch = {**data, "image": data[first], "label": torch.zeros(2, 3), "wsi_mask": torch.tensor([[1, 1], [1, 0]])}
        image, _, args, kwargs = PrepareBatchExtraInput(extra_keys=extra)(batch)
        with torch.no_grad():
            expected = net(**{m: data[m] for m in modalities}, wsi_mask=batch["wsi_mask"])
            assert torch.equal(net(image, *args, **kwargs), expected), variant


def test_grid_statistics_are_those_of_the_region_cells_only():
    generator = torch.Generator().manual_seed(1)
    grids = [torch.randn(2, 192, GRID, GRID, generator=generator) * 0.1 + 3.0,
             torch.randn(1, 192, GRID, GRID, generator=generator) * 0.2 - 1.0]
    grids[0][:, :, :2] = 0.0  # empty cells (centre padding) carry no statistics
    cells = np.concatenate([g.movedim(1, -1).reshape(-1, 192).numpy() for g in grids])
    cells = cells[np.any(cells != 0, axis=1)]
    mean, std = grid_channel_statistics(grids)
    np.testing.assert_allclose(mean.numpy(), cells.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), cells.std(axis=0, ddof=1), rtol=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        grid_channel_statistics([torch.zeros(1, 192, GRID, GRID)])
    with pytest.raises(ValueError, match="n_fragments, D, S, S"):
        grid_channel_statistics([torch.ones(192, GRID, GRID)])


def test_slide_grids_are_standardised_with_the_saved_statistics():
    generator = torch.Generator().manual_seed(2)
    mean, std = torch.randn(192, generator=generator), torch.rand(192, generator=generator) + 0.5
    wsi = inputs(fragments=2)["wsi"] * std[:, None, None] + mean[:, None, None]
    wsi[..., :3, :] = 0.0  # empty cells stay empty
    fitted = build(modalities=("wsi",)).eval()
    fitted.set_wsi_statistics(mean, std)
    identity = build(modalities=("wsi",)).eval()  # same weights, statistics not set
    standardised = (wsi - mean[:, None, None]) / std[:, None, None]
    standardised[..., :3, :] = 0.0
    with torch.no_grad():
        assert torch.allclose(fitted(wsi), identity(standardised), atol=1e-5)
        assert not torch.allclose(fitted(wsi), identity(wsi), atol=1e-3)
    state = fitted.state_dict()
    assert torch.equal(state["wsi_mean"], mean) and torch.equal(state["wsi_std"], std)  # saved with the weights
    served = build(modalities=("wsi",)).eval()
    load_trainable_state(served, state)
    with torch.no_grad():
        assert torch.allclose(served(wsi), fitted(wsi), atol=1e-6)
    with pytest.raises(RuntimeError, match="wsi_mean"):  # weights without their statistics are refused
        load_trainable_state(served, {k: v for k, v in state.items() if not k.startswith("wsi_")})


def test_wsi_statistics_that_do_not_fit_are_refused():
    net = build(modalities=("wsi",))
    with pytest.raises(ValueError, match=r"expected \(192,\)"):
        net.set_wsi_statistics(torch.zeros(10), torch.ones(10))
    with pytest.raises(ValueError, match="> 0"):
        net.set_wsi_statistics(torch.zeros(192), torch.zeros(192))
    with pytest.raises(ValueError, match="no slide grid"):
        build(modalities=("ct_tumor", "ct_nodes")).set_wsi_statistics(torch.zeros(192), torch.ones(192))
