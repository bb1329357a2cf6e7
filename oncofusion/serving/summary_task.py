"""A segmentation-type companion of each bundle, so stock 3D Slicer shows the answer.

Slicer's MONAILabel module names the segments of a *segmentation* model after the response's
``label_names`` (``onClickSegmentation``), but keeps the user's own name for a deepgrow model's
result, so the one-line summary of a click (``malignancy 0.81, spiculated, ...``) never reaches the
screen. ``<bundle>_summary`` runs the same model on the lesion already known for the study and answers
the region with the summary as its segment name, value 1 (the value Slicer imports): the result is
readable in stock Slicer with nothing installed. Where the lesion comes from, first found wins:

1. a prompt in the request (clicks, box, an uploaded mask), as for the deepgrow task;
2. the centre of the study's last prediction by this bundle (``roi_center_ijk`` stored in the datastore);
3. the study's sidecar (``center_ijk``, ``roi`` or ``foreground``).
"""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from oncofusion.contract import InvalidRequest
from oncofusion.serving.infer_task import PREDICTIONS_KEY, BundleInferTask
from oncofusion.serving.request import read_sidecar

#: name suffix of the companion task
SUFFIX = "_summary"
PROMPT_KEYS = ("foreground", "roi", "label")


class BundleSummaryTask(InferTask):
    """Segmentation-type view of a :class:`BundleInferTask` (same predictor, no second copy in memory)."""

    def __init__(self, task: BundleInferTask):
        self.task = task
        self.name = task.name + SUFFIX
        super().__init__(type=InferType.SEGMENTATION, labels=task.labels, dimension=task.dimension,
                         description=f"{task.description} - on the study's known lesion, summary as segment name")

    def is_valid(self) -> bool:
        return self.task.is_valid()

    def config(self) -> dict[str, Any]:
        return self.task.config()

    def info(self) -> dict[str, Any]:
        info = {**self.task.info(), "type": self.type, "description": self.description}
        self.labels = info["labels"]
        return info

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        if not self.task.inputs.prompt or any(request.get(k) not in (None, "", [], "[]") for k in PROMPT_KEYS):
            return self._summarised(self.task(request), "request")
        prompt, source = self.known_lesion(request.get("image_id"))
        return self._summarised(self.task({**request, **prompt}), source)

    def known_lesion(self, image_id: str | None) -> tuple[dict[str, Any], str]:
        """The prompt of the study's lesion and where it was found; 422 when the study has none."""
        datastore = self.task.datastore
        if image_id and datastore is not None:
            stored = (datastore.get_image_info(image_id).get(PREDICTIONS_KEY) or {}).get(self.task.name) or {}
            if stored.get("roi_center_ijk"):
                return {"foreground": [stored["roi_center_ijk"]]}, "last prediction"
        sidecar = read_sidecar(self.task.sidecar_dir, image_id)
        for key in ("roi", "center_ijk", "foreground"):
            if sidecar.get(key):
                value = sidecar[key]
                return ({"roi": value} if key == "roi" else {"foreground": value}), f"study record ({key})"
        raise InvalidRequest(f"no lesion is known for this study yet: click on it with '{self.task.name}' "
                             f"first, then run '{self.name}'")

    @staticmethod
    def _summarised(answer: tuple[str | None, dict[str, Any]], source: str) -> tuple[str | None, dict[str, Any]]:
        label_file, result = answer
        return label_file, {**result, "lesion_from": source}
