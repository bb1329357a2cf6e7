"""Region encoders: one large whole-slide region image -> one embedding vector (192-d by default).

SMuRF lays one vector per tissue region on a grid (HIPT-4K in the paper: a 4096-px region at 0.5 um/px
-> 192-d). No pretrained pathology encoder ships offline, so the encoder is pluggable and named by one
string (:func:`region_encoder`):

- ``"cnn"``: :class:`SmallCNNEncoder`, a four-stage residual CNN (MONAI ``ResNet``, basic blocks),
  global average pool and a linear layer to the embedding; seeded random weights unless a checkpoint is
  given. A frozen random CNN is a weak but honest texture encoder, and fast on a CPU.
- ``"vit"``: :class:`ViTEncoder`, HIPT-4K-sized (192-d, 6 layers, 6 heads, MLP 768, 16-px patches) on
  MONAI's ``ViT``; meant to be loaded from a local checkpoint.
- ``"cnn:<path>"`` / ``"vit:<path>"`` / a bare checkpoint path (read as the ViT): that architecture with
  the weights of a local state dict (``torch.save(encoder.state_dict(), path)``).

**Resizing.** A region is far bigger than any encoder's input (4096 px in the paper), so every encoder
first resizes the region to its ``input_size`` (256 px by default) with antialiasing, then normalises
with ImageNet's mean and std. The slide pipeline (:mod:`oncofusion.data.slide_grids`) already shrinks
each region to ``input_size`` while reading it, so the decoded 4096-px region never crosses a process
boundary; the resize here is then a no-op, and it keeps the encoder correct on raw regions.

Inputs are ``(B, 3, H, W)`` RGB, uint8 on [0, 255] or float on [0, 1]; outputs ``(B, embed_dim)``.
:func:`weights_digest` names an encoder by its weights and preprocessing, so embeddings cached on disk
are recomputed when either changes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet, ViT
from torch import nn

#: SMuRF's region embedding width (HIPT-4K's output)
REGION_EMBEDDING_DIM = 192
#: side in pixels every region is resized to before encoding, unless the encoder is built otherwise
DEFAULT_INPUT_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: file endings read as a checkpoint path when the name has no ``cnn:``/``vit:`` prefix
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class RegionEncoder(nn.Module):
    """Base of the region encoders: resize, normalise, then :meth:`embed`.

    ``config`` holds the constructor's arguments: they name the architecture in :func:`weights_digest`
    and in checkpoint mismatch errors.
    """

    def __init__(self, input_size: int, embed_dim: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}")
        self.input_size = input_size
        self.embed_dim = embed_dim
        self.config: dict[str, Any] = {"input_size": input_size, "embed_dim": embed_dim,
                                       "mean": tuple(mean), "std": tuple(std)}
        # not persistent: constants of the preprocessing, not weights a checkpoint must carry
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 [0, 255] or float [0, 1] -> ``(B, 3, S, S)`` normalised float, ``S`` =
        ``input_size`` (antialiased bilinear resize when ``H, W`` differ from it)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"region images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            pixels = images.float() / 255.0
        elif images.is_floating_point():
            if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
                raise ValueError(
                    "float region images must lie in [0, 1]; pass uint8 for pixels on [0, 255]"
                )
            pixels = images.float()
        else:
            raise ValueError(f"region images must be uint8 or float, got {images.dtype}")
        if pixels.shape[-2:] != (self.input_size, self.input_size):
            pixels = F.interpolate(pixels, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (pixels - self.mean) / self.std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` prepared pixels -> ``(B, embed_dim)``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` region images -> ``(B, embed_dim)`` embeddings."""
        return self.embed(self.prepare(images))


class SmallCNNEncoder(RegionEncoder):
    """Four residual stages (MONAI ``ResNet``, one basic block each, ``channels`` wide), a stride-2 7x7
    stem and max pool, global average pool, linear to ``embed_dim``: 0.2 GFLOP and 0.33 M parameters at
    256 px with the default widths (the ViT: 1.7 GFLOP, 3.8 M), cheap enough for CPU-only extraction.

    ``(B, 3, H, W)`` -> ``(B, embed_dim)``.
    """

    def __init__(self, input_size: int = DEFAULT_INPUT_SIZE, embed_dim: int = REGION_EMBEDDING_DIM,
                 channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__(input_size, embed_dim)
        channels = [int(c) for c in channels]
        if len(channels) != 4 or min(channels) <= 0:
            raise ValueError(f"channels must be four positive widths (one per stage), got {channels}")
        self.config["channels"] = tuple(channels)
        self.backbone = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=channels, spatial_dims=2,
                               n_input_channels=3, conv1_t_size=7, conv1_t_stride=2, num_classes=embed_dim)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)


