"""Read images in a training or evaluation pipeline exactly as the server reads them.

MONAI's ``LoadImaged`` picks a reader by itself and, for a DICOM series, orders slices by
InstanceNumber; the server reads each input with the reader kind its bundle declares
(:func:`oncofusion.io.readers.read_image`: series ordered by position along the slice normal). Training
through this transform sees the arrays inference sees.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from oncofusion.io.readers import read_image


class ReadImaged(MapTransform):
    """Replace each path under ``keys`` by the image the contract's reader ``kind`` decodes from it, the
    reader the server uses, so that training sees the arrays inference sees. An optional image a record
    lacks (None) stays None."""

    def __init__(self, keys: KeysCollection, kind: str = "volume"):
        super().__init__(keys)
        self.kind = kind

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is not None:
                d[key] = read_image(d[key], self.kind)
        return d
