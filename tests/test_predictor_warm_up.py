"""``PredictorTemplate.warm_up``: one prediction on a blank volume at model load, for the models it suits."""

from __future__ import annotations

import logging

import torch

from oncofusion.contract import ImageInput, InputSpec
from oncofusion.predictor import WARM_UP_SHAPE, Context, PredictorTemplate


class Members:
    """Stands in for a fold ensemble: class probabilities ``(M, 1, 2)``."""

    def member_outputs(self, inputs: torch.Tensor, fold=None) -> torch.Tensor:
        return torch.tensor([[[0.25, 0.75]]])


class Recording(PredictorTemplate):
    """Records what each prediction read; ``fail`` makes the model raise."""

    def __init__(self, inputs: InputSpec, fail: bool = False):
        super().__init__(Members(), inputs, class_names=("benign", "malignant"))
        self.seen: list[tuple[tuple[int, ...], list[float]]] = []
        self.fail = fail

    def model_inputs(self, context: Context) -> tuple[torch.Tensor]:
        if self.fail:
            raise RuntimeError("weights do not fit the network")
        image = context.images[self.inputs.primary.name]
        self.seen.append((tuple(image.shape), [float(c) for c in context.center_index]))
        return (image,)


def test_a_volume_and_click_model_predicts_once_on_a_blank_volume_clicked_at_its_centre():
    predictor = Recording(InputSpec())
    assert predictor.warm_up() is True
    assert predictor.seen == [((1, *WARM_UP_SHAPE), [s // 2 for s in WARM_UP_SHAPE])]


def test_models_needing_a_report_fields_or_frames_stay_cold():
    frame = InputSpec(images=[ImageInput(name="frame", reader="frame")])
    for inputs in (InputSpec(texts=("report",)), frame):
        predictor = Recording(inputs)
        assert predictor.warm_up() is False and predictor.seen == []


def test_a_failing_warm_up_is_logged_not_raised(caplog):
    predictor = Recording(InputSpec(), fail=True)
    with caplog.at_level(logging.INFO, logger="oncofusion.predictor"):
        assert predictor.warm_up() is False
    assert "no warm-up (RuntimeError: weights do not fit the network)" in caplog.text
