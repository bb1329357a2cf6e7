"""Dictionary transforms on report text."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from oncofusion.models.lung_nodule.reports import crop_words, swap_synonyms


class RandReportAugmentd(RandomizableTransform, MapTransform):
    """Randomly swap synonyms and crop a few words of report strings (the authors' text augmentation).

    ``prob`` is the probability of each of the two operations, drawn independently per call, as in
    :func:`oncofusion.models.lung_nodule.reports.augment_report`. All randomness comes from ``self.R``, so
    ``set_random_state(seed)`` makes the output reproducible.

    Args:
        keys: keys whose values are report strings.
        prob: probability of the synonym swap and, independently, of the word crop.
        max_crop_words: longest span of words the crop may drop.
        allow_missing_keys: skip keys absent from the data instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        max_crop_words: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_crop_words = max_crop_words
        self._do_swap = False
        self._do_crop = False
        self._seed = 0

    def randomize(self, data: object = None) -> None:
        """Draw both on/off decisions and a seed for the word-level choices from ``self.R``."""
        self._do_swap = bool(self.R.rand() < self.prob)
        self._do_crop = bool(self.R.rand() < self.prob)
        self._do_transform = self._do_swap or self._do_crop
        self._seed = int(self.R.randint(np.iinfo(np.int32).max))

    def _augment(self, text: object, rng: np.random.Generator, key: Hashable) -> str:
        """Apply the drawn operations to one string."""
        if not isinstance(text, str):
            raise TypeError(
                f"RandReportAugmentd expects a string under key '{key}', got {type(text).__name__}"
            )
        if self._do_swap:
            text = swap_synonyms(text, rng)
        if self._do_crop:
            text = crop_words(text, rng, max_span=self.max_crop_words)
        return text

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        rng = np.random.default_rng(self._seed)
        for key in self.key_iterator(d):
            d[key] = self._augment(d[key], rng, key)
        return d
