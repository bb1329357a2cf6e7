"""LLNM-Net: ultrasound image, report text and scalar features fused by bidirectional attention.

Shen et al., "Explainable multimodal deep learning for predicting thyroid cancer lateral lymph node
metastasis using ultrasound imaging", Nat Commun 2025;16:7052 (architecture derived from IRENE). The
authors' partial code was read, not copied; this is a re-implementation from the paper's description.

Token streams:

- image stream: ViT patches of the ultrasound image plus a CLS token, with their own learned position
  embedding;
- text-side stream: the report's token embeddings from a Hugging Face text encoder (projected to the
  hidden size) followed by one token per scalar (``Linear(1 -> hidden)`` each, or that scalar's learned
  "missing" embedding), each group with its own learned position embedding.

The two streams pass through bidirectional cross-attention blocks, are concatenated, pass through
ordinary self-attention blocks, and the LayerNorm-ed tokens are mean-pooled into a linear head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.utils import ensure_tuple_rep
from torch import nn

from oncofusion.networks.towers import HFTextTower, packaged_minilm_path

DEFAULT_SCALARS = ("aspect_ratio", "echogenicity_contrast", "age", "sex")

# Hugging Face ViT module names, transformers >= 5 first, then 4.x, for layer {0}
VIT_NAMES = {
    "query": ("layers.{0}.attention.q_proj", "encoder.layer.{0}.attention.attention.query"),
    "key": ("layers.{0}.attention.k_proj", "encoder.layer.{0}.attention.attention.key"),
    "value": ("layers.{0}.attention.v_proj", "encoder.layer.{0}.attention.attention.value"),
    "out": ("layers.{0}.attention.o_proj", "encoder.layer.{0}.attention.output.dense"),
    "attention_norm": ("layers.{0}.layernorm_before", "encoder.layer.{0}.layernorm_before"),
    "mlp_norm": ("layers.{0}.layernorm_after", "encoder.layer.{0}.layernorm_after"),
    "fc1": ("layers.{0}.mlp.fc1", "encoder.layer.{0}.intermediate.dense"),
    "fc2": ("layers.{0}.mlp.fc2", "encoder.layer.{0}.output.dense"),
}



def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of ``(B, heads, Nq, Dh)`` queries over ``(B, heads, Nk, Dh)`` keys/values.

    ``key_mask`` ``(B, Nk)`` is True (or 1) for keys that may be attended. Returns the context
    ``(B, heads, Nq, Dh)`` and, with ``need_weights``, the softmax weights ``(B, heads, Nq, Nk)`` before
    dropout (otherwise None, and PyTorch's fused kernel runs).
    """
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    if not need_weights:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout), None
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, dropout, training=dropout > 0) @ value, weights


class HeadProjections(nn.Module):
    """One stream's query, key, value and output projections, split into ``num_heads`` heads."""

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.out = nn.Linear(hidden_size, hidden_size)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, heads, N, D / heads)``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))

    def merge(self, context: torch.Tensor) -> torch.Tensor:
        """``(B, heads, N, Dh) -> (B, N, D)`` through the output projection."""
        return self.out(context.transpose(1, 2).flatten(2))


