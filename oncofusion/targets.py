"""What a model predicts, declared once per bundle and read by every step that needs it.

A bundle config declares its target with MONAI's ``_target_``::

    "target": {"_target_": "oncofusion.targets.BinaryTarget", "key": "label",
               "class_names": ["benign", "malignant"]}
    "target": {"_target_": "oncofusion.targets.SurvivalTarget", "time_key": "os_months",
               "event_key": "death", "time_unit": "months"}

and the datalist (:meth:`Target.parse`), fold assignment (:meth:`Target.stratum`), the balanced
sampler (:meth:`Target.sample_weights`), the loss (:meth:`Target.default_loss`), the network head
(:attr:`Target.num_outputs`) and the evaluation report (:attr:`Target.evaluation`) all read that one
object, so that a label key or a class order is never written twice.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

__all__ = ["Target", "BinaryTarget", "MultiClassTarget", "SurvivalTarget"]


def _case_name(case: Mapping) -> str:
    """How an error message names a case: its ``case_id`` when it has one."""
    case_id = case.get("case_id") if isinstance(case, Mapping) else None
    return f"case {case_id}" if case_id is not None else "a case without case_id"


def _require(case: Mapping, key: str) -> Any:
    if not isinstance(case, Mapping):
        raise ValueError(f"a case must be a mapping of field names to values, got {type(case).__name__}")
    if key not in case or case[key] is None:
        raise ValueError(f"{_case_name(case)} lacks the key '{key}'; add it to the datalist or change the "
                         f"target's key")
    return case[key]


class Target(ABC):
    """The common interface of every target; subclasses are small dataclasses a config instantiates."""

    #: "binary", "multiclass" or "survival"
    kind: ClassVar[str]
    #: name of the evaluation a report registry runs for this target ("classification" or "survival")
    evaluation: ClassVar[str]

    @property
    @abstractmethod
    def keys(self) -> tuple[str, ...]:
        """The datalist fields :meth:`parse` returns."""

    @property
    @abstractmethod
    def num_outputs(self) -> int:
        """Width of the network's last layer: one logit per class, or one log-hazard."""

    @abstractmethod
    def parse(self, case: Mapping) -> dict[str, Any]:
        """The validated target fields of ``case`` (e.g. ``{"label": 1}``); ``ValueError`` names the case."""

    @abstractmethod
    def stratum(self, case_fields: Mapping) -> Hashable:
        """The group a case is balanced by in folds and samplers (class index, or event indicator)."""

    @abstractmethod
    def default_loss(self) -> nn.Module:
        """The training objective that fits this target when a config names none."""

    @abstractmethod
    def to_tensor(self, case_fields: Mapping) -> torch.Tensor:
        """The target as one channel-first tensor, e.g. for a ``Lambdad`` that builds the batch label."""

    def sample_weights(self, datalist: Sequence[Mapping]) -> torch.Tensor:
        """One weight per record, ``1 / (records in its stratum)``: each stratum is drawn equally often.

        The weights feed ``torch.utils.data.WeightedRandomSampler``; for survival the strata are events
        and censored cases, so that a batch rarely lacks an event (the Cox loss needs one).
        """
        if not datalist:
            raise ValueError("cannot weight an empty datalist; check the folds the config selects")
        strata = [self.stratum(record) for record in datalist]
        counts = Counter(strata)
        return torch.tensor([1.0 / counts[s] for s in strata], dtype=torch.double)


