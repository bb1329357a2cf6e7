"""Clinical fields -> the network's clinical vector, as a MONAI dictionary transform."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from oncofusion.contract import InvalidRequest
from oncofusion.data.clinical import ClinicalSchema


class ClinicalVectord(MapTransform):
    """Validate the fields ``keys`` of a record against ``schema`` and write their encoding to ``output_key``.

    ``keys`` are clinical field names (``"$@clinical_schema.names"`` in a config); a record may lack an
    optional field (it encodes as missing). A bad value raises :class:`InvalidRequest` naming the field,
    prefixed with the record's ``case_id`` when it has one, so a broken training table says which case.
    ``drop_fields`` removes the raw values afterwards: a batch cannot collate a missing (``None``) value.
    """

    def __init__(self, keys: KeysCollection, schema: ClinicalSchema, output_key: str = "clinical",
                 drop_fields: bool = True):
        super().__init__(keys, allow_missing_keys=True)
        unknown = [k for k in self.keys if k not in schema.names]
        if unknown:
            raise ValueError(f"keys {unknown} are not clinical fields of the schema ({', '.join(schema.names)})")
        self.schema = schema
        self.output_key = output_key
        self.drop_fields = drop_fields

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        raw = {str(k): d.get(k) for k in self.keys}
        try:
            vector = self.schema.encode_raw(raw)
        except InvalidRequest as e:
            case = d.get("case_id")
            if case is None:
                raise
            raise InvalidRequest(f"case {case}: {e}", e.status_code) from e
        if self.drop_fields:
            for key in self.keys:
                d.pop(key, None)
        d[self.output_key] = torch.from_numpy(vector)
        return d