class BidirectionalAttention(nn.Module):
    """Two token streams attend to themselves and to each other with separate Q/K/V projections.

    The image output is the mean of image->image attention over image values and image->text attention
    over text values; the text output is symmetric. Either stream may be None (an ablation without it):
    the other then does plain self-attention.

    The weights, when asked for, are one ``(B, heads, Ni + Nt, Ni + Nt)`` matrix: since each output is
    the mean of two convex combinations, the block matrix ``[[A_ii, A_it], [A_ti, A_tt]] / 2`` is the
    exact mixing over all value tokens, its rows sum to 1, and attention rollout can treat it like any
    self-attention layer.
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        self.attention_dropout = attention_dropout
        self.image = HeadProjections(hidden_size, num_heads, qkv_bias)
        self.text = HeadProjections(hidden_size, num_heads, qkv_bias)

    def forward(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``image`` ``(B, Ni, D)``, ``text`` ``(B, Nt, D)``, ``text_mask`` ``(B, Nt)`` (1 = valid key)."""
        dropout = self.attention_dropout if self.training else 0.0
        streams = [(proj, x, mask) for proj, x, mask in ((self.image, image, None), (self.text, text, text_mask))
                   if x is not None]
        projected = [(proj, proj.qkv(x), mask) for proj, x, mask in streams]
        outputs, rows = [], []
        for proj, (query, _, _), _ in projected:
            attended = [attend(query, key, value, mask, dropout, need_weights)
                        for _, (_, key, value), mask in projected]
            outputs.append(proj.merge(sum(context for context, _ in attended) / len(attended)))
            if need_weights:
                rows.append(torch.cat([weights for _, weights in attended], dim=-1) / len(attended))
        weights = torch.cat(rows, dim=-2) if need_weights else None
        image_out = outputs.pop(0) if image is not None else None
        text_out = outputs.pop(0) if text is not None else None
        return image_out, text_out, weights


class BidirectionalBlock(nn.Module):
    """Pre-LayerNorm bidirectional attention and a per-stream MLP, each with a residual connection.

    ``(B, Ni, D), (B, Nt, D) -> (B, Ni, D), (B, Nt, D)`` and the attention weights (see
    :class:`BidirectionalAttention`).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, qkv_bias: bool = True, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.attention = BidirectionalAttention(hidden_size, num_heads, attention_dropout, qkv_bias)
        self.image_attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.text_attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.image_mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.text_mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.image_mlp = MLPBlock(hidden_size, mlp_dim, dropout, act="GELU")
        self.text_mlp = MLPBlock(hidden_size, mlp_dim, dropout, act="GELU")

    def forward(self, image: torch.Tensor | None, text: torch.Tensor | None, text_mask: torch.Tensor | None = None,
                need_weights: bool = False):
        image_update, text_update, weights = self.attention(
            None if image is None else self.image_attention_norm(image),
            None if text is None else self.text_attention_norm(text),
            text_mask, need_weights,
        )
        if image is not None:
            image = image + image_update
            image = image + self.image_mlp(self.image_mlp_norm(image))
        if text is not None:
            text = text + text_update
            text = text + self.text_mlp(self.text_mlp_norm(text))
        return image, text, weights


class SelfAttentionBlock(nn.Module):
    """A pre-LayerNorm transformer encoder layer over the joint tokens, with a key padding mask.

    ``(B, N, D) -> (B, N, D)`` and, with ``need_weights``, ``(B, heads, N, N)``. (MONAI's ``SABlock``
    drops the padding mask on its fused-kernel path, hence this small block.)
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, qkv_bias: bool = True, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.attention_dropout = attention_dropout
        self.attention = HeadProjections(hidden_size, num_heads, qkv_bias)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout, act="GELU")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, need_weights: bool = False):
        query, key, value = self.attention.qkv(self.attention_norm(x))
        context, weights = attend(query, key, value, mask, self.attention_dropout if self.training else 0.0,
                                  need_weights)
        x = x + self.attention.merge(context)
        return x + self.mlp(self.mlp_norm(x)), weights


