"""Typed clinical fields: one schema for validation, encoding, the /info form and the screening report.

A bundle declares its clinical inputs once, in its config, e.g.::

    "clinical_fields": [
        {"name": "sex", "type": "categorical", "choices": ["female", "male"], "required": true},
        {"name": "age", "type": "numeric", "low": 0, "high": 120, "scale": 100, "unit": "years",
         "required": true, "report_step": 10},
        {"name": "location", "type": "categorical", "choices": ["epiphysis", "metaphysis", ...]},
        {"name": "fracture", "type": "boolean"}
    ]

and everything else follows from it: a user's value is checked (an error names the field and what is
allowed, and the server answers it with 4xx), the network gets a fixed-width vector (categorical
one-hot, numeric scaled, boolean 0/1, plus an explicit missing indicator for every optional field),
MONAI Label shows the fields as a form, and the screening regression knows each field's columns.

Missing values: ``None``, NaN and the tokens in :data:`MISSING_TOKENS` ("", "unknown", ...). A missing
optional field encodes as zeros (a number as its ``reference``) with its indicator set, so "not known" is
an input the model learns from rather than a silently imputed value. A missing required field is an
error; its "missing" encoding exists only as the baseline of attributions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oncofusion.contract import InvalidRequest

#: values that mean "not known"; compared case-insensitively after stripping
MISSING_TOKENS = frozenset({"", "unknown", "missing", "na", "n/a", "nan", "none", "null", "not known"})
#: the form's first choice: "not given here", so the study's sidecar (or the missing state) applies
NOT_GIVEN = ""
#: the form's explicit choice for "not known" on an optional field
UNKNOWN = "unknown"

_TRUE = frozenset({"yes", "y", "true", "t", "1"})
_FALSE = frozenset({"no", "n", "false", "f", "0"})


def is_missing(value: Any) -> bool:
    """``None``, NaN, or a missing token such as ``""`` or ``"unknown"``."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TOKENS


def _fmt(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class ClinicalField:
    """A named clinical input. Subclasses say how a value is parsed, encoded and offered in a form."""

    name: str
    required: bool = False
    description: str = ""

    # -- per type ---------------------------------------------------------------------------------
    def parse(self, value: Any) -> Any:
        """A present (non-missing) raw value -> its canonical value; raises :class:`InvalidRequest`."""
        raise NotImplementedError

    def value_columns(self) -> list[str]:
        """Names of the encoding's value columns (without the missing indicator)."""
        raise NotImplementedError

    def encode_value(self, value: Any) -> list[float]:
        """Canonical value -> the value columns."""
        raise NotImplementedError

    def choices(self) -> list[str]:
        """The form's choices after the "not given" entry; empty for free input."""
        return []

    def display(self, value: Any) -> str:
        """Short text for a summary line, e.g. ``metaphysis`` or ``age 14``."""
        return f"{self.name} {value}"

    # -- shared -----------------------------------------------------------------------------------
    def validate(self, value: Any) -> Any:
        """Canonical value, or ``None`` when missing; a missing required value is an error."""
        if is_missing(value):
            if self.required:
                raise InvalidRequest(
                    f"{self.name} is required: give it in the request or in the study's sidecar"
                )
            return None
        return self.parse(value)

    def columns(self) -> list[str]:
        """All encoding columns: the values, then ``<name>=missing`` for an optional field."""
        return self.value_columns() + ([] if self.required else [f"{self.name}=missing"])

    def encode(self, value: Any) -> list[float]:
        """A validated value (``None`` = missing) -> the field's slice of the clinical vector."""
        if value is None:
            return [0.0] * len(self.value_columns()) + ([] if self.required else [1.0])
        return self.encode_value(value) + ([] if self.required else [0.0])

    def option(self) -> Any:
        """The MONAI Label config option: a list is a choice whose first item is the default."""
        choices = self.choices()
        if not choices:
            return NOT_GIVEN
        return [NOT_GIVEN, *choices] + ([] if self.required else [UNKNOWN])

    def to_config(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class CategoricalField(ClinicalField):
    """One of ``values`` (case-insensitive); one-hot encoded. ``reference`` is the screening baseline."""

    values: tuple[str, ...] = ()
    reference: str | None = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"categorical field '{self.name}' needs 'choices'")
        if self.reference is not None and self.reference not in self.values:
            raise ValueError(f"field '{self.name}': reference {self.reference!r} is not one of {self.values}")

    def parse(self, value: Any) -> str:
        text = str(value).strip().lower()
        for choice in self.values:
            if text == choice.lower():
                return choice
        raise InvalidRequest(f"{self.name} {value!r} is not one of {', '.join(self.values)}")

    def value_columns(self) -> list[str]:
        return [f"{self.name}={v}" for v in self.values]

    def encode_value(self, value: str) -> list[float]:
        return [1.0 if value == v else 0.0 for v in self.values]

    def choices(self) -> list[str]:
        return list(self.values)

    def display(self, value: Any) -> str:
        return str(value)

    @property
    def baseline(self) -> str:
        return self.reference or self.values[0]

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "type": "categorical", "choices": list(self.values), "required": self.required,
                "reference": self.baseline, "description": self.description}


