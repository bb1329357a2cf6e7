"""SMuRF: Swin encoders for CT regions and slide grids, token fusion and a grade + survival head.

Song et al., "SMuRF: Swin-Transformer-based multimodal and multi-region data fusion framework to
predict OPSCC survival and grade", eBioMedicine 2025;114:105663. The authors' first upload
(``models.py``, ``swintransformer.py``, ``losses.py``) was read, not copied; this is a re-implementation
on MONAI's Swin blocks.

Data flow, one 24-d token per modality::

    ct_tumor (B, 4, X, Y, Z) --SwinEncoder 3D--+
    ct_nodes (B, 4, X, Y, Z) --(same encoder)---+--> tokens (B, N, 24) --fusion--> head --> (B, 2)
    wsi (B, [n,] 192, S, S)  --SwinEncoder 2D--+                                   [grade_logit, log_hazard]

**Encoders** (:class:`SwinEncoder`). MONAI's ``SwinTransformer`` always runs four stages (its
``forward`` indexes ``layers3[0]`` and ``layers4[0]``), so the two-stage encoder of the paper is composed
from MONAI's ``PatchEmbed``, ``BasicLayer`` and ``PatchMerging``: patch embedding to 12 channels, two
stages (depths 2, 2; heads 3, 6; window 4; each ending in a 2x patch merging, so 12 -> 24 -> 48
channels), LayerNorm over the 48 channels, global average pool, 1x1(x1) convolution to 24.

- CT: the four channels are the four sub-volumes at the quartiles of the region's axial extent
  (:mod:`oncofusion.models.opscc_smurf.subvolumes`), each ``X x Y x Z`` = ``128 x 128 x 4`` in MONAI's
  voxel order (slices last). The patch is ``(2, 2, 1)`` in that order: the paper's ``(1, 2, 2)`` is in
  the authors' ``(Z, Y, X)`` order. ``Z`` is halved by each merging (4 -> 2 -> 1), as in the authors'
  code. By default one encoder reads both regions (``share_ct_encoder=True``): the authors build a
  node encoder but their ``forward`` runs the tumor encoder on the node input, so only shared weights
  were ever trained.
- Pathology: the region-embedding grid ``(192, S, S)`` of one tissue fragment, patch ``(2, 2)``. A
  patient with several fragments is given as ``(B, n, 192, S, S)`` plus ``wsi_mask`` ``(B, n)`` (1 for a
  real fragment, 0 for padding): the encoder runs on every fragment, each fragment's feature map is
  normalised and averaged over its grid, the fragments are averaged (padding excluded), then projected
  to 24. (The authors reshape ``(B * n, 48, h, w)`` straight to ``(B, 48, n, h, w)``, which mixes
  channels of different fragments, and average padded fragments in; neither is copied.)
  Before the encoder, every grid cell that holds a region is standardised per channel with the
  training set's mean and standard deviation (buffers ``wsi_mean``, ``wsi_std``, set by
  :meth:`SmurfNet.set_wsi_statistics` before training and saved with the weights; identity until
  set); empty cells stay zero. Region embeddings of a fixed encoder differ between patients by a few
  per cent of their channel means, which the patch embedding would otherwise drown in the offsets.

**Fusion** (``fusion``), on the tokens in the order ``ct_tumor, ct_nodes, wsi``:

- ``"attention"``: one self-attention layer (``nn.MultiheadAttention``, softmax over the keys; the
  authors normalise over the queries, ``Softmax(dim=1)`` of ``(B, Nq, Nk)``, which is not copied), the
  attended tokens concatenated: ``N * 24`` features;
- ``"kronecker"`` (default; the authors' ``fused_attention``): the same attention, then each token
  gets a trailing 1 and the outer product of all tokens is flattened: ``25 ** N`` features (15625 for
  three tokens), holding every token, every pairwise and every triple product;
- ``"concatenation"``: the encoder tokens side by side, no attention: ``N * 24``.

A single-modality model fuses its token with itself (N = 2), as the authors' pathology-only model
does, so that its Kronecker features are second order.

**Head**: two blocks ``[Linear, LeakyReLU(0.1), BatchNorm1d, Dropout(0.3)]`` of 64 and 16 units and a
``Linear(16, 2)``. The output stays raw: column 0 a grade logit, column 1 a log-hazard. The authors
pass both through a sigmoid and then into ``BCEWithLogitsLoss`` and the Cox loss (a double sigmoid
that caps the log-hazard to (0, 1)); that is not copied, and
:class:`oncofusion.losses.multitask.MultitaskGradeSurvivalLoss` takes the raw columns.

**Calling it.** ``forward(*inputs, wsi_mask=None, **named)`` takes one tensor per modality of
``modalities``, positionally in that order and/or by name, and returns one ``(B, 2)`` tensor. One
tensor keeps MONAI's ``SupervisedTrainer``, post-transforms and ``verify_net_in_out``-style checks
simple, and positional modality inputs are what captum's attribution methods pass. In a trainer the
batch's ``image`` holds the first modality and :func:`batch_keys` gives ``PrepareBatchExtraInput`` the
rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import PatchEmbed
from monai.networks.layers import Conv, Pool
from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging
from monai.utils import ensure_tuple_rep
from torch import nn

#: the modalities, in the order their tokens enter the fusion
MODALITIES = ("ct_tumor", "ct_nodes", "wsi")
CT_MODALITIES = ("ct_tumor", "ct_nodes")
FUSIONS = ("attention", "kronecker", "concatenation")
#: the four sub-volumes of a CT region, one per quartile of its axial extent
CT_CHANNELS = 4
#: width of one region embedding of the slide grid (HIPT-4K's output)
WSI_CHANNELS = 192
#: the columns of the network's output
OUTPUT_CHANNELS = ("grade_logit", "log_hazard")
GRADE_LOGIT, LOG_HAZARD = 0, 1


class SwinEncoder(nn.Module):
    """A two-stage (by default) Swin transformer pooled to one vector: ``(B, C, *S) -> (B, out_features)``.

    ``PatchEmbed`` (``patch_size``, to ``embed_dim`` channels), then one MONAI ``BasicLayer`` per entry
    of ``depths`` (shifted windows of ``window_size``; each stage ends in a ``PatchMerging`` that halves
    every spatial axis and doubles the channels), LayerNorm over the channels, average pool over space,
    a 1x1 convolution to ``out_features``.

    Each spatial size must be a multiple of the patch size (PatchEmbed would otherwise zero-pad
    silently); windows larger than a feature map shrink to it, and smaller ones are padded by MONAI.

    Args:
        spatial_dims: 3 (CT sub-volumes) or 2 (slide grids).
        in_channels: input channels (4 sub-volumes, or 192 embedding features).
        out_features: width of the output token.
        embed_dim: channels after the patch embedding; stage ``i`` outputs ``embed_dim * 2 ** (i + 1)``.
        patch_size: patch size per spatial axis (an int is repeated).
        window_size: attention window, one int for all stages or one per stage (isotropic per stage).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: MLP width over the channels in each Swin block.
        drop_rate: dropout after the patch embedding and inside the blocks.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
        name: what error messages call the input.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = CT_CHANNELS,
        out_features: int = 24,
        embed_dim: int = 12,
        patch_size: Sequence[int] | int = (2, 2, 1),
        window_size: Sequence[int] | int = 4,
        depths: Sequence[int] = (2, 2),
        num_heads: Sequence[int] = (3, 6),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        name: str = "input",
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} need one entry per stage")
        windows = [window_size] * len(depths) if isinstance(window_size, int) else list(window_size)
        if len(windows) != len(depths):
            raise ValueError(f"window_size {window_size} needs one int, or one per stage ({len(depths)})")
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.name = name
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        self.patch_embed = PatchEmbed(self.patch_size, in_channels, embed_dim, norm_layer=None,
                                      spatial_dims=spatial_dims)
        self.embed_dropout = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList(
            BasicLayer(dim=embed_dim * 2**i, depth=depth, num_heads=heads,
                       window_size=ensure_tuple_rep(window, spatial_dims),
                       drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])], mlp_ratio=mlp_ratio, qkv_bias=True,
                       drop=drop_rate, attn_drop=attn_drop_rate, norm_layer=nn.LayerNorm, downsample=PatchMerging)
            for i, (depth, heads, window) in enumerate(zip(depths, num_heads, windows, strict=True))
        )
        self.num_features = embed_dim * 2 ** len(depths)
        self.norm = nn.LayerNorm(self.num_features)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.projection = Conv[Conv.CONV, spatial_dims](self.num_features, out_features, kernel_size=1)
        self.out_features = int(out_features)

    def check(self, x: torch.Tensor, name: str | None = None, leading: str = "B") -> None:
        """Raise a ``ValueError`` that names the input (``name``, else the encoder's) when ``x`` is not
        ``(B, in_channels, *S)`` float with each spatial size a multiple of the patch."""
        name = name or self.name
        axes = "XYZ"[:self.spatial_dims] if self.spatial_dims == 3 else "SS"
        expected = f"({leading}, {self.in_channels}, {', '.join(axes)})"
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name} of shape {tuple(x.shape)}, expected {expected} with {self.in_channels} "
                             f"channels first")
        if not x.is_floating_point():
            raise ValueError(f"{name} has dtype {x.dtype}; expected a float tensor")
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ValueError(f"{name} of spatial size {spatial} is not a multiple of the patch size "
                             f"{self.patch_size}; crop or pad it to a multiple")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, num_features, *S')``, LayerNorm-ed over the channels."""
        x = self.embed_dropout(self.patch_embed(x))
        for stage in self.stages:
            x = stage(x.contiguous())
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)

    def pooled(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """``(B, C, *S) -> (B, num_features)``: the feature map averaged over space."""
        self.check(x, name)
        return self.pool(self.feature_map(x)).flatten(1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, num_features) -> (B, out_features)`` through the 1x1 convolution."""
        return self.projection(pooled.reshape(*pooled.shape, *(1,) * self.spatial_dims)).flatten(1)

    def forward(self, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """``(B, C, *S) -> (B, out_features)``; ``name`` is what an error message calls ``x``."""
        return self.project(self.pooled(x, name))


def kronecker_fusion(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, D) -> (B, (D + 1) ** N)``: each token extended with a trailing 1, the outer product of all.

    The trailing 1 keeps the lower-order terms: the result holds every token itself, every product of
    two tokens' features, ... up to the products of all N.
    """
    ones = tokens.new_ones(*tokens.shape[:-1], 1)
    extended = torch.cat([tokens, ones], dim=-1)
    fused = extended[:, 0]
    for index in range(1, extended.shape[1]):
        fused = (fused[:, :, None] * extended[:, index, None, :]).flatten(1)
    return fused


def fusion_features(fusion: str, num_tokens: int, token_features: int) -> int:
    """Width of the fused vector for ``num_tokens`` tokens of ``token_features``."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return (token_features + 1) ** num_tokens if fusion == "kronecker" else num_tokens * token_features


def head_block(in_features: int, out_features: int, negative_slope: float, dropout: float) -> nn.Sequential:
    """``[Linear, LeakyReLU, BatchNorm1d, Dropout]``, the order of the authors' head."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.LeakyReLU(negative_slope),
                         nn.BatchNorm1d(out_features), nn.Dropout(dropout))