class LLNMNet(nn.Module):
    """LLNM-Net: ``forward(image, input_ids, attention_mask, scalars)`` -> logits ``(B, num_classes)``.

    Inputs:

    - ``image``: ``(B, in_channels, H, W)`` float, ``(H, W) == image_size`` (224 x 224 by default),
      intensities normalised by the transforms (the network applies no normalisation of its own);
    - ``input_ids``: ``(B, L)`` token ids of the report, ``L <= max_text_tokens``, from :meth:`tokenize`
      (the tokenizer of the same checkpoint as the encoder); a list of ``B`` strings is tokenised here;
    - ``attention_mask``: ``(B, L)``, 1 for real tokens and 0 for padding (default: all 1). Padded
      tokens are never attended to and are left out of the pooled mean;
    - ``scalars``: ``(B, S)`` float, column ``s`` is ``scalar_names[s]``, standardised here as
      ``(x - scalar_center) / scalar_scale``. NaN (or +-inf) marks a missing value: that token is the
      scalar's learned missing embedding instead of its ``Linear(1 -> hidden)`` of the value, so a
      missing value is neither confused with 0 nor propagates NaN. ``scalars=None`` means all missing.

    ``forward(..., return_attention=True)`` returns ``(logits, attentions)``: one tensor
    ``(B, heads, N, N)`` per layer (fusion layers first, then joint layers), softmax weights before
    dropout, rows summing to 1, over the token layout of :meth:`token_slices` (CLS, patches, report
    tokens, scalar tokens; ``N = 1 + P + L + S``). They stay in the autograd graph; detach them for
    rollout. Without the flag no weights are materialised (fused attention kernels run).

    Ablations: ``use_image=False`` drops the image stream, ``text_encoder=None`` the report tokens and
    ``scalar_names=()`` the scalar tokens; with one stream left the fusion blocks are self-attention.

    Choices where the authors' code (Snowinbio/LLNM-Net) is inconsistent or silent:

    - fusion layer count: the code builds 2 bidirectional blocks but keeps the streams apart until
      layer 4 (and its config asks for 16 blocks, more than the 12 ViT-B blocks it loads weights for);
      we do what the paper describes: ``num_fusion_layers`` bidirectional blocks (default 2), then the
      concatenation, then ``num_joint_layers`` self-attention blocks (default 10: 12 in all, as IRENE
      and ViT-B/16, so :meth:`load_pretrained_vit` fills every image-stream block; the config's 16 is
      ``num_joint_layers=14``);
    - dropout: the config's 0.3 (MLP) and 0.2 (attention) are the tops of the ranges it comments; we
      default to ViT's 0.1 and 0.0 and leave the tuning to the bundle config;
    - report length: the config says 300 tokens, the paper 50; we default to 50 (special tokens
      included) and truncate longer reports in :meth:`tokenize`, which says which ones it truncated;
    - output projection: the code defines a text output projection but sends both streams through the
      image one; each stream here has its own;
    - padding: the code attends to and averages over padded report tokens; we mask them (keys and the
      pooled mean);
    - scalars: the code shares one ``Linear(1 -> d)`` between shape and echo and has no missing value;
      each scalar here has its own linear and its own missing embedding, any number of them, named;
    - head and metrics: the code trains 2 logits with BCE and reads AUC from an argmax; we give 1 logit
      for binary LLNM (``BCEWithLogitsLoss``; AUROC from ``sigmoid(logit)``, never from a thresholded
      label) and ``num_classes`` logits otherwise (3 for the risk levels);
    - attention maps: the code returns only image->image weights of the fusion blocks; we return the
      full mixing matrix of every layer (see :class:`BidirectionalAttention`);
    - text encoder: the code takes report embeddings precomputed by a BERT (``Linear(768 -> d)``);
      ``tuning="frozen"`` (default) is that setting, and the frozen encoder stays in eval mode
      (no dropout) while the rest trains; ``"lora"`` and ``"full"`` adapt it.
    """

    def __init__(
        self,
        num_classes: int = 1,
        image_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        num_fusion_layers: int = 2,
        num_joint_layers: int = 10,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        use_image: bool = True,
        text_encoder: str | None = "minilm",
        max_text_tokens: int = 50,
        tuning: str = "frozen",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.1,
        scalar_names: Sequence[str] = DEFAULT_SCALARS,
        scalar_center: Sequence[float] | None = None,
        scalar_scale: Sequence[float] | None = None,
        image_pretrained: str | None = None,
    ):
        """
        Args:
            num_classes: 1 for binary LLNM (one logit), 3 for the three risk levels.
            image_size, patch_size, in_channels: the image ``(B, in_channels, *image_size)`` cut into
                ``patch_size`` patches.
            hidden_size, num_heads, mlp_dim, qkv_bias, layer_norm_eps: width of every token, attention
                heads, MLP width, bias on Q/K/V, LayerNorm epsilon.
            num_fusion_layers, num_joint_layers: bidirectional blocks, then self-attention blocks (>= 0).
            dropout, attention_dropout: on embeddings and MLPs; on attention weights.
            use_image: False drops the image stream (text/scalar ablations).
            text_encoder: a Hugging Face encoder by local path or hub id, ``"minilm"`` for the packaged
                all-MiniLM-L6-v2, or None for no report tokens.
            max_text_tokens: report tokens at most, special tokens included (rows of the position table).
            tuning, lora_rank, lora_alpha, lora_dropout: ``"frozen"``, ``"lora"`` or ``"full"`` text
                encoder (see :func:`oncofusion.networks.towers.apply_tuning`).
            scalar_names: one token per name, in the column order of ``scalars``.
            scalar_center, scalar_scale: per-scalar standardisation (default 0 and 1), e.g. age 50 and 15.
            image_pretrained: a Hugging Face ViT checkpoint for the image stream (see
                :meth:`load_pretrained_vit`), or None to start from random weights.
        """
        super().__init__()
        self.image_size = ensure_tuple_rep(image_size, 2)
        self.patch_size = ensure_tuple_rep(patch_size, 2)
        if any(i % p for i, p in zip(self.image_size, self.patch_size, strict=True)):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_fusion_layers < 0 or num_joint_layers < 0:
            raise ValueError(f"layer counts must be >= 0, got {num_fusion_layers} and {num_joint_layers}")
        self.scalar_names = tuple(scalar_names)
        if len(set(self.scalar_names)) != len(self.scalar_names):
            raise ValueError(f"scalar_names has duplicates: {list(self.scalar_names)}")
        if not use_image and text_encoder is None and not self.scalar_names:
            raise ValueError("no input left: keep the image, a text_encoder or some scalar_names")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.max_text_tokens = max_text_tokens
        self.tuning = tuning
        self.dropout = nn.Dropout(dropout)

        self.num_patches = math.prod(i // p for i, p in zip(self.image_size, self.patch_size, strict=True))
        if use_image:
            self.patch_embedding = nn.Conv2d(in_channels, hidden_size, self.patch_size, stride=self.patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
            self.image_position = nn.Parameter(torch.zeros(1, 1 + self.num_patches, hidden_size))
        else:
            self.patch_embedding = None

        self.text_tower = None
        if text_encoder is not None:
            pretrained = packaged_minilm_path() if text_encoder == "minilm" else text_encoder
            self.text_tower = HFTextTower(pretrained, tuning, lora_rank, lora_alpha, lora_dropout, max_text_tokens)
            self.text_projection = nn.Linear(_hidden_width(self.text_tower.encoder), hidden_size)
            self.text_position = nn.Parameter(torch.zeros(1, max_text_tokens, hidden_size))

        num_scalars = len(self.scalar_names)
        self.scalar_embeddings = nn.ModuleList(nn.Linear(1, hidden_size) for _ in range(num_scalars))
        if num_scalars:
            self.scalar_missing = nn.Parameter(torch.zeros(num_scalars, hidden_size))
            self.scalar_position = nn.Parameter(torch.zeros(1, num_scalars, hidden_size))
        center = torch.zeros(num_scalars) if scalar_center is None else torch.as_tensor(scalar_center, dtype=torch.float)
        scale = torch.ones(num_scalars) if scalar_scale is None else torch.as_tensor(scalar_scale, dtype=torch.float)
        if center.shape != (num_scalars,) or scale.shape != (num_scalars,) or bool((scale <= 0).any()):
            raise ValueError(f"scalar_center and scalar_scale need {num_scalars} values (scale > 0), one per "
                             f"scalar of {list(self.scalar_names)}; got {center.tolist()} and {scale.tolist()}")
        self.register_buffer("scalar_center", center, persistent=False)
        self.register_buffer("scalar_scale", scale, persistent=False)

        block_args = (hidden_size, num_heads, mlp_dim, dropout, attention_dropout, qkv_bias, layer_norm_eps)
        self.fusion_layers = nn.ModuleList(BidirectionalBlock(*block_args) for _ in range(num_fusion_layers))
        self.joint_layers = nn.ModuleList(SelfAttentionBlock(*block_args) for _ in range(num_joint_layers))
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.head = nn.Linear(hidden_size, num_classes)
        for name, parameter in self.named_parameters():
            if name in ("cls_token", "image_position", "text_position", "scalar_missing", "scalar_position"):
                nn.init.trunc_normal_(parameter, std=0.02)
        if image_pretrained is not None:
            self.load_pretrained_vit(image_pretrained)

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer saved with the text encoder (None without a text encoder)."""
        return None if self.text_tower is None else self.text_tower.tokenizer

    def tokenize(self, texts: Sequence[str], padding: str = "longest") -> dict[str, torch.Tensor]:
        """Reports -> ``input_ids`` and ``attention_mask`` ``(B, L)``, ``L <= max_text_tokens``, on this
        network's device, plus ``truncated`` ``(B,)``: which reports lost tokens to the limit.

        ``padding="max_length"`` pads every batch to ``max_text_tokens`` (fixed shapes).
        """
        if self.tokenizer is None:
            raise RuntimeError("this network was built with text_encoder=None: it takes no report text")
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of reports, got one string: wrap it in a list")
        texts = list(texts)
        device = self.head.weight.device
        tokens = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt")
        full_lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        return {
            "input_ids": tokens["input_ids"].to(device),
            "attention_mask": tokens["attention_mask"].to(device),
            "truncated": torch.tensor([n > self.max_text_tokens for n in full_lengths], device=device),
        }

    def token_slices(self, num_text_tokens: int) -> dict[str, slice]:
        """Where each group sits among the joint tokens (and in the attention maps' last two axes)."""
        sizes = {"cls": 1 if self.patch_embedding is not None else 0,
                 "patches": self.num_patches if self.patch_embedding is not None else 0,
                 "text": num_text_tokens if self.text_tower is not None else 0,
                 "scalars": len(self.scalar_names)}
        slices, start = {}, 0
        for name, size in sizes.items():
            slices[name] = slice(start, start + size)
            start += size
        return slices

    def train(self, mode: bool = True) -> LLNMNet:
        """As ``nn.Module.train``, but a frozen text encoder stays in eval mode (a fixed feature extractor)."""
        super().train(mode)
        if self.text_tower is not None and self.tuning == "frozen":
            self.text_tower.eval()
        return self

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W) -> (B, 1 + P, D)``: CLS and patch tokens with their positions."""
        if image.ndim != 4 or image.shape[1] != self.in_channels or tuple(image.shape[2:]) != self.image_size:
            raise ValueError(f"image of shape {tuple(image.shape)}, expected (B, {self.in_channels}, "
                             f"{self.image_size[0]}, {self.image_size[1]}): resize in the transforms")
        patches = self.patch_embedding(image).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(image.shape[0], -1, -1), patches], dim=1)
        return self.dropout(tokens + self.image_position)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids and mask -> ``(B, L, D)`` projected encoder token features with their positions."""
        if input_ids.ndim != 2 or input_ids.shape[1] > self.max_text_tokens:
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}, expected (B, L <= "
                             f"{self.max_text_tokens}): tokenise with network.tokenize(texts), which truncates")
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError("a report has no valid token (attention_mask all 0): tokenise it with "
                             "network.tokenize, which keeps the special tokens even for an empty report")
        hidden = self.text_tower.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        tokens = self.text_projection(hidden) + self.text_position[:, : input_ids.shape[1]]
        return self.dropout(tokens)

    def embed_scalars(self, scalars: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``(B, S)`` values (NaN = missing) -> ``(B, S, D)``, one token per scalar."""
        num_scalars = len(self.scalar_names)
        dtype = self.scalar_missing.dtype
        if scalars is None:
            scalars = torch.full((batch, num_scalars), float("nan"), device=self.scalar_missing.device, dtype=dtype)
        if scalars.shape != (batch, num_scalars):
            raise ValueError(f"scalars of shape {tuple(scalars.shape)}, expected ({batch}, {num_scalars}) with "
                             f"columns {list(self.scalar_names)}; NaN marks a missing value")
        values = (scalars.to(dtype) - self.scalar_center) / self.scalar_scale
        missing = ~torch.isfinite(values)
        values = values.masked_fill(missing, 0.0)  # no NaN reaches a linear, nor its gradient
        present = torch.stack([linear(values[:, s, None]) for s, linear in enumerate(self.scalar_embeddings)], 1)
        tokens = torch.where(missing[..., None], self.scalar_missing.to(present.dtype), present)
        return self.dropout(tokens + self.scalar_position)

    def embed(self, image, input_ids=None, attention_mask=None, scalars=None):
        """Inputs -> image tokens ``(B, 1 + P, D)`` (or None), text-side tokens ``(B, L + S, D)`` (or None)
        and the text-side key mask ``(B, L + S)`` (or None)."""
        image_tokens = None
        if self.patch_embedding is not None:
            if image is None:
                raise ValueError("this network needs the image (B, C, H, W); build it with use_image=False "
                                 "for an ablation without one")
            image_tokens = self.embed_image(image)
        parts, masks = [], []
        if self.text_tower is not None:
            if input_ids is None:
                raise ValueError("this network needs the report: pass input_ids from network.tokenize(texts) "
                                 "(or the texts themselves)")
            if not torch.is_tensor(input_ids):
                tokens = self.tokenize(input_ids)
                input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            parts.append(self.embed_text(input_ids, attention_mask))
            masks.append(attention_mask.bool())
        if scalars is not None and not self.scalar_names:
            raise ValueError("this network was built with scalar_names=(): it takes no scalars")
        if self.scalar_names:
            known = [t.shape[0] for t in (image_tokens, *parts, scalars) if t is not None]
            if not known:
                raise ValueError(f"this network needs scalars (B, {len(self.scalar_names)}) with columns "
                                 f"{list(self.scalar_names)} (NaN = missing)")
            parts.append(self.embed_scalars(scalars, known[0]))
            masks.append(torch.ones(parts[-1].shape[:2], dtype=torch.bool, device=parts[-1].device))
        if not parts:
            return image_tokens, None, None
        return image_tokens, torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def encode(self, image, input_ids=None, attention_mask=None, scalars=None, return_attention: bool = False):
        """Inputs -> LayerNorm-ed joint tokens ``(B, N, D)``, their validity mask ``(B, N)`` and the list
        of per-layer attention maps ``(B, heads, N, N)`` (empty unless ``return_attention``)."""
        image_tokens, text_tokens, text_mask = self.embed(image, input_ids, attention_mask, scalars)
        attentions = []
        for layer in self.fusion_layers:
            image_tokens, text_tokens, weights = layer(image_tokens, text_tokens, text_mask, return_attention)
            attentions.append(weights)
        tokens = torch.cat([t for t in (image_tokens, text_tokens) if t is not None], dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if text_mask is not None:
            mask[:, tokens.shape[1] - text_mask.shape[1]:] = text_mask
        key_mask = None if bool(mask.all()) else mask
        for layer in self.joint_layers:
            tokens, weights = layer(tokens, key_mask, return_attention)
            attentions.append(weights)
        return self.norm(tokens), mask, attentions if return_attention else []

    def forward(self, image: torch.Tensor | None, input_ids: torch.Tensor | Sequence[str] | None = None,
                attention_mask: torch.Tensor | None = None, scalars: torch.Tensor | None = None,
                return_attention: bool = False):
        tokens, mask, attentions = self.encode(image, input_ids, attention_mask, scalars, return_attention)
        logits = self.classify(tokens, mask)
        return (logits, attentions) if return_attention else logits

    def classify(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoded tokens ``(B, N, D)`` and their validity ``(B, N)`` -> logits: the head on the mean of
        the valid tokens."""
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return self.head((tokens * weights).sum(dim=1) / weights.sum(dim=1))

    @torch.no_grad()
    def load_pretrained_vit(self, pretrained: str) -> None:
        """Copy a Hugging Face ViT checkpoint (local path or hub id) into the image stream.

        Patch embedding, CLS token and position embedding (bilinearly resized when the patch grid
        differs), then ViT layer ``i`` into the image side of fusion block ``i`` and, after them, into
        the joint blocks, and the final LayerNorm. The text side of the fusion blocks stays as
        initialised, as in IRENE. Width, heads, MLP width and patch size must match; ViT layers beyond
        this network's depth are ignored, blocks beyond the ViT's depth keep their initialisation.
        """
        from transformers import ViTModel

        if self.patch_embedding is None:
            raise RuntimeError("this network was built with use_image=False: there is no image stream to load")
        vit = ViTModel.from_pretrained(pretrained, add_pooling_layer=False)
        config = vit.config
        wanted = {"hidden_size": self.hidden_size, "patch_size": self.patch_size[0],
                  "num_channels": self.in_channels, "intermediate_size": self.mlp_dim}
        found = {key: getattr(config, key) for key in wanted}
        if found != wanted or config.num_attention_heads != self.num_heads or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"ViT checkpoint {pretrained} has {found} and {config.num_attention_heads} heads; "
                             f"this network has {wanted} and {self.num_heads} heads (square patches)")
        state = vit.state_dict()
        self.patch_embedding.load_state_dict(_module_state(state, "embeddings.patch_embeddings.projection"))
        self.cls_token.copy_(state["embeddings.cls_token"])
        self.image_position.copy_(_resize_positions(state["embeddings.position_embeddings"], self.image_size,
                                                    self.patch_size))
        targets = [(layer.attention.image, layer.image_attention_norm, layer.image_mlp_norm, layer.image_mlp)
                   for layer in self.fusion_layers]
        targets += [(layer.attention, layer.attention_norm, layer.mlp_norm, layer.mlp) for layer in self.joint_layers]
        for index, (projections, attention_norm, mlp_norm, mlp) in enumerate(targets[: config.num_hidden_layers]):
            for module, names in (
                (projections.query, VIT_NAMES["query"]), (projections.key, VIT_NAMES["key"]),
                (projections.value, VIT_NAMES["value"]), (projections.out, VIT_NAMES["out"]),
                (attention_norm, VIT_NAMES["attention_norm"]), (mlp_norm, VIT_NAMES["mlp_norm"]),
                (mlp.linear1, VIT_NAMES["fc1"]), (mlp.linear2, VIT_NAMES["fc2"]),
            ):
                module.load_state_dict(_module_state(state, *(name.format(index) for name in names)))
        self.norm.load_state_dict(_module_state(state, "layernorm"))


def _module_state(state: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """The weight and bias of the first of ``prefixes`` found in a state dict."""
    for prefix in prefixes:
        if f"{prefix}.weight" in state:
            return {name: state[f"{prefix}.{name}"] for name in ("weight", "bias") if f"{prefix}.{name}" in state}
    raise KeyError(f"none of {list(prefixes)} in the ViT checkpoint: not a Hugging Face ViT layout this code knows")


def _hidden_width(encoder: nn.Module) -> int:
    """Token width of a (possibly LoRA-wrapped) Hugging Face encoder."""
    base = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder
    return int(base.config.hidden_size)


def _resize_positions(positions: torch.Tensor, image_size: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """ViT position table ``(1, 1 + g*g, D)`` -> ``(1, 1 + P, D)`` for this grid (bilinear on the patches)."""
    grid = tuple(i // p for i, p in zip(image_size, patch_size, strict=True))
    cls, patches = positions[:, :1], positions[:, 1:]
    side = math.isqrt(patches.shape[1])
    if (side, side) == grid:
        return positions
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, -1, positions.shape[-1])], dim=1)