class ViTEncoder(RegionEncoder):
    """A HIPT-4K-sized vision transformer (MONAI ``ViT``, 2D): ``patch_size`` patches of the resized
    region, ``num_layers`` pre-norm blocks of width ``embed_dim``; the embedding is the mean of the final
    (layer-normed) patch tokens. HIPT reads a class token instead; mean pooling needs no extra token, and
    a checkpoint loads only into the architecture it was trained as, so either way the weights decide.

    ``(B, 3, H, W)`` -> ``(B, embed_dim)``.
    """

    def __init__(self, input_size: int = DEFAULT_INPUT_SIZE, embed_dim: int = REGION_EMBEDDING_DIM,
                 patch_size: int = 16, num_layers: int = 6, num_heads: int = 6, mlp_dim: int = 768):
        super().__init__(input_size, embed_dim)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
        self.config.update(patch_size=patch_size, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim)
        self.vit = ViT(in_channels=3, img_size=input_size, patch_size=patch_size, hidden_size=embed_dim,
                       mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, spatial_dims=2,
                       classification=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(pixels)  # (B, (S / patch)^2, embed_dim)
        return tokens.mean(dim=1)


ARCHITECTURES: dict[str, type[RegionEncoder]] = {"cnn": SmallCNNEncoder, "vit": ViTEncoder}


def _state_dict_of(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved state dict, also when wrapped (``{"state_dict": ...}``, ``{"model": ...}``)
    or saved from ``DataParallel`` (``module.`` prefixes)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ValueError(
            f"region encoder checkpoint '{path}' is not a state dict of tensors: save one with "
            "torch.save(encoder.state_dict(), path)"
        )
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def load_checkpoint(encoder: RegionEncoder, path: str | os.PathLike) -> RegionEncoder:
    """Load a local state dict into ``encoder``; every mismatch is reported with the path and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"region encoder checkpoint '{path}' not found: give the path of a local state dict saved with "
            "torch.save(encoder.state_dict(), path)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"region encoder checkpoint '{path}' is not a readable torch file: {e}") from e
    state = _state_dict_of(loaded, path)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                      for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        problems = [f"{label}: {_listed(names)}" for label, names in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", reshaped))
                    if names]
        arguments = ", ".join(f"{k}={v}" for k, v in encoder.config.items() if k not in ("mean", "std"))
        raise ValueError(
            f"region encoder checkpoint '{path}' does not fit {type(encoder).__name__}({arguments}): "
            f"{'; '.join(problems)}. Build the encoder with the hyper-parameters the checkpoint was trained with"
        )
    encoder.load_state_dict(state)
    return encoder


def _parse(name_or_path: str) -> tuple[str, str | None]:
    """``(architecture, checkpoint path or None)`` of an encoder name."""
    text = str(name_or_path).strip()
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in ARCHITECTURES and rest:
        return prefix.lower(), rest
    if text.lower() in ARCHITECTURES:
        return text.lower(), None
    if text.lower().endswith(CHECKPOINT_SUFFIXES) or os.sep in text or "/" in text or Path(text).is_file():
        return "vit", text
    raise ValueError(
        f"unknown region encoder '{text}': use 'cnn' or 'vit' (random weights), 'cnn:<checkpoint>' or "
        "'vit:<checkpoint>' (weights from a local state dict), or a checkpoint path (the ViT)"
    )


def region_encoder(name_or_path: str = "cnn", *, seed: int | None = 0,
                   device: str | torch.device | None = None, **options: Any) -> RegionEncoder:
    """Build a region encoder by name (see the module docstring), in eval mode.

    ``options`` are the architecture's constructor arguments (``input_size``, ``embed_dim``, ``channels``
    for the CNN; ``patch_size``, ``num_layers``, ``num_heads``, ``mlp_dim`` for the ViT); a checkpoint must
    have been saved from the same arguments. Random weights are drawn from ``seed`` (None: the global
    generator), without disturbing the global generator, so ``region_encoder("cnn")`` is the same network
    in every process.
    """
    architecture, checkpoint = _parse(name_or_path)
    cls = ARCHITECTURES[architecture]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        encoder = cls(**options)
    if checkpoint is not None:
        load_checkpoint(encoder, checkpoint)
    if device is not None:
        encoder = encoder.to(device)
    return encoder.eval()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's class, ``config`` (preprocessing included) and every tensor of its
    state dict, names, shapes and bytes: equal digests mean the same function of the input."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    config = getattr(module, "config", None)
    digest.update(repr(sorted(config.items()) if isinstance(config, Mapping) else config).encode())
    digest.update(repr(getattr(module, "input_size", None)).encode())
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