def _scalar(value: Any) -> Any:
    """A numpy scalar or a one-element array/tensor as the Python number it holds; anything else as is."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor) and value.ndim <= 1 and value.shape in ((), (1,)):
        return value.reshape(-1)[0].item()
    return value


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool | numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()


@dataclass(frozen=True)
class _ClassTarget(Target):
    """Shared by binary and multi-class targets: one class index per case under ``key``."""

    key: str = "label"
    class_names: Sequence[str] = ()

    evaluation: ClassVar[str] = "classification"
    min_classes: ClassVar[int] = 2
    max_classes: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        names = self.class_names
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ValueError(f"{type(self).__name__}: class_names must be a list of names, got {names!r}")
        names = tuple(str(n) for n in names)
        object.__setattr__(self, "class_names", names)
        if len(names) < self.min_classes or (self.max_classes is not None and len(names) > self.max_classes):
            expected = (str(self.min_classes) if self.max_classes == self.min_classes
                        else f"at least {self.min_classes}")
            raise ValueError(f"{type(self).__name__}: class_names needs {expected} names, got {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: class_names repeat a name: {list(names)}")

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def class_index(self, value: Any, case: Mapping | None = None) -> int:
        """``value`` as a class index: an integer in ``0..C-1`` or one of ``class_names``."""
        value = _scalar(value)
        where = f"{_case_name(case or {})}: '{self.key}'"
        classes = ", ".join(self.class_names)
        if isinstance(value, str):
            if value in self.class_names:
                return self.class_names.index(value)
            raise ValueError(f"{where} is {value!r}, not one of the classes {classes} (nor an index 0.."
                             f"{len(self.class_names) - 1})")
        if not _is_integral(value):
            raise ValueError(f"{where} is {value!r}; expected a class index 0..{len(self.class_names) - 1} "
                             f"or a class name ({classes})")
        index = int(value)
        if not 0 <= index < len(self.class_names):
            raise ValueError(f"{where} {index} lies outside 0..{len(self.class_names) - 1} for classes {classes}")
        return index

    def parse(self, case: Mapping) -> dict[str, Any]:
        return {self.key: self.class_index(_require(case, self.key), case)}

    def stratum(self, case_fields: Mapping) -> Hashable:
        return self.class_index(_require(case_fields, self.key), case_fields)

    def default_loss(self) -> nn.Module:
        """Cross-entropy over ``num_outputs`` logits; accepts the ``(B, 1)`` labels the bundles batch."""
        from oncofusion.losses.classification import LabelCrossEntropyLoss

        return LabelCrossEntropyLoss()

    def to_tensor(self, case_fields: Mapping) -> torch.Tensor:
        """``(1,)`` long tensor: the channel-first class index MONAI's post-transforms expect."""
        return torch.tensor([self.stratum(case_fields)], dtype=torch.long)


@dataclass(frozen=True)
class BinaryTarget(_ClassTarget):
    """Two classes; index 1 is the positive class whose probability the reports score."""

    class_names: Sequence[str] = ("negative", "positive")

    kind: ClassVar[str] = "binary"
    max_classes: ClassVar[int | None] = 2


@dataclass(frozen=True)
class MultiClassTarget(_ClassTarget):
    """Two or more mutually exclusive classes, in the order the network's logits follow."""

    kind: ClassVar[str] = "multiclass"


@dataclass(frozen=True)
class SurvivalTarget(Target):
    """Right-censored time to event: ``time`` since the index date and ``event`` (1 event, 0 censored).

    A time must be finite and strictly positive: a zero or negative follow-up almost always means a
    date error (diagnosis copied into last contact), and such a case would sit at the very start of
    every risk set and Kaplan-Meier curve unnoticed.
    """

    time_key: str = "time"
    event_key: str = "event"
    time_unit: str = "months"

    kind: ClassVar[str] = "survival"
    evaluation: ClassVar[str] = "survival"

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.time_key, self.event_key)

    @property
    def num_outputs(self) -> int:
        return 1

    def event_indicator(self, value: Any, case: Mapping | None = None) -> int:
        """``value`` as 0 (censored) or 1 (event); accepts bools and the numbers 0 and 1."""
        value = _scalar(value)
        if isinstance(value, bool | numbers.Real) and not isinstance(value, str) and float(value) in (0.0, 1.0):
            return int(value)
        raise ValueError(f"{_case_name(case or {})}: '{self.event_key}' is {value!r}; expected 1 (event "
                         f"observed), 0 (censored) or a bool")

    def parse(self, case: Mapping) -> dict[str, Any]:
        time = _scalar(_require(case, self.time_key))
        if isinstance(time, bool) or not isinstance(time, numbers.Real) or not math.isfinite(float(time)):
            raise ValueError(f"{_case_name(case)}: '{self.time_key}' is {time!r}; expected a finite number of "
                             f"{self.time_unit}")
        if float(time) <= 0:
            raise ValueError(f"{_case_name(case)}: '{self.time_key}' is {time!r}; follow-up must be > 0 "
                             f"{self.time_unit} (check the index and last-contact dates)")
        event = self.event_indicator(_require(case, self.event_key), case)
        return {self.time_key: float(time), self.event_key: event}

    def stratum(self, case_fields: Mapping) -> Hashable:
        return self.event_indicator(_require(case_fields, self.event_key), case_fields)

    def default_loss(self) -> nn.Module:
        """Negative Cox partial log-likelihood; it reads the ``(B, 2)`` tensor of :meth:`to_tensor`."""
        from oncofusion.losses.survival import CoxPartialLikelihoodLoss

        return CoxPartialLikelihoodLoss()

    def to_tensor(self, case_fields: Mapping) -> torch.Tensor:
        """``(2,)`` float tensor ``[time, event]``, so one batch key carries both to the loss."""
        fields = self.parse(case_fields)
        return torch.tensor([fields[self.time_key], fields[self.event_key]], dtype=torch.float32)