class SmurfNet(nn.Module):
    """CT tumor and node sub-volumes and slide grids -> ``(B, 2)`` [grade logit, log-hazard].

    Inputs (those of ``modalities``, positionally in that order and/or by name):

    - ``ct_tumor``, ``ct_nodes``: ``(B, 4, X, Y, Z)`` float in [0, 1] (windowed CT), the four quartile
      sub-volumes as channels; ``128 x 128 x 4`` in the paper;
    - ``wsi``: ``(B, 192, S, S)`` one region-embedding grid per patient, or ``(B, n, 192, S, S)`` with
      ``wsi_mask`` ``(B, n)`` (1 real fragment, 0 padding; all real when omitted). ``S`` is a multiple
      of 2 (16 in the demos).

    Inputs of modalities the variant does not use are ignored, so one batch feeds every variant.

    Args:
        modalities: the encoders built and the tokens fused, in the order of :data:`MODALITIES`:
            all three (fusion), ``("ct_tumor", "ct_nodes")`` (radiology), ``("wsi",)`` (pathology).
        fusion: ``"attention"``, ``"kronecker"`` or ``"concatenation"`` (see the module docstring).
        share_ct_encoder: one CT encoder reads both the tumor and the node input (the authors' code);
            False builds a second encoder for the nodes.
        feature_size: width of each modality token (24).
        ct_embed_dim, ct_patch_size, ct_window_size, ct_depths, ct_num_heads: the CT encoder's Swin
            hyper-parameters (12, (2, 2, 1) in X, Y, Z order, 4, (2, 2), (3, 6)).
        wsi_embed_dim, wsi_patch_size, wsi_window_size, wsi_depths, wsi_num_heads: the same for the slide
            grids (12, 2, 4, (2, 2), (3, 6)).
        encoder_dropout, encoder_attention_dropout: dropout inside both encoders (0 in the paper's
            fusion model).
        fusion_heads: heads of the fusion self-attention (the authors' layer is single-head).
        hidden_units: widths of the head blocks (64, 16).
        dropout: dropout of the head blocks (0.3).
        negative_slope: LeakyReLU slope of the head blocks (0.1).

    BatchNorm in the head needs two or more cases per batch in training mode (``drop_last=True``).
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        fusion: str = "kronecker",
        share_ct_encoder: bool = True,
        feature_size: int = 24,
        ct_in_channels: int = CT_CHANNELS,
        ct_embed_dim: int = 12,
        ct_patch_size: Sequence[int] | int = (2, 2, 1),
        ct_window_size: Sequence[int] | int = 4,
        ct_depths: Sequence[int] = (2, 2),
        ct_num_heads: Sequence[int] = (3, 6),
        wsi_in_channels: int = WSI_CHANNELS,
        wsi_embed_dim: int = 12,
        wsi_patch_size: Sequence[int] | int = 2,
        wsi_window_size: Sequence[int] | int = 4,
        wsi_depths: Sequence[int] = (2, 2),
        wsi_num_heads: Sequence[int] = (3, 6),
        encoder_dropout: float = 0.0,
        encoder_attention_dropout: float = 0.0,
        fusion_heads: int = 1,
        hidden_units: Sequence[int] = (64, 16),
        dropout: float = 0.3,
        negative_slope: float = 0.1,
    ):
        super().__init__()
        self.modalities = self._check_modalities(modalities)
        self.config: dict[str, Any] = {
            "modalities": list(self.modalities), "fusion": fusion, "share_ct_encoder": share_ct_encoder,
            "feature_size": feature_size, "ct_in_channels": ct_in_channels, "ct_embed_dim": ct_embed_dim,
            "ct_patch_size": ct_patch_size, "ct_window_size": ct_window_size, "ct_depths": list(ct_depths),
            "ct_num_heads": list(ct_num_heads), "wsi_in_channels": wsi_in_channels, "wsi_embed_dim": wsi_embed_dim,
            "wsi_patch_size": wsi_patch_size, "wsi_window_size": wsi_window_size, "wsi_depths": list(wsi_depths),
            "wsi_num_heads": list(wsi_num_heads), "encoder_dropout": encoder_dropout,
            "encoder_attention_dropout": encoder_attention_dropout, "fusion_heads": fusion_heads,
            "hidden_units": list(hidden_units), "dropout": dropout, "negative_slope": negative_slope,
        }
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.share_ct_encoder = bool(share_ct_encoder)
        self.feature_size = int(feature_size)
        common = {"out_features": feature_size, "drop_rate": encoder_dropout, "attn_drop_rate": encoder_attention_dropout}
        ct = {"spatial_dims": 3, "in_channels": ct_in_channels, "embed_dim": ct_embed_dim,
              "patch_size": ct_patch_size, "window_size": ct_window_size, "depths": ct_depths,
              "num_heads": ct_num_heads, **common}
        self.encoders = nn.ModuleDict()
        #: which entry of ``encoders`` reads each modality ("ct" when the CT encoder is shared)
        self.encoder_keys: dict[str, str] = {}
        for modality in self.modalities:
            if modality == "wsi":
                self.encoders["wsi"] = SwinEncoder(
                    spatial_dims=2, in_channels=wsi_in_channels, embed_dim=wsi_embed_dim,
                    patch_size=wsi_patch_size, window_size=wsi_window_size, depths=wsi_depths,
                    num_heads=wsi_num_heads, name="wsi", **common)
                self.encoder_keys["wsi"] = "wsi"
            else:
                key = "ct" if self.share_ct_encoder else modality
                if key not in self.encoders:
                    self.encoders[key] = SwinEncoder(name=key, **ct)
                self.encoder_keys[modality] = key
        self.num_tokens = max(len(self.modalities), 2)
        if "wsi" in self.modalities:
            self.register_buffer("wsi_mean", torch.zeros(wsi_in_channels))
            self.register_buffer("wsi_std", torch.ones(wsi_in_channels))
        self.attention = (nn.MultiheadAttention(feature_size, fusion_heads, batch_first=True)
                          if fusion in ("attention", "kronecker") else None)
        self.fused_features = fusion_features(fusion, self.num_tokens, feature_size)
        widths = [self.fused_features, *hidden_units]
        self.hidden = nn.Sequential(*(head_block(i, o, negative_slope, dropout)
                                      for i, o in zip(widths[:-1], widths[1:], strict=True)))
        self.output = nn.Linear(widths[-1], len(OUTPUT_CHANNELS))

    @staticmethod
    def _check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
        names = (modalities,) if isinstance(modalities, str) else tuple(modalities)
        unknown = [m for m in names if m not in MODALITIES]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"modalities must be distinct names out of {MODALITIES}, got {list(names)}")
        return tuple(m for m in MODALITIES if m in names)

    def variant(self, **changes: Any) -> SmurfNet:
        """A new, untrained network with this one's hyper-parameters except ``changes``,
        e.g. ``modalities=("wsi",)``."""
        return SmurfNet(**{**self.config, **changes})

    def encoder(self, modality: str) -> SwinEncoder:
        """The encoder that reads ``modality`` (the same object for both CT inputs when shared)."""
        if modality not in self.encoder_keys:
            raise ValueError(f"this network reads {list(self.modalities)}, not {modality!r}")
        return self.encoders[self.encoder_keys[modality]]

    def _gather(self, inputs: Sequence[torch.Tensor], named: Mapping[str, torch.Tensor | None]
                ) -> dict[str, torch.Tensor]:
        """Positional inputs in ``modalities`` order, then named ones; unused modalities are dropped."""
        if len(inputs) > len(self.modalities):
            raise ValueError(f"{len(inputs)} positional inputs for the modalities {list(self.modalities)}")
        unknown = sorted(set(named) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; the network takes {list(MODALITIES)} and wsi_mask")
        given = dict(zip(self.modalities[:len(inputs)], inputs, strict=True))
        twice = sorted(set(given) & {k for k, v in named.items() if v is not None})
        if twice:
            raise ValueError(f"{twice} given both positionally and by name")
        given.update({k: v for k, v in named.items() if k in self.modalities and v is not None})
        missing = [m for m in self.modalities if given.get(m) is None]
        if missing:
            raise ValueError(f"the {'+'.join(self.modalities)} network needs {missing}: pass "
                             f"network({', '.join(self.modalities)}) or name them")
        sizes = {m: int(given[m].shape[0]) for m in self.modalities}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"the inputs disagree on the batch size: {sizes}")
        return given

    def set_wsi_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise slide grids with these per-channel statistics of the training set's region cells
        (:func:`grid_channel_statistics`); they are saved with the weights, so serving uses them too."""
        if "wsi" not in self.modalities:
            raise ValueError(f"this network reads {list(self.modalities)}, no slide grid to standardise")
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        width = self.wsi_mean.numel()
        if mean.shape != (width,) or std.shape != (width,):
            raise ValueError(f"wsi statistics of shapes {tuple(mean.shape)}, {tuple(std.shape)}; expected ({width},) each")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("wsi statistics must be finite with every standard deviation > 0")
        self.wsi_mean.copy_(mean)
        self.wsi_std.copy_(std)

    def standardize_wsi(self, fragments: torch.Tensor) -> torch.Tensor:
        """``(..., D, S, S)``: cells holding a region -> ``(x - wsi_mean) / wsi_std``; empty cells stay 0."""
        shape = (-1, 1, 1)
        filled = (fragments != 0).any(dim=-3, keepdim=True).to(fragments.dtype)
        return (fragments - self.wsi_mean.view(shape)) / self.wsi_std.view(shape) * filled

    def encode_wsi(self, wsi: torch.Tensor, wsi_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 192, S, S)`` or ``(B, n, 192, S, S)`` [+ mask ``(B, n)``] -> token ``(B, feature_size)``."""
        encoder = self.encoder("wsi")
        fragments = wsi[:, None] if wsi.ndim == 4 else wsi
        channels = encoder.in_channels
        if fragments.ndim != 5 or fragments.shape[2] != channels:
            hint = (" (channel-last? move the embedding axis before the grid axes)"
                    if wsi.ndim in (4, 5) and wsi.shape[-1] == channels else "")
            raise ValueError(f"wsi of shape {tuple(wsi.shape)}, expected (B, {channels}, S, S) or "
                             f"(B, n_fragments, {channels}, S, S): {channels} region-embedding features per "
                             f"grid cell{hint}")
        b, n = fragments.shape[:2]
        encoder.check(fragments.flatten(0, 1), "wsi", leading="B * n_fragments")
        mask = torch.ones(b, n, dtype=fragments.dtype, device=fragments.device) if wsi_mask is None else wsi_mask
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"wsi_mask of shape {tuple(mask.shape)}, expected ({b}, {n}): one flag per fragment")
        mask = mask.to(fragments.dtype)
        counts = mask.sum(dim=1)
        if (counts <= 0).any():
            empty = torch.nonzero(counts <= 0).flatten().tolist()
            raise ValueError(f"wsi_mask marks no fragment as real for batch item(s) {empty}; every patient needs "
                             f"at least one tissue fragment")
        pooled = encoder.pooled(self.standardize_wsi(fragments.flatten(0, 1)), "wsi").unflatten(0, (b, n))
        pooled = (pooled * mask[..., None]).sum(dim=1) / counts[:, None]
        return encoder.project(pooled)

    def encode(self, *inputs: torch.Tensor, wsi_mask: torch.Tensor | None = None,
               **named: torch.Tensor | None) -> torch.Tensor:
        """The modality tokens ``(B, N, feature_size)`` in ``modalities`` order (N >= 2, see the module doc)."""
        given = self._gather(inputs, named)
        tokens = [self.encode_wsi(given[m], wsi_mask) if m == "wsi" else self.encoder(m)(given[m], m)
                  for m in self.modalities]
        if len(tokens) == 1:
            tokens = tokens * 2
        return torch.stack(tokens, dim=1)

    def fuse(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, feature_size) -> (B, fused_features)``."""
        if self.attention is not None:
            tokens, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        if self.fusion == "kronecker":
            return kronecker_fusion(tokens)
        return tokens.flatten(1)

    def predict(self, fused: torch.Tensor) -> torch.Tensor:
        """``(B, fused_features) -> (B, 2)`` [grade logit, log-hazard]."""
        if self.training and fused.shape[0] < 2:
            raise ValueError("a batch of 1 in training mode: the head's BatchNorm needs >= 2 cases; use "
                             "drop_last=True in the DataLoader or call network.eval()")
        return self.output(self.hidden(fused))

    def forward(self, *inputs: torch.Tensor, wsi_mask: torch.Tensor | None = None,
                **named: torch.Tensor | None) -> torch.Tensor:
        """``forward(ct_tumor, ct_nodes, wsi, wsi_mask=None)`` for the fusion model (inputs of the variant's
        ``modalities`` in order, or by name) -> ``(B, 2)``: column 0 grade logit, column 1 log-hazard."""
        return self.predict(self.fuse(self.encode(*inputs, wsi_mask=wsi_mask, **named)))


