"""Frozen CLIP-family encoders for feature extraction, and a small CLIP pair to pre-train when none ships.

A frozen encoder maps RGB images and report texts to L2-normalised feature vectors; a model above it
(e.g. a gradient-boosted classifier) never changes it. Three sources, named by one string:

- a Hugging Face CLIP checkpoint (``CLIPModel`` or ``ChineseCLIPModel``), a local path or a hub id,
  exactly as ``transformers`` loads it: ``"openai/clip-vit-base-patch16"``, ``"OFA-Sys/chinese-clip-vit-base-patch16"``;
- an ``open_clip`` model, ``"open_clip:<architecture>/<pretrained tag or checkpoint path>"``, when the
  ``open_clip_torch`` package is installed;
- a :class:`ClipPair` directory written by :meth:`ClipPair.save_pretrained` (``clip_pair.json`` inside):
  the offline default, pre-trained contrastively on the training folds' image-report pairs because no
  pretrained image CLIP can be downloaded offline.

Every source reports its ``image_size``, pixel ``mean``/``std``, text ``context_length`` and an
``encoder_id`` that changes whenever its weights change, so cached features are keyed by it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from oncofusion.io.atomic import atomic_write_bytes, atomic_write_text
from oncofusion.networks.blocks import ProjectionHead
from oncofusion.networks.towers import CLIP_MEAN, CLIP_STD, HFTextTower, packaged_minilm_path

PAIR_CONFIG = "clip_pair.json"
PAIR_WEIGHTS = "clip_pair.pt"
OPEN_CLIP_PREFIX = "open_clip:"


def clip_pixels(image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                intensity_range: tuple[float, float] = (0.0, 255.0)) -> torch.Tensor:
    """A frame as the repository reads it, ``(C, W, H)`` with C 1 or 3, -> CLIP input ``(3, size, size)``.

    Intensities are scaled from ``intensity_range`` to [0, 1], grey is repeated to RGB, the frame is
    resized to ``size`` x ``size`` bicubically (with antialiasing, as PIL's bicubic resize in CLIP's own
    preprocessing) and normalised with the encoder's mean and std.
    """
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, W, H) frame with 1 or 3 channels, got shape {tuple(image.shape)}")
    if hasattr(image, "as_tensor"):  # a MetaTensor: its metadata tracking would slow every later operation
        image = image.as_tensor()
    low, high = intensity_range
    pixels = ((image.float() - low) / (high - low)).clamp(0.0, 1.0).transpose(1, 2)  # (C, H, W): rows first
    pixels = pixels.expand(3, -1, -1).unsqueeze(0)
    pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    pixels = pixels.clamp(0.0, 1.0)[0]
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _files_digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class FrozenClip(nn.Module):
    """The frozen image and text encoders of one CLIP: ``encode_images``, ``encode_texts``, L2-normalised.

    Subclasses set ``image_size``, ``mean``, ``std``, ``context_length``, ``encoder_id`` and implement
    ``_image_features`` / ``_text_features``. Gradients are off and the modules are in eval mode.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    context_length: int = 77
    encoder_id: str = ""

    def freeze(self) -> FrozenClip:
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad = False
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels (see :func:`clip_pixels`) -> ``(B, E_image)``, unit length."""
        return F.normalize(self._image_features(pixels.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Report texts -> ``(B, E_text)``, unit length; texts longer than ``context_length`` tokens are cut."""
        return F.normalize(self._text_features(list(texts)).float(), dim=-1)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class HuggingFaceClip(FrozenClip):
    """``CLIPModel`` / ``ChineseCLIPModel`` with its processor's statistics, from a local path or hub id."""

    def __init__(self, source: str, context_length: int | None = None):
        super().__init__()
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(source)
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(f"'{source}' is a {type(self.model).__name__}, not a CLIP model with image and text towers")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.image_size = int(self.model.config.vision_config.image_size)
        try:  # a full checkpoint carries its preprocessing; a bare model gets OpenAI CLIP's statistics
            processor = AutoImageProcessor.from_pretrained(source)
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        except OSError:
            self.mean, self.std = CLIP_MEAN, CLIP_STD
        positions = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        self.context_length = int(context_length or positions)
        local = Path(source)
        weights = [p for p in local.iterdir() if p.suffix in (".safetensors", ".bin")] if local.is_dir() else []
        self.encoder_id = f"hf:{local.resolve() if local.is_dir() else source}:{_files_digest(weights) if weights else 'hub'}"
        self.freeze()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _embeds(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(self.device)
        return _embeds(self.model.get_text_features(**tokens))


def _embeds(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and may return an output object in later versions."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot read embeddings from {type(output).__name__}")


class OpenClip(FrozenClip):
    """An ``open_clip`` model, ``open_clip:<architecture>/<pretrained tag or checkpoint path>``."""

    def __init__(self, source: str, context_length: int | None = None):
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ImportError(f"encoder '{source}' needs the open_clip_torch package: pip install open_clip_torch") from None
        architecture, _, pretrained = source[len(OPEN_CLIP_PREFIX):].partition("/")
        self.model, _, preprocess = open_clip.create_model_and_transforms(architecture, pretrained=pretrained or None)
        self.tokenizer = open_clip.get_tokenizer(architecture)
        normalize = preprocess.transforms[-1]
        self.mean, self.std = tuple(normalize.mean), tuple(normalize.std)
        self.image_size = int(self.model.visual.image_size[0] if isinstance(self.model.visual.image_size, Sequence)
                              else self.model.visual.image_size)
        self.context_length = int(context_length or self.model.context_length)
        self.encoder_id = f"open_clip:{architecture}:{pretrained}"
        self.freeze()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts, context_length=self.context_length).to(self.device))