@dataclass(frozen=True)
class NumericField(ClinicalField):
    """A number in ``[low, high]``, encoded as ``(value - offset) / scale``.

    ``reference`` is the value a missing entry encodes as (next to its indicator), and so the
    "nothing known" baseline of attributions: a typical value, not 0 (an age of 0 is not "unknown").
    ``report_step`` is the unit of the screening odds ratio (e.g. per 10 years).
    """

    low: float = -math.inf
    high: float = math.inf
    scale: float = 1.0
    offset: float = 0.0
    reference: float | None = None
    unit: str = ""
    report_step: float = 1.0

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"numeric field '{self.name}': low {self.low} > high {self.high}")
        if self.scale == 0:
            raise ValueError(f"numeric field '{self.name}': scale must not be 0")
        if self.reference is not None and not self.low <= self.reference <= self.high:
            raise ValueError(f"numeric field '{self.name}': reference {self.reference} is outside its range")

    @property
    def baseline(self) -> float:
        """The reference value, else the offset (clipped into the range)."""
        value = self.offset if self.reference is None else self.reference
        return float(min(max(value, self.low), self.high))

    def encode(self, value: Any) -> list[float]:
        """Like every field, but a missing number takes the :attr:`baseline` value, not 0."""
        if value is None:
            return self.encode_value(self.baseline) + ([] if self.required else [1.0])
        return super().encode(value)

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise InvalidRequest(f"{self.name} {value!r} is not a number")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{self.name} {value!r} is not a number") from None
        if not math.isfinite(number):
            raise InvalidRequest(f"{self.name} {value!r} is not a finite number")
        if not self.low <= number <= self.high:
            unit = f" {self.unit}" if self.unit else ""
            raise InvalidRequest(f"{self.name} {_fmt(number)} is outside {_fmt(self.low)}-{_fmt(self.high)}{unit}")
        return number

    def value_columns(self) -> list[str]:
        return [self.name]

    def encode_value(self, value: float) -> list[float]:
        return [(float(value) - self.offset) / self.scale]

    def display(self, value: Any) -> str:
        return f"{self.name} {_fmt(float(value))}"

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "type": "numeric", "low": self.low, "high": self.high, "scale": self.scale,
                "offset": self.offset, "reference": self.reference, "unit": self.unit, "report_step": self.report_step,
                "required": self.required, "description": self.description}


