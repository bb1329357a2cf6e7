"""Region encoders: shapes, input handling, seeded random weights, weight digests and local checkpoints."""

from __future__ import annotations

import pytest
import torch

from oncofusion.networks.region_encoders import (
    REGION_EMBEDDING_DIM,
    SmallCNNEncoder,
    ViTEncoder,
    region_encoder,
    weights_digest,
)

TINY_CNN = {"input_size": 32, "channels": (4, 8, 8, 8)}
TINY_VIT = {"input_size": 32, "patch_size": 8, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(batch: int = 2, size: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize(("name", "options", "cls"), [("cnn", TINY_CNN, SmallCNNEncoder), ("vit", TINY_VIT, ViTEncoder)])
def test_encoders_map_regions_to_192_vectors(name, options, cls):
    encoder = region_encoder(name, **options)
    assert isinstance(encoder, cls) and not encoder.training
    with torch.no_grad():
        out = encoder(images(3, size=80))  # any region size: resized to the encoder's input first
    assert out.shape == (3, REGION_EMBEDDING_DIM) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def test_uint8_and_unit_float_inputs_agree_and_regions_are_resized():
    encoder = region_encoder("cnn", **TINY_CNN)
    pixels = images(2, size=64)
    prepared = encoder.prepare(pixels)
    assert prepared.shape == (2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), encoder(pixels.float() / 255.0))
    # the mean colour survives the antialiased resize and the ImageNet normalisation is applied
    mean = (pixels.float() / 255.0).mean(dim=(2, 3))
    restored = prepared * encoder.std + encoder.mean
    torch.testing.assert_close(restored.mean(dim=(2, 3)), mean, atol=0.02, rtol=0.0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), r"must be \(B, 3, H, W\) RGB"),
        (torch.full((1, 3, 8, 8), 200.0), r"float region images must lie in \[0, 1\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "must be uint8 or float"),
    ],
)
def test_bad_inputs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        region_encoder("cnn", **TINY_CNN)(bad)


def test_random_weights_are_seeded_and_leave_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = region_encoder("cnn", **TINY_CNN)
    assert torch.equal(torch.rand(1), expected_next)
    assert weights_digest(first) == weights_digest(region_encoder("cnn", **TINY_CNN))
    assert weights_digest(first) != weights_digest(region_encoder("cnn", seed=1, **TINY_CNN))


def test_weights_digest_follows_every_weight_and_the_preprocessing():
    encoder = region_encoder("cnn", **TINY_CNN)
    before = weights_digest(encoder)
    with torch.no_grad():
        encoder.backbone.fc.bias[0] += 1e-3
    assert weights_digest(encoder) != before
    resized = region_encoder("cnn", input_size=64, channels=TINY_CNN["channels"])
    assert weights_digest(resized) != weights_digest(region_encoder("cnn", **TINY_CNN))  # same weights, other input
    # same tensors (names, shapes, values), other function: the head count is in the config only
    two_heads, four_heads = region_encoder("vit", **TINY_VIT), region_encoder("vit", **{**TINY_VIT, "num_heads": 4})
    assert all(torch.equal(a, b) for a, b in zip(two_heads.state_dict().values(), four_heads.state_dict().values(), strict=True))
    assert weights_digest(two_heads) != weights_digest(four_heads)


def test_vit_loads_from_a_local_checkpoint(tmp_path):
    trained = region_encoder("vit", seed=7, **TINY_VIT)
    path = tmp_path / "hipt_tiny.pt"
    torch.save(trained.state_dict(), path)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, wrapped)
    pixels = images(2, size=32)
    with torch.no_grad():
        expected = trained(pixels)
        for name in (f"vit:{path}", str(path), str(wrapped)):
            loaded = region_encoder(name, seed=0, **TINY_VIT)  # seed 0 would give other random weights
            torch.testing.assert_close(loaded(pixels), expected)
            assert weights_digest(loaded) == weights_digest(trained)


def test_cnn_checkpoint_and_mismatches_name_the_path(tmp_path):
    cnn_path = tmp_path / "cnn.pt"
    torch.save(region_encoder("cnn", seed=3, **TINY_CNN).state_dict(), cnn_path)
    assert weights_digest(region_encoder(f"cnn:{cnn_path}", **TINY_CNN)) == weights_digest(
        region_encoder("cnn", seed=3, **TINY_CNN))
    with pytest.raises(ValueError, match=rf"checkpoint '{cnn_path}' does not fit ViTEncoder\(.*missing keys: vit\."):
        region_encoder(str(cnn_path), **TINY_VIT)
    vit_path = tmp_path / "vit.pt"
    torch.save(region_encoder("vit", **TINY_VIT).state_dict(), vit_path)
    with pytest.raises(ValueError, match=r"does not fit ViTEncoder\(.*num_layers=2.*missing keys: vit\.blocks\.1"):
        region_encoder(str(vit_path), **{**TINY_VIT, "num_layers": 2})
    with pytest.raises(ValueError, match=r"shape mismatch: .*\(192,\) vs \(96,\)"):
        region_encoder(str(vit_path), **{**TINY_VIT, "embed_dim": 96})


def test_missing_or_unreadable_checkpoint_is_a_clear_error(tmp_path):
    absent = tmp_path / "nowhere" / "hipt4k.pth"
    with pytest.raises(FileNotFoundError, match=rf"region encoder checkpoint '{absent}' not found"):
        region_encoder(f"vit:{absent}")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00 not torch")
    with pytest.raises(ValueError, match=rf"checkpoint '{garbage}' is not a readable torch file"):
        region_encoder(str(garbage))
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(ValueError, match=rf"checkpoint '{listed}' is not a state dict of tensors"):
        region_encoder(str(listed))
    with pytest.raises(ValueError, match="unknown region encoder 'resnet50'"):
        region_encoder("resnet50")
