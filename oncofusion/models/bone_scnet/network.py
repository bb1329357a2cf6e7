"""S-Net / SC-Net: a CT-patch ResNet with channel attention, optionally fused late with clinical features.

Liu et al. (2024) pick a CNN by transfer learning (R-Net), improve it (S-Net), and concatenate clinical
features with its image features (SC-Net). They do not publish the architecture; this is ours:

- image encoder: a MONAI ``ResNet`` trunk (basic blocks, 3D by default, 2D for stacked slices) with an
  attention block after every residual stage: squeeze-and-excitation (MONAI ``ChannelSELayer``) or
  CBAM (channel then spatial attention), or none;
- clinical encoder: ``Linear -> ReLU`` on the encoded clinical vector (:mod:`oncofusion.data.clinical`);
- late fusion: the projected image features and the clinical embedding are concatenated and an MLP
  head gives the class logits.

``fusion=False`` drops the clinical path, so the image-only ablation (S-Net) and the fused model
(SC-Net) are one class and one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.layers import Conv, Pool
from monai.networks.nets import ResNet
from torch import nn

ATTENTION_TYPES = ("none", "se", "cbam")


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): channel attention from average- and max-pooled
    descriptors, then spatial attention from the channel-wise average and maximum.

    ``(B, C, *S) -> (B, C, *S)``.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.avg_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.max_pool = Pool[Pool.ADAPTIVEMAX, spatial_dims](1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = Conv[Conv.CONV, spatial_dims](2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        view = (b, c) + (1,) * (x.ndim - 2)
        channel = self.mlp(self.avg_pool(x).flatten(1)) + self.mlp(self.max_pool(x).flatten(1))
        x = x * torch.sigmoid(channel).view(view)
        descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(descriptor))


def attention_block(kind: str, spatial_dims: int, channels: int, reduction: int = 4) -> nn.Module:
    """``"none"``, ``"se"`` (MONAI squeeze-and-excitation) or ``"cbam"``, shape-preserving."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {kind!r}")
    if kind == "se":
        return ChannelSELayer(spatial_dims, channels, r=min(reduction, channels))
    if kind == "cbam":
        return CBAM(spatial_dims, channels, reduction)
    return nn.Identity()


class ImageEncoder(nn.Module):
    """MONAI ResNet trunk with an attention block after each of its four stages.

    ``(B, in_channels, *spatial) -> (B, channels[-1])`` (global average pooled). The stages stay
    reachable as ``resnet.layer1`` ... ``resnet.layer4`` (each now ``Sequential(stage, attention)``),
    which is where Grad-CAM hooks.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: Sequence[int] = (4, 8, 16, 32),
                 layers: Sequence[int] = (1, 1, 1, 1), stem_stride: int = 1, attention: str = "se",
                 reduction: int = 4):
        super().__init__()
        if len(channels) != 4 or len(layers) != 4:
            raise ValueError(f"channels and layers need 4 stages each, got {list(channels)} and {list(layers)}")
        self.resnet = ResNet(
            block="basic", layers=list(layers), block_inplanes=list(channels), spatial_dims=spatial_dims,
            n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=stem_stride, no_max_pool=True,
            feed_forward=False,
        )
        for index, width in enumerate(channels, start=1):
            stage = getattr(self.resnet, f"layer{index}")
            setattr(self.resnet, f"layer{index}",
                    nn.Sequential(stage, attention_block(attention, spatial_dims, width, reduction)))
        self.out_features = int(channels[-1])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.resnet(image)


class SCNet(nn.Module):
    """CT patch (+ clinical vector) -> class logits.

    ``forward(image)`` with ``image`` ``(B, in_channels, H, W, D)`` (or ``(B, in_channels, H, W)`` when
    ``spatial_dims=2``) gives ``(B, num_classes)`` for the image-only variant (``fusion=False``);
    the fused variant needs ``forward(image, clinical)`` with ``clinical`` ``(B, clinical_features)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (4, 8, 16, 32),
        layers: Sequence[int] = (1, 1, 1, 1),
        stem_stride: int = 1,
        attention: str = "se",
        reduction: int = 4,
        fusion: bool = True,
        clinical_features: int = 11,
        clinical_hidden: int = 16,
        image_hidden: int = 32,
        fusion_hidden: int = 32,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.config: dict[str, Any] = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "num_classes": num_classes,
            "channels": list(channels), "layers": list(layers), "stem_stride": stem_stride, "attention": attention,
            "reduction": reduction, "fusion": fusion, "clinical_features": clinical_features,
            "clinical_hidden": clinical_hidden, "image_hidden": image_hidden, "fusion_hidden": fusion_hidden,
            "dropout": dropout,
        }
        self.fusion = bool(fusion)
        self.clinical_features = int(clinical_features)
        self.image_encoder = ImageEncoder(spatial_dims, in_channels, channels, layers, stem_stride, attention,
                                          reduction)
        self.image_projection = nn.Sequential(nn.Linear(self.image_encoder.out_features, image_hidden),
                                              nn.ReLU(inplace=True))
        self.clinical_encoder = (nn.Sequential(nn.Linear(clinical_features, clinical_hidden), nn.ReLU(inplace=True))
                                 if self.fusion else None)
        width = image_hidden + (clinical_hidden if self.fusion else 0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, fusion_hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(fusion_hidden, num_classes))

    def variant(self, **changes: Any) -> SCNet:
        """A new, untrained network with this one's hyper-parameters except ``changes``, e.g. ``fusion=False``."""
        return SCNet(**{**self.config, **changes})

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, image_hidden)``."""
        return self.image_projection(self.image_encoder(image))

    def fuse(self, image_features: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        """Image features ``(B, image_hidden)`` [+ clinical ``(B, clinical_features)``] -> logits ``(B, num_classes)``.

        Split from :meth:`forward` so that attributions over the clinical vector reuse one image pass.
        """
        if self.fusion:
            if clinical is None:
                raise ValueError("the fused SC-Net needs the clinical vector: call network(image, clinical)")
            if clinical.shape != (image_features.shape[0], self.clinical_features):
                raise ValueError(f"clinical vector of shape {tuple(clinical.shape)}, expected "
                                 f"({image_features.shape[0]}, {self.clinical_features})")
            clinical_features = self.clinical_encoder(clinical.to(image_features.dtype))
            image_features = torch.cat([image_features, clinical_features], dim=1)
        return self.head(image_features)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(self.image_features(image), clinical)