@dataclass(frozen=True)
class BooleanField(ClinicalField):
    """Yes/no (also true/false, 1/0); encoded 1/0."""

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InvalidRequest(f"{self.name} {value!r} must be yes or no")

    def value_columns(self) -> list[str]:
        return [self.name]

    def encode_value(self, value: bool) -> list[float]:
        return [1.0 if value else 0.0]

    def choices(self) -> list[str]:
        return ["no", "yes"]

    def display(self, value: Any) -> str:
        return self.name if value else f"no {self.name}"

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "type": "boolean", "required": self.required, "description": self.description}


FIELD_TYPES: dict[str, type[ClinicalField]] = {
    "categorical": CategoricalField,
    "numeric": NumericField,
    "boolean": BooleanField,
}


def field_from_config(spec: Mapping[str, Any] | ClinicalField) -> ClinicalField:
    """A field from its config dict (``type`` is categorical, numeric or boolean)."""
    if isinstance(spec, ClinicalField):
        return spec
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in FIELD_TYPES:
        raise ValueError(f"clinical field {spec.get('name')!r}: type must be one of {sorted(FIELD_TYPES)}, got {kind!r}")
    if "name" not in spec:
        raise ValueError(f"clinical field without a name: {spec}")
    if kind == "categorical":
        spec["values"] = tuple(spec.pop("choices", ()))
    return FIELD_TYPES[kind](**spec)


@dataclass
class ClinicalSchema:
    """An ordered set of clinical fields and the fixed-width vector they encode to."""

    fields: Sequence[ClinicalField | Mapping[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fields = [field_from_config(f) for f in self.fields]
        names = [f.name for f in self.fields]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"clinical fields defined twice: {', '.join(duplicates)}")
        self._slices: dict[str, slice] = {}
        start = 0
        for f in self.fields:
            width = len(f.columns())
            self._slices[f.name] = slice(start, start + width)
            start += width
        self._size = start

    # -- description ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def size(self) -> int:
        """Width of the encoded vector."""
        return self._size

    @property
    def columns(self) -> list[str]:
        """Name of every column of the encoded vector, e.g. ``location=metaphysis``."""
        return [c for f in self.fields for c in f.columns()]

    def field(self, name: str) -> ClinicalField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no clinical field '{name}' (have {', '.join(self.names)})")

    def slices(self) -> dict[str, slice]:
        """Field name -> its columns in the encoded vector (for per-field attributions)."""
        return dict(self._slices)

    def to_config(self) -> list[dict[str, Any]]:
        return [f.to_config() for f in self.fields]

    # -- values -----------------------------------------------------------------------------------
    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical value (``None`` = missing) of every field in ``raw``; keys not in the schema are ignored."""
        return {f.name: f.validate(raw.get(f.name)) for f in self.fields}

    def encode(self, values: Mapping[str, Any]) -> np.ndarray:
        """Validated values -> the float32 clinical vector of width :attr:`size`."""
        return np.asarray([x for f in self.fields for x in f.encode(values.get(f.name))], np.float32)

    def encode_raw(self, raw: Mapping[str, Any]) -> np.ndarray:
        """Validate then encode."""
        return self.encode(self.validate(raw))

    def missing_vector(self) -> np.ndarray:
        """The encoding of "nothing known": every field missing, indicators set (the attribution baseline)."""
        return self.encode({})

    def display(self, name: str, value: Any) -> str:
        return "unknown " + name if value is None else self.field(name).display(value)

    def config_options(self) -> dict[str, Any]:
        """The fields as MONAI Label config options (``/info``; Slicer shows them as a form).

        Choices are lists whose first item, "" (not given), is the default: an untouched form leaves
        the study's sidecar value in force. Free numbers are offered as "" for the same reason.
        """
        return {f.name: f.option() for f in self.fields}


def manifest_summary(path: str | Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """Top-level manifest entries other than ``cases`` (e.g. a generator's Bayes AUROCs), optionally only ``keys``."""
    data = json.loads(Path(path).read_text())
    summary = {k: v for k, v in data.items() if k != "cases"}
    return {k: summary[k] for k in keys if k in summary} if keys else summary
