"""LLNM-Net explanations: attention rollout and Grad-CAM++ over the image patches, and integrated gradients
of the LLNM log-odds over the report tokens and over the scalar tokens.

- Attention rollout (Abnar & Zuidema 2020): each layer's head-averaged attention, mixed half and half with
  the identity for the residual path and renormalised, multiplied through the layers; the network pools
  the mean of its valid tokens, so a token's relevance is the mean over the valid rows of the rolled-out
  matrix. The bidirectional fusion layers return one mixing matrix over all tokens
  (:class:`~oncofusion.models.thyroid_llnm.network.BidirectionalAttention`), so they roll out like any
  self-attention layer.
- Grad-CAM++ (Chattopadhay et al. 2018) of the LLNM log-odds, the image patch tokens of the network's
  final (LayerNorm-ed) joint tokens playing the part of a CNN's last feature map: hidden units are the
  channels, patches the positions. Unlike rollout it is signed by the gradient: it shows patches whose
  features raise the LLNM log-odds.
- Integrated gradients (Sundararajan et al. 2017) over a group of input tokens, from a baseline of the
  same group: scalar tokens from their learned "missing" embeddings (the contribution of knowing each
  value), report tokens from their position embeddings alone (the contribution of each token's content).
  Completeness holds per group: the contributions add up to the log-odds difference between the inputs
  and that baseline, the rest of the inputs as given.

The tokens of a group are substituted by shadowing the network's ``embed_scalars`` / ``embed_text`` on
the instance for the duration of one call: the network's own forward runs, nothing of it is copied here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from oncofusion.explain.attribution import integrated_gradients


def attention_rollout(attentions: Sequence[torch.Tensor], valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, heads, N, N)`` per layer -> ``(B, N)``: each token's share of the mean-pooled output.

    ``valid`` ``(B, N)`` marks the tokens the network pools (padding excluded); rows sum to 1 and so does
    the result.
    """
    if not attentions:
        raise ValueError("no attention maps: call the network with return_attention=True")
    batch, _, size, _ = attentions[0].shape
    identity = torch.eye(size, dtype=attentions[0].dtype, device=attentions[0].device).expand(batch, size, size)
    rolled = identity
    for weights in attentions:
        if weights.shape[-1] != size:
            raise ValueError(f"attention maps of {weights.shape[-1]} and {size} tokens: one token layout per rollout")
        mixed = 0.5 * weights.detach().mean(dim=1) + 0.5 * identity
        rolled = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rolled
    rows = torch.ones(batch, size, dtype=rolled.dtype, device=rolled.device) if valid is None else valid.to(rolled.dtype)
    return (rows.unsqueeze(-1) * rolled).sum(dim=1) / rows.sum(dim=1, keepdim=True)