def grid_channel_statistics(grids: Iterable[torch.Tensor | np.ndarray], min_std: float = 1e-6
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over the region cells of slide grids ``(n, D, S, S)``
    (empty, all-zero cells left out), for :meth:`SmurfNet.set_wsi_statistics`."""
    total = total_sq = None
    count = 0
    for grid in grids:
        grid = torch.as_tensor(grid, dtype=torch.float64)
        if grid.ndim != 4:
            raise ValueError(f"a slide grid of shape {tuple(grid.shape)}; expected (n_fragments, D, S, S)")
        cells = grid.movedim(1, -1).reshape(-1, grid.shape[1])
        cells = cells[(cells != 0).any(dim=1)]
        total = cells.sum(0) if total is None else total + cells.sum(0)
        total_sq = (cells ** 2).sum(0) if total_sq is None else total_sq + (cells ** 2).sum(0)
        count += cells.shape[0]
    if count < 2:
        raise ValueError(f"{count} region cell(s) in the slide grids; the statistics need at least 2")
    mean = total / count
    std = ((total_sq / count - mean ** 2).clamp_min(0) * count / (count - 1)).sqrt().clamp_min(min_std)
    return mean.float(), std.float()


def batch_keys(modalities: Sequence[str] = MODALITIES, wsi_mask_key: str | None = "wsi_mask",
               keys: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Where a training batch holds each input: ``(image input, {keyword: batch key})``.

    MONAI's ``PrepareBatchExtraInput(extra_keys=...)`` passes the batch's ``image`` positionally and the
    dictionary as keywords, so the ``image`` key must hold the first modality (returned first, by
    name) and the others go by keyword. ``keys`` renames batch keys (default: the modality names).
    """
    names = SmurfNet._check_modalities(modalities)
    keys = dict(keys or {})
    extra = {m: keys.get(m, m) for m in names[1:]}
    if "wsi" in names and wsi_mask_key is not None:
        extra["wsi_mask"] = wsi_mask_key
    return names[0], extra


def network_data_format(modalities: Sequence[str] = MODALITIES, ct_shape: Sequence[int] = (128, 128, 4),
                        wsi_grid: int = 16) -> dict[str, Any]:
    """The ``network_data_format`` of a bundle's metadata for ``modalities`` (inputs in forward order)."""
    ct_channels = {str(i): f"sub-volume at quartile {i + 1} of the region's axial extent" for i in range(CT_CHANNELS)}
    inputs = {
        m: {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": CT_CHANNELS,
            "spatial_shape": [int(s) for s in ct_shape], "dtype": "float32", "value_range": [0, 1],
            "is_patch_data": True, "channel_def": ct_channels}
        for m in SmurfNet._check_modalities(modalities) if m in CT_MODALITIES
    }
    if "wsi" in modalities:
        inputs["wsi"] = {"type": "embedding", "format": "region-embedding-grid", "num_channels": WSI_CHANNELS,
                         "spatial_shape": [int(wsi_grid), int(wsi_grid)], "dtype": "float32", "value_range": [],
                         "channel_def": {"0": f"feature 0 of {WSI_CHANNELS} of a region embedding"}}
    outputs = {"pred": {"type": "regression", "format": "grade-logit,log-hazard", "num_channels": 2,
                        "spatial_shape": [], "dtype": "float32", "value_range": [],
                        "channel_def": {str(i): name for i, name in enumerate(OUTPUT_CHANNELS)}}}
    return {"inputs": inputs, "outputs": outputs}


def check_network_io(network: SmurfNet, data_format: Mapping[str, Any], batch_size: int = 2) -> torch.Tensor:
    """What ``monai.bundle verify_net_in_out`` checks, for a network of several inputs it cannot feed.

    Builds random inputs of each ``data_format["inputs"]`` entry's channels, shape, dtype and value range,
    runs ``network`` in eval mode (without gradients) and raises ``ValueError`` when the output is not
    ``(batch_size, num_channels)`` of the declared dtype and finite. Returns the output.
    """
    inputs = {}
    for name, spec in data_format["inputs"].items():
        shape = (batch_size, int(spec["num_channels"]), *(int(s) for s in spec["spatial_shape"]))
        value_range = spec["value_range"]
        low, high = (float(value_range[0]), float(value_range[1])) if len(value_range) == 2 else (0.0, 1.0)
        inputs[name] = (torch.rand(shape) * (high - low) + low).to(getattr(torch, spec["dtype"]))
    (out_name, out_spec), = data_format["outputs"].items()
    network.eval()
    with torch.no_grad():
        output = network(**inputs)
    expected = (batch_size, int(out_spec["num_channels"]))
    if tuple(output.shape) != expected or output.dtype != getattr(torch, out_spec["dtype"]):
        raise ValueError(f"output '{out_name}' is {tuple(output.shape)} {output.dtype}, the data format declares "
                         f"{expected} {out_spec['dtype']}")
    if not torch.isfinite(output).all():
        raise ValueError(f"output '{out_name}' has non-finite values")
    return output
