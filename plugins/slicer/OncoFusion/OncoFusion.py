"""OncoFusion results in 3D Slicer, beside the MONAILabel module.

Install: Slicer > Edit > Application Settings > Modules > Additional module paths: add this folder
(``plugins/slicer/OncoFusion``), restart Slicer. The module reads the MONAILabel module's server address
and current study, so connect and fetch a study there first. Its logic is ``OncoFusionLib/logic.py``
(plain Python, unit-tested without Slicer); this file only draws it.
"""

from __future__ import annotations

import qt  # noqa: F401  (provided by Slicer)
import slicer
from OncoFusionLib.logic import (
    ServerResults,
    StudyForm,
    error_message,
    form_fields,
    level_colours,
    result_rows,
)
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget


class OncoFusion(ScriptedLoadableModule):
    def __init__(self, parent):
        super().__init__(parent)
        parent.title = "OncoFusion"
        parent.categories = ["Active Learning"]
        parent.contributors = ["OncoFusion"]
        parent.helpText = "Latest OncoFusion result of the current study, its explanation overlay and clinical form."


class OncoFusionWidget(ScriptedLoadableModuleWidget):
    """Model, the study's clinical form, *Predict on the study's lesion*, *Show latest result*, the table."""

    def setup(self):
        super().setup()
        self.models = {}
        self.form = StudyForm(fields=())
        self.editors = {}
        self.modelSelector = qt.QComboBox()
        self.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        load = qt.QPushButton("Load models")
        load.connect("clicked(bool)", self.onLoadModels)
        self.formBox = qt.QGroupBox("Clinical form of this study (blank: the study's record)")
        self.formLayout = qt.QFormLayout(self.formBox)
        predict = qt.QPushButton("Predict on the study's lesion")
        predict.toolTip = "Runs the model's <bundle>_summary task on the lesion already known for the study"
        predict.connect("clicked(bool)", self.onPredict)
        refresh = qt.QPushButton("Show latest result")
        refresh.connect("clicked(bool)", self.onRefresh)
        self.table = qt.QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["section", "item", "value"])
        for widget in (load, self.modelSelector, self.formBox, predict, refresh, self.table):
            self.layout.addWidget(widget)
        self.layout.addStretch(1)

    def _monailabel(self):
        return slicer.modules.monailabel.widgetRepresentation().self()

    def _results(self):
        return ServerResults(self._monailabel().serverUrl())

    def _study(self):
        """The MONAILabel module's current study id; a new study clears the form."""
        sample = getattr(self._monailabel(), "current_sample", None) or {}
        if not sample.get("id"):
            slicer.util.warningDisplay("Fetch a study in the MONAILabel module first")
            return None
        if self.form.show_study(sample["id"]):
            self._buildForm()
        return sample["id"]

    def onLoadModels(self):
        self.models = {name: model for name, model in self._results().models().items() if name.endswith("_summary")}
        self.modelSelector.clear()
        for name in sorted(self.models):
            self.modelSelector.addItem(name)

    def onModelChanged(self, _index):
        name = self.modelSelector.currentText
        fields = form_fields((self.models.get(name) or {}).get("config") or {})
        self.form = StudyForm(fields=tuple(fields), study=self.form.study)
        self._buildForm()

    def _buildForm(self):
        """One editor per option, empty: typed values belong to the study on screen only."""
        while self.formLayout.rowCount() > 0:
            self.formLayout.removeRow(0)
        fields = form_fields((self.models.get(self.modelSelector.currentText) or {}).get("config") or {})
        self.editors = {}
        for name, choices in fields.items():
            if choices is None:
                editor = qt.QLineEdit()
                editor.connect("editingFinished()", lambda n=name, e=editor: self._edit(n, e.text))
            else:
                editor = qt.QComboBox()
                editor.addItems(["", *choices])
                editor.connect("currentTextChanged(QString)", lambda text, n=name: self._edit(n, text))
            self.editors[name] = editor
            self.formLayout.addRow(name, editor)

    def _edit(self, name, value):
        if self.form.study is not None:
            self.form.edit(name, value)

    def onPredict(self):
        image_id = self._study()
        model = self.modelSelector.currentText
        if image_id is None or not model:
            return
        try:
            result = self._results().predict(model, image_id, self.form.params(image_id))
        except Exception as e:  # the server's 4xx message names the problem
            slicer.util.errorDisplay(f"{model}: {error_message(e)}")
            return
        self._show({model: result})

    def onRefresh(self):
        image_id = self._study()
        if image_id is not None:
            self._show(self._results().latest(image_id))

    def _show(self, results):
        rows = [row for model, result in sorted(results.items()) for row in result_rows(result)]
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                self.table.setItem(r, c, qt.QTableWidgetItem(text))
        segmentation = getattr(self._monailabel(), "_segmentNode", None)
        if segmentation is not None:
            for result in results.values():
                for value, colour in level_colours(result.get("label_names") or {}).items():
                    segment = segmentation.GetSegmentation().GetNthSegment(value - 1)
                    if segment is not None:
                        segment.SetColor(*colour)
