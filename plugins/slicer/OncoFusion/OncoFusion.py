"""OncoFusion results in 3D Slicer, beside the MONAILabel module.

Install: Slicer > Edit > Application Settings > Modules > Additional module paths: add this folder
(``plugins/slicer/OncoFusion``), restart Slicer. The module reads the MONAILabel module's server address
and current study, so connect and fetch a study there first. Its logic is ``OncoFusionLib/logic.py``
(plain Python, unit-tested without Slicer); this file only draws it.
"""

from __future__ import annotations

import qt  # noqa: F401  (provided by Slicer)
import slicer
from OncoFusionLib.logic import ServerResults, StudyForm, level_colours, result_rows
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget


class OncoFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        super().__init__(parent)
        parent.title = "OncoFusion"
        parent.categories = ["Active Learning"]
        parent.contributors = ["OncoFusion"]
        parent.helpText = "Latest OncoFusion result of the current study, its explanation overlay and clinical form."


class OncoFusionWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        super().setup()
        self.form = StudyForm(fields=("sex", "age", "location", "fracture"))
        self.table = qt.QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["section", "item", "value"])
        refresh = qt.QPushButton("Show latest result")
        refresh.connect("clicked(bool)", self.onRefresh)
        self.layout.addWidget(refresh)
        self.layout.addWidget(self.table)
        self.layout.addStretch(1)

    def _monailabel(self):
        return slicer.modules.monailabel.widgetRepresentation().self()

    def onRefresh(self):
        monailabel = self._monailabel()
        sample = getattr(monailabel, "current_sample", None) or {}
        if not sample.get("id"):
            slicer.util.warningDisplay("Fetch a study in the MONAILabel module first")
            return
        self.form.show_study(sample["id"])
        results = ServerResults(monailabel.serverUrl()).latest(sample["id"])
        rows = [row for model, result in sorted(results.items()) for row in result_rows(result)]
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.table.setItem(r, c, qt.QTableWidgetItem(text))
        segmentation = getattr(monailabel, "_segmentNode", None)
        if segmentation is not None:
            for result in results.values():
                for value, colour in level_colours(result.get("label_names") or {}).items():
                    segment = segmentation.GetSegmentation().GetNthSegment(value - 1)
                    if segment is not None:
                        segment.SetColor(*colour)
