"""Checkpoints that hold only what training changed.

With a frozen pretrained encoder and LoRA adapters, most of a network's weights are the pretrained
ones, loaded again from their source at build time. Saving only trainable parameters and buffers
(the PEFT adapter convention) keeps a fold checkpoint at a few MB instead of the encoder's size.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _unwrap(network: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel."""
    return getattr(network, "module", network)


def trainable_keys(network: nn.Module) -> set[str]:
    """State-dict keys of the parameters that train and of every buffer."""
    network = _unwrap(network)
    keys = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    return keys | {name for name, _ in network.named_buffers()}


def load_trainable_state(network: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a full or a trainable-only state dict; any trainable weight it lacks is an error."""
    network = _unwrap(network)
    result = network.load_state_dict(dict(state), strict=False)
    missing = set(result.missing_keys) & trainable_keys(network)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint does not fit the network: missing trainable {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )


class TrainableWeights:
    """A ``state_dict``/``load_state_dict`` view of a network restricted to :func:`trainable_keys`.

    Hand it to MONAI's ``CheckpointSaver``/``CheckpointLoader`` in place of the network.
    """

    def __init__(self, network: nn.Module):
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = trainable_keys(self.network)
        return {k: v for k, v in _unwrap(self.network).state_dict().items() if k in keys}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        load_trainable_state(self.network, state)
