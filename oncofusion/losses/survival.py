"""Negative Cox partial log-likelihood for networks that output a log-hazard per case."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CoxPartialLikelihoodLoss"]


class CoxPartialLikelihoodLoss(nn.Module):
    """``-(1/D) sum_{i: event} [eta_i - log sum_{j: time_j >= time_i} exp(eta_j)]``, Breslow ties.

    ``eta`` is the network's log-hazard (higher = shorter survival). Cases that fail at the same time
    all keep each other in their risk sets (Breslow's approximation), and ``D`` is the number of
    events, so the value does not grow with the batch. Risk sets are those of the batch: the batch
    should hold several events, which :meth:`oncofusion.targets.SurvivalTarget.sample_weights`
    helps a sampler ensure. A batch without an event carries no information; it returns a zero that
    is still connected to ``eta``, so that a training loop can call ``backward`` on it.

    Args:
        reduction: ``"mean"`` (over events) or ``"sum"``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, log_hazard: torch.Tensor, time: torch.Tensor,
                event: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            log_hazard: ``(B,)`` or ``(B, 1)``.
            time: ``(B,)`` follow-up times; or ``(B, 2)`` holding ``[time, event]`` when ``event`` is
                omitted (the tensor :meth:`SurvivalTarget.to_tensor` batches, for trainers that
                call ``loss(prediction, label)``).
            event: ``(B,)``, 1 for an observed event, 0 for censored.
        """
        if event is None:
            if time.ndim != 2 or time.shape[1] != 2:
                raise ValueError(f"without event, time must be (B, 2) holding [time, event], got "
                                 f"{tuple(time.shape)}")
            time, event = time[:, 0], time[:, 1]
        eta = log_hazard.reshape(-1) if log_hazard.ndim == 2 and log_hazard.shape[1] == 1 else log_hazard
        time, event = time.reshape(-1), event.reshape(-1)
        if eta.ndim != 1 or eta.shape != time.shape or eta.shape != event.shape:
            raise ValueError(f"log_hazard {tuple(log_hazard.shape)}, time {tuple(time.shape)} and event "
                             f"{tuple(event.shape)} must be (B,) (log_hazard may be (B, 1)) with one B")
        event = event.to(eta.dtype)
        order = torch.argsort(time, descending=True)
        eta, time, event = eta[order], time[order], event[order]
        log_cumulative = torch.logcumsumexp(eta, dim=0)
        # the risk set of a case runs to the last case that failed at its time (Breslow)
        descending = -time.contiguous()
        last_tied = torch.searchsorted(descending, descending, right=True) - 1
        log_risk = log_cumulative[last_tied]
        total = -((eta - log_risk) * event).sum()
        if self.reduction == "sum":
            return total
        return total / event.sum().clamp(min=1.0)
