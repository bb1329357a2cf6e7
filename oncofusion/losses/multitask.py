"""A binary label and right-censored survival learned together from one two-column prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oncofusion.losses.survival import CoxPartialLikelihoodLoss

__all__ = ["MultitaskGradeSurvivalLoss"]


class MultitaskGradeSurvivalLoss(nn.Module):
    """``grade_weight * BCEWithLogits(logit, grade) + survival_weight * Cox(log_hazard, time, event)``.

    Called as ``loss(prediction, target)``, the form MONAI's ``SupervisedTrainer`` uses:

    - ``prediction`` ``(B, 2)``: the raw grade logit (column ``grade_channel``) and the raw log-hazard
      (column ``hazard_channel``). Neither goes through a sigmoid first: BCE-with-logits applies its own,
      and a sigmoid on the log-hazard would cap every hazard ratio in the batch to at most ``e``;
    - ``target`` ``(B, 3)``: ``[grade, time, event]``, grade in [0, 1] (NaN when unknown), time > 0,
      event 1 observed / 0 censored.

    The survival term is :class:`~oncofusion.losses.survival.CoxPartialLikelihoodLoss` (Breslow ties, mean
    over the batch's events; a batch without events adds a zero). The grade term is averaged over the
    cases whose grade is known, so a case without grade still trains the survival output; a batch
    without any known grade adds a zero that stays connected to the prediction.

    Args:
        grade_weight: weight of the grade term.
        survival_weight: weight of the Cox term.
        grade_channel: column of the grade logit in ``prediction``.
        hazard_channel: column of the log-hazard in ``prediction``.
        pos_weight: optional weight of the positive grade class (``BCEWithLogitsLoss``'s ``pos_weight``).
    """

    def __init__(self, grade_weight: float = 0.5, survival_weight: float = 0.5, grade_channel: int = 0,
                 hazard_channel: int = 1, pos_weight: float | None = None) -> None:
        super().__init__()
        if grade_weight < 0 or survival_weight < 0 or grade_weight + survival_weight == 0:
            raise ValueError(f"the weights must be >= 0 and not both 0, got grade_weight={grade_weight}, "
                             f"survival_weight={survival_weight}")
        if grade_channel == hazard_channel:
            raise ValueError(f"grade_channel and hazard_channel must differ, both are {grade_channel}")
        self.grade_weight = float(grade_weight)
        self.survival_weight = float(survival_weight)
        self.grade_channel = int(grade_channel)
        self.hazard_channel = int(hazard_channel)
        self.pos_weight = None if pos_weight is None else float(pos_weight)
        self.cox = CoxPartialLikelihoodLoss()

    def _split(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        width = max(self.grade_channel, self.hazard_channel) + 1
        if prediction.ndim != 2 or prediction.shape[1] < width:
            raise ValueError(f"prediction of shape {tuple(prediction.shape)}, expected (B, {width}) with the grade "
                             f"logit in column {self.grade_channel} and the log-hazard in {self.hazard_channel}")
        if target.ndim != 2 or tuple(target.shape) != (prediction.shape[0], 3):
            raise ValueError(f"target of shape {tuple(target.shape)}, expected ({prediction.shape[0]}, 3) holding "
                             f"[grade, time, event] per case")
        target = target.to(prediction.dtype)
        grade = target[:, 0]
        known = ~torch.isnan(grade)
        outside = grade[known & ((grade < 0) | (grade > 1))]
        if outside.numel():
            raise ValueError(f"grade values {outside.unique().tolist()} outside [0, 1]; expected 0/1 "
                             f"(NaN when unknown)")
        return prediction[:, self.grade_channel], prediction[:, self.hazard_channel], grade, known, target[:, 1:]

    def components(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted ``grade`` and ``survival`` terms and the weighted ``total``, for logging."""
        logit, log_hazard, grade, known, time_event = self._split(prediction, target)
        pos_weight = None if self.pos_weight is None else logit.new_tensor(self.pos_weight)
        if known.any():
            grade_loss = F.binary_cross_entropy_with_logits(logit[known], grade[known], pos_weight=pos_weight)
        else:
            grade_loss = logit.sum() * 0.0
        survival_loss = self.cox(log_hazard, time_event)
        total = self.grade_weight * grade_loss + self.survival_weight * survival_loss
        return {"grade": grade_loss, "survival": survival_loss, "total": total}

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.components(prediction, target)["total"]