@functools.lru_cache(maxsize=4)
def _frozen_text_tower(source: str, max_length: int) -> HFTextTower:
    return HFTextTower(source, tuning="frozen", max_length=max_length).eval()


class ClipPair(nn.Module):
    """A small CLIP: a 2D ResNet image tower and a pretrained sentence encoder in one embedding space.

    ``encode_image``: ``(B, 3, S, S)`` normalised pixels -> ``(B, E)``; ``encode_text``: texts -> ``(B, E)``;
    both unit length. ``forward(pixels, texts)`` returns both and the learnt logit scale for
    :func:`oncofusion.losses.contrastive.clip_contrastive_loss`. The sentence encoder is adapted with LoRA
    (``text_tuning="lora"``) or kept frozen under a trained projection head (``"frozen"``, whose text
    features a trainer can compute once per report: :meth:`project_text`). Only what training changes is
    saved (the image tower, LoRA adapters, projection); the text encoder's own weights are loaded from
    ``text_encoder`` (a local path or hub id; ``"minilm"`` is the packaged all-MiniLM-L6-v2).
    """

    def __init__(self, text_encoder: str = "minilm", embed_dim: int = 256, image_size: int = 224,
                 image_channels: Sequence[int] = (16, 32, 64, 128), image_layers: Sequence[int] = (1, 1, 1, 1),
                 text_tuning: str = "lora", lora_rank: int = 4, context_length: int = 128,
                 temperature: float = 0.07, max_logit_scale: float = 100.0):
        super().__init__()
        self.config = {
            "text_encoder": text_encoder, "embed_dim": embed_dim, "image_size": image_size,
            "image_channels": list(image_channels), "image_layers": list(image_layers), "text_tuning": text_tuning,
            "lora_rank": lora_rank, "context_length": context_length, "temperature": temperature,
            "max_logit_scale": max_logit_scale,
        }
        self.image_tower = ResNet(block="basic", layers=list(image_layers), block_inplanes=list(image_channels),
                                  spatial_dims=2, n_input_channels=3, num_classes=embed_dim, conv1_t_stride=2)
        source = packaged_minilm_path() if text_encoder == "minilm" else text_encoder
        if text_tuning == "frozen":  # nothing of it trains: pairs of every fold share one copy in memory
            self.text_tower = _frozen_text_tower(source, context_length)
        else:
            self.text_tower = HFTextTower(source, tuning=text_tuning, lora_rank=lora_rank,
                                          lora_alpha=float(lora_rank), lora_dropout=0.1, max_length=context_length)
        self.text_projection = ProjectionHead(self.text_tower.out_features, embed_dim, dropout=0.1)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(pixels), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.project_text(self.text_tower(texts))

    def project_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """The text tower's ``(B, F)`` output -> ``(B, E)`` in the joint space, unit length."""
        return F.normalize(self.text_projection(text_features), dim=-1)

    @property
    def text_tower_trains(self) -> bool:
        return any(parameter.requires_grad for parameter in self.text_tower.parameters())

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()

    def forward(self, pixels: torch.Tensor, texts: Sequence[str] | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``texts``: report strings, or the text tower's features of them (a frozen tower's, computed once)."""
        text = self.project_text(texts) if isinstance(texts, torch.Tensor) else self.encode_text(texts)
        return self.encode_image(pixels), text, self.scale()

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The parameters training changes and the image tower's buffers: what a checkpoint must hold."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {name: value for name, value in self.state_dict().items()
                if name in trainable or name.startswith("image_tower.")}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(self.trained_state(), buffer)
        atomic_write_bytes(directory / PAIR_WEIGHTS, buffer.getvalue())
        atomic_write_text(directory / PAIR_CONFIG, json.dumps(self.config, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipPair:
        directory = Path(directory)
        config = json.loads((directory / PAIR_CONFIG).read_text())
        pair = cls(**config)
        state = torch.load(directory / PAIR_WEIGHTS, map_location="cpu", weights_only=True)
        missing = set(pair.trained_state()) - set(state)
        if missing:
            raise ValueError(f"CLIP pair checkpoint {directory} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        pair.load_state_dict(state, strict=False)
        return pair


class PairClip(FrozenClip):
    """A :class:`ClipPair` directory, frozen."""

    def __init__(self, source: str | Path):
        super().__init__()
        directory = Path(source)
        self.pair = ClipPair.from_pretrained(directory)
        self.image_size = int(self.pair.config["image_size"])
        self.context_length = int(self.pair.config["context_length"])
        self.encoder_id = f"pair:{directory.resolve()}:{_files_digest([directory / PAIR_CONFIG, directory / PAIR_WEIGHTS])}"
        self.freeze()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pair.image_tower(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.pair.text_projection(self.pair.text_tower(texts))


def load_frozen_clip(source: str | Path, context_length: int | None = None) -> FrozenClip:
    """The frozen CLIP named by ``source`` (see the module docstring for the three kinds of name)."""
    text = str(source)
    if text.startswith(OPEN_CLIP_PREFIX):
        return OpenClip(text, context_length)
    path = Path(text)
    if (path / PAIR_CONFIG).is_file():
        return PairClip(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP encoder directory '{path}' holds neither {PAIR_CONFIG} (a CLIP pair) nor "
                                "config.json (a Hugging Face CLIP): pre-train the pair with the bundle's "
                                "extract config or point 'clip_encoder' at a CLIP checkpoint")
    return HuggingFaceClip(text, context_length)