def grad_cam_pp_map(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ of ``(P, C)`` activations (P positions, C channels) and the score's gradients -> ``(P,)``.

    Per channel the weight is ``sum_p alpha_pc * relu(g_pc)`` with ``alpha = g^2 / (2 g^2 + sum_p A * g^3)``
    (the closed form of the paper for an exponential score), and the map is ``relu(A @ weights)``.
    """
    squared, cubed = gradients.pow(2), gradients.pow(3)
    denominator = 2 * squared + activations.sum(dim=0, keepdim=True) * cubed
    alpha = torch.where(denominator != 0, squared / torch.where(denominator != 0, denominator, 1.0), 0.0)
    weights = (alpha * torch.relu(gradients)).sum(dim=0)
    return torch.relu(activations @ weights)


def grad_cam_pp(network: nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
    """Grad-CAM++ of one case's LLNM log-odds over its image patch tokens, ``(P,)`` in patch order.

    ``inputs``: ``(image, input_ids, attention_mask, scalars)`` as the network takes them. The network's
    own ``encode`` and ``classify`` run; no hook is left on it.
    """
    with torch.enable_grad():
        tokens, mask, _ = network.encode(*inputs)
        log_odds = network.classify(tokens, mask)[0, 0]
        gradients = torch.autograd.grad(log_odds, tokens)[0]
    length = 0 if inputs[1] is None else inputs[1].shape[1]
    patches = network.token_slices(length)["patches"]
    return grad_cam_pp_map(tokens[0, patches].detach(), gradients[0, patches])


@contextmanager
def _shadowed(module: nn.Module, name: str, function: Callable[..., torch.Tensor]) -> Iterator[None]:
    """``module.<name>`` answers with ``function`` inside the block (an instance attribute shadows the method)."""
    setattr(module, name, function)
    try:
        yield
    finally:
        delattr(module, name)


def _repeat(value: torch.Tensor | None, count: int) -> torch.Tensor | None:
    return None if value is None else value.expand(count, *value.shape[1:])


def _positive_log_odds(network: nn.Module, inputs: Sequence[Any], count: int) -> torch.Tensor:
    """The network's single LLNM logit for ``count`` copies of one case, ``(count,)``."""
    image, input_ids, attention_mask, scalars = (_repeat(x, count) if torch.is_tensor(x) else x for x in inputs)
    return network(image, input_ids, attention_mask, scalars)[:, 0]


def scalar_contributions(network: nn.Module, inputs: Sequence[Any], steps: int = 32) -> np.ndarray:
    """Per scalar token, its integrated-gradient share of the LLNM log-odds from the "missing" embeddings.

    ``inputs``: one case's ``(image, input_ids, attention_mask, scalars)`` as the network takes them, the
    scalars ``(1, S)``. Returns ``(S,)``; a missing scalar contributes 0.
    """
    scalars = inputs[3]
    with torch.no_grad():
        present = network.embed_scalars(scalars, 1)[0]
        baseline = network.embed_scalars(torch.full_like(scalars, float("nan")), 1)[0]

    def log_odds(path: torch.Tensor) -> torch.Tensor:
        with _shadowed(network, "embed_scalars", lambda values, batch: path):
            return _positive_log_odds(network, inputs, path.shape[0])

    attributions = integrated_gradients(log_odds, present, baseline, steps)
    return attributions.sum(dim=-1).detach().cpu().numpy()


def token_contributions(network: nn.Module, inputs: Sequence[Any], steps: int = 32) -> np.ndarray:
    """Per report token, its integrated-gradient share of the LLNM log-odds from a baseline where every
    token keeps only its position embedding (its content removed). Returns ``(L,)``."""
    input_ids, attention_mask = inputs[1], inputs[2]
    with torch.no_grad():
        present = network.embed_text(input_ids, attention_mask)[0]
    baseline = network.text_position[0, : present.shape[0]].detach().expand_as(present)

    def log_odds(path: torch.Tensor) -> torch.Tensor:
        with _shadowed(network, "embed_text", lambda ids, mask: path):
            return _positive_log_odds(network, inputs, path.shape[0])

    attributions = integrated_gradients(log_odds, present, baseline.contiguous(), steps)
    return attributions.sum(dim=-1).detach().cpu().numpy()


def word_attributions(tokens: Sequence[str], values: Sequence[float], skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """WordPiece tokens and their values -> words (``##`` pieces joined, values summed) with their
    position among the words; tokens in ``skip`` (special tokens) are left out."""
    words: list[dict[str, Any]] = []
    for token, value in zip(tokens, values, strict=True):
        if token in skip:
            continue
        if token.startswith("##") and words:
            words[-1]["token"] += token[2:]
            words[-1]["log_odds"] += float(value)
        else:
            words.append({"token": token, "position": len(words), "log_odds": float(value)})
    return words


def sentence_attributions(words: Sequence[dict[str, Any]], ends: Sequence[str] = (".", ";", "!", "?")
                          ) -> list[dict[str, Any]]:
    """Words (from :func:`word_attributions`) grouped into sentences at ``ends``, values summed."""
    sentences: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    for word in words:
        current.append(word)
        if word["token"] in ends:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return [{"text": " ".join(w["token"] for w in sentence).replace(" .", ".").replace(" ,", ","),
             "log_odds": float(sum(w["log_odds"] for w in sentence))} for sentence in sentences]


def patch_relevance(relevance: torch.Tensor, slices: dict[str, slice], grid: Sequence[int]) -> np.ndarray:
    """The image patches' share of a rollout ``(N,)`` as a ``grid`` map, rescaled to [0, 1] (0 if flat)."""
    patches = relevance[slices["patches"]].detach().cpu().numpy().reshape(tuple(grid))
    span = float(patches.max() - patches.min())
    return ((patches - patches.min()) / span).astype(np.float32) if span > 1e-12 else np.zeros_like(patches)
