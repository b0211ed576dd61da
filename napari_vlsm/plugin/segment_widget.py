"""The "Text-prompt segmentation" dock widget: layout and wiring only.

Work happens in ``SegmentSession.segment`` (core predictor underneath) inside a napari
``thread_worker``; results go into Labels layers through ``napari_vlsm.plugin.label_writing``.
The model, device and prompts are the viewer's ``PluginState``'s: the dock shows them and
sets them there; it answers the segmentations the image series asks for there.
"""

from __future__ import annotations

import napari
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from napari_vlsm.core.device import DEVICE_HELP, DEVICES
from napari_vlsm.core.errors import VLSMError
from napari_vlsm.core.models.model_card import card_for, describe_card, nothing_found_hint, unknown_words_note
from napari_vlsm.core.data.prompts import CHOICES, build_prompt
from . import click_tools, label_writing, layer_keys
from .planes import all_indices, check_single_scale, current_index, plane
from .qt_helpers import (
    bind_to_state,
    fill_layer_combo,
    is_probability_map,
    join_plugin_tabs,
    name_combo,
    on_layers_changed,
    scrolling_layout,
)
from .state import SEGMENT, SegmentOutcome, SegmentRequest, state_for

CLICKS_HELP = ("Refine the selected label of the Labels layer (its prompt, or the thing clicked) by clicking: each "
               "click, move or deletion of a click, and the box, is answered at once and written as one undo step "
               "(Ctrl+Z); your brush strokes since the last result are kept. Green clicks add, red clicks remove. "
               + click_tools.SHORTCUTS + ".")

OTHER_MODELS_NOTE = ("For a general model run 'napari-vlsm models pull CIDAS/clipseg-rd64-refined' on a machine "
                     "that is online, then pick it here.")
HISTORY_SIZE = 20


def short_model_name(spec: str) -> str:
    """A model folder by its last two parts (``finetune-20261203-0810/best``), so runs that
    share a long parent path stay apart in a narrow chooser; ids and 'default' as they are."""
    from pathlib import Path

    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    return "/".join(path.parts[-2:]) if len(path.parts) > 2 else spec


class SegmentWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.state = state_for(viewer)
        self.session = self.state.session  # the loaded model and its cached image features
        self.worker = None
        self._request: SegmentRequest | None = None  # the series' request the running segmentation answers
        self._outcome: SegmentOutcome | None = None
        self._queued: SegmentRequest | None = None  # asked for while a run was going on
        self._clicks_shown: tuple | None = None  # (series, image name) the clicks shown belong to
        self._when_done: list = []  # calls waiting for the running segmentation to end
        self.edits = label_writing.EditTracker()  # what the annotator touched since the last result
        self.thresholding = None  # the worker planning a new threshold's plane
        self._wanted_threshold = None  # the slider's latest value while that worker runs
        self._watched_layers: set = set()
        self._undo_timer = QTimer(self)  # after edits settle: does the plane hold an earlier threshold?
        self._undo_timer.setSingleShot(True)
        self._undo_timer.setInterval(250)
        # clicks and the box: answered in a worker, one at a time, the latest request winning
        self.clicking = None  # the worker answering a click
        self._pending_click = None  # the request waiting for it
        self._click_serial = 0  # the newest request's number: older results are dropped
        self._object_probs: dict = {}  # (layer, plane, label) -> (probabilities, digest of the mask written)
        self._last_target = None  # the Labels layer of the last result, for clicks in "new layer" mode
        self._watched_labels: set = set()
        self.click_tools = click_tools.ClickTools(viewer, self._clicks_changed, self._show_sign, self.clear_clicks)
        self._click_timer = QTimer(self)  # events of one gesture (a drag) come together: answer once
        self._click_timer.setSingleShot(True)
        self._click_timer.setInterval(0)
        self._build()
        self._wire()
        self._refresh_layers()
        self._refresh_models()
        self._model_changed()
        self._show_prompts(self.state.prompts)
        self.device_combo.setCurrentText(self.state.device)
        self._bind()
        join_plugin_tabs(self, "Segment")
        state = self.state
        if state.series is not None and 0 <= state.walk_pos < len(state.walk):  # opened after the series
            self._series_shown(state.walk[state.walk_pos])
        waiting = self.state.take_waiting_request()
        if waiting is not None:  # the series asked before this dock was open
            QTimer.singleShot(0, lambda: self.segment_request(waiting))

    # ---------- layout ----------
    def _build(self):
        form = QFormLayout()
        self.image_combo = name_combo()
        form.addRow("Image", self.image_combo)

        self.prompt_edit = QPlainTextEdit()
        self.prompt_edit.setPlaceholderText("polyp\n(one prompt per line: one label each)")
        self.prompt_edit.setMaximumHeight(70)
        form.addRow("Prompts", self.prompt_edit)
        self.history_combo = name_combo()
        self.history_combo.setPlaceholderText("Recent and suggested prompts")
        self.history: list[str] = []
        self.suggestions: list[str] = []
        form.addRow("Prompts to pick", self.history_combo)

        self.builder = QGroupBox("Prompt builder (benchmark attributes)")
        self.builder.setCheckable(True)
        self.builder.setChecked(False)
        inner = QWidget()  # folded away until the group is ticked
        QVBoxLayout(self.builder).addWidget(inner)
        inner.setVisible(False)
        self.builder.toggled.connect(inner.setVisible)
        bform = QFormLayout(inner)
        self.class_edit = QLineEdit("polyp")
        bform.addRow("Class", self.class_edit)
        self.attr_combos = {}
        for attr in ("number", "size", "colour", "shape", "location"):
            combo = QComboBox()
            combo.setEditable(True)
            combo.addItems(CHOICES[attr])
            self.attr_combos[attr] = combo
            bform.addRow(attr.capitalize(), combo)
        self.description_edit = QLineEdit()
        self.description_edit.setPlaceholderText("e.g. a projecting growth of tissue")
        bform.addRow("Description", self.description_edit)
        self.add_prompt_btn = QPushButton("Add to prompts")
        bform.addRow(self.add_prompt_btn)

        self.model_combo = QComboBox()
        # long folder names must not widen the dock: show about 16 characters (the short
        # names fit), the rest on hover and in the list it opens
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(16)
        self.browse_btn = QPushButton("Folder…")
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.browse_btn)
        form.addRow("Model", row)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip(DEVICE_HELP)
        form.addRow("Device", self.device_combo)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)

        self.threshold = QSlider(Qt.Horizontal)
        self.threshold.setRange(1, 99)
        self.threshold.setValue(50)
        self.threshold.setTracking(False)  # apply on release: one undo entry per drag
        self.threshold_label = QLabel("0.50")
        trow = QHBoxLayout()
        trow.addWidget(self.threshold, 1)
        trow.addWidget(self.threshold_label)
        form.addRow("Threshold", trow)

        self.mode_combo = QComboBox()
        for mode in label_writing.MODES:
            self.mode_combo.addItem(label_writing.MODE_LABELS[mode], mode)
        form.addRow("Write to", self.mode_combo)
        self.target_combo = name_combo()
        form.addRow("Labels layer", self.target_combo)
        self.all_slices = QCheckBox("All slices of a stack")
        self.show_probs = QCheckBox("Also add the probability map")
        form.addRow(self.all_slices)
        form.addRow(self.show_probs)

        self.segment_btn = QPushButton("Segment  (Ctrl+Enter)")
        self.segment_btn.setShortcut("Ctrl+Return")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        brow = QHBoxLayout()
        brow.addWidget(self.segment_btn, 1)
        brow.addWidget(self.cancel_btn)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setMinimumHeight(48)  # two lines, so a wrapped message is not cut

        self.clicks_group = QGroupBox("Clicks and box")
        self.clicks_btn = QPushButton("Clicks")
        self.box_btn = QPushButton("Box")
        self.sign_btn = QPushButton()
        self.next_positive = True  # the sign of the next click, as the button shows it
        self.clear_clicks_btn = QPushButton("Clear")
        crow = QHBoxLayout(self.clicks_group)
        for w in (self.clicks_btn, self.box_btn, self.sign_btn, self.clear_clicks_btn):
            crow.addWidget(w)
        self._show_sign(True)

        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.builder)
        layout.addWidget(self.model_info)
        layout.addLayout(brow)
        layout.addWidget(self.clicks_group)
        layout.addWidget(self.status)
        layout.addStretch(1)

    # ---------- wiring ----------
    def _wire(self):
        on_layers_changed(self.viewer, self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self.viewer.layers.events.removed.connect(self._forget_removed)
        self.history_combo.textActivated.connect(self.prompt_edit.setPlainText)
        self.add_prompt_btn.clicked.connect(self._add_built_prompt)
        self.browse_btn.clicked.connect(self._browse_model)
        self.model_combo.currentIndexChanged.connect(self._model_chosen)
        self.device_combo.currentTextChanged.connect(self.state.set_device)
        self.prompt_edit.textChanged.connect(lambda: self.state.set_prompts(self.prompts))
        self.threshold.valueChanged.connect(self._rethreshold)
        self._undo_timer.timeout.connect(self._show_threshold_of_plane)
        self.threshold.sliderMoved.connect(lambda v: self.threshold_label.setText(f"{v / 100:.2f}"))
        self.mode_combo.currentIndexChanged.connect(self._refresh_layers)
        self.segment_btn.clicked.connect(lambda: self.run())  # not run(checked)
        self.cancel_btn.clicked.connect(self.cancel)
        self.clicks_btn.clicked.connect(self.start_clicking)
        self.box_btn.clicked.connect(self.start_box)
        self.sign_btn.clicked.connect(lambda: self.set_next_sign(not self.next_positive))
        self.clear_clicks_btn.clicked.connect(self.clear_clicks)
        self._click_timer.timeout.connect(self._answer_clicks)

    def _bind(self):
        """Follow the state; let go of it when the dock goes."""
        bound = [(self.state.model_changed, self._show_model), (self.state.models_changed, self._refresh_models),
                 (self.state.device_changed, self._show_device),
                 (self.state.prompts_changed, self._show_prompts), (self.state.segment_wanted, self.segment_request),
                 (self.state.series_shown, self._series_shown)]
        bind_to_state(self, self.state, SEGMENT, bound)

    def _refresh_layers(self, *_):
        for layer in self.viewer.layers:
            if isinstance(layer, napari.layers.Labels):
                self.edits.watch(layer)
                self._watch_object(layer)
        fill_layer_combo(self.image_combo, self.viewer, napari.layers.Image)
        fill_layer_combo(self.target_combo, self.viewer, napari.layers.Labels)
        self.target_combo.setEnabled(self.mode != "new")

    def _follow_selection(self, event=None):
        layer = self.viewer.layers.selection.active
        if isinstance(layer, napari.layers.Image) and not is_probability_map(layer):
            self.image_combo.setCurrentText(layer.name)

    def _refresh_models(self):
        """The models found (embedded, cached, ...) and those added in this session, the one in use chosen."""
        from napari_vlsm.core.models.registry import find_models

        self.model_combo.blockSignals(True)
        if not self.model_combo.count():  # the name alone fits the chooser; what kind of model it is, on hover
            for m in find_models():
                self.model_combo.addItem(short_model_name(m.spec), m.spec)
                self.model_combo.setItemData(self.model_combo.count() - 1, f"{m.spec} [{m.kind}]",
                                             Qt.ItemDataRole.ToolTipRole)
        for spec in self.state.models:
            self._offer(spec)
        self.model_combo.setCurrentIndex(self._offer(self.state.model))
        self.model_combo.blockSignals(False)

    def _offer(self, spec: str) -> int:
        """The chooser's row of ``spec``, added (under a short name) if it is not there."""
        i = self.model_combo.findData(spec)
        if i < 0:
            self.model_combo.addItem(short_model_name(spec), spec)
            i = self.model_combo.count() - 1
            self.model_combo.setItemData(i, spec, Qt.ItemDataRole.ToolTipRole)  # the full path on hover
        return i

    def add_model(self, spec: str, select: bool = True):
        """Add a model (folder or id) to those on offer, optionally making it the one in use."""
        self.state.add_model(str(spec))
        if select:
            self.state.use_model(str(spec))

    def _model_chosen(self, *_):
        self.state.use_model(self.model_combo.currentData() or "default")

    def _show_model(self, spec: str) -> None:
        """The state's model in the chooser, and what it knows."""
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentIndex(self._offer(spec))
        self.model_combo.blockSignals(False)
        self._model_changed()

    def _show_device(self, device: str) -> None:
        self.device_combo.setCurrentText(device)

    def _show_prompts(self, prompts: list) -> None:
        if prompts != self.prompts:
            self.prompt_edit.setPlainText("\n".join(prompts))

    def _browse_model(self):
        folder = QFileDialog.getExistingDirectory(self, "Model folder (config.json + safetensors, or ONNX export)")
        if folder:
            self.add_model(folder)

    def _model_changed(self, *_):
        spec = self.model_spec
        self.model_combo.setToolTip(spec)  # the chooser shows a short name
        card = card_for(spec)
        self.model_info.setText(describe_card(card) + ("" if spec != "default" else " " + OTHER_MODELS_NOTE)
                                if card else f"Model: {spec}")
        self.suggestions = list(card.get("suggestions", []))
        self._fill_prompt_choices()
        self._enable_clicks()
        self._show_model_threshold(spec)

    def _show_model_threshold(self, spec: str) -> None:
        """The model's own threshold (a converted CRIS folder carries the benchmark's 0.35), set
        without re-thresholding the previous model's result."""
        from napari_vlsm.core.inference.folder_labeling import default_threshold

        try:
            value = round(default_threshold(spec) * 100)
        except Exception:  # a folder that cannot be read: its loading will say why
            return
        self.threshold.blockSignals(True)
        self.threshold.setValue(value)
        self.threshold.blockSignals(False)
        self.threshold_label.setText(f"{value / 100:.2f}")

    def _add_built_prompt(self):
        attrs = {k: c.currentText().strip() for k, c in self.attr_combos.items()}
        text = build_prompt(self.class_edit.text().strip() or "polyp", description=self.description_edit.text().strip(),
                            **attrs)
        existing = self.prompt_edit.toPlainText().rstrip()
        self.prompt_edit.setPlainText(f"{existing}\n{text}" if existing else text)

    # ---------- state ----------
    @property
    def model_spec(self) -> str:
        return self.state.model

    @property
    def mode(self) -> str:
        return self.mode_combo.currentData()

    @property
    def threshold_value(self) -> float:
        return self.threshold.value() / 100.0

    @property
    def prompts(self) -> list[str]:
        return [ln.strip() for ln in self.prompt_edit.toPlainText().splitlines() if ln.strip()]

    def image_layer(self):
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    # ---------- running ----------
    def segment_request(self, request: SegmentRequest) -> None:
        """Segment what the series asks for: its image into its Labels layer. A run still
        going on (the image left behind) ends first; the result of that one is dropped. Of the
        requests made meanwhile only the newest runs."""
        if self.worker is not None:
            if self._queued is None:
                self.when_done(self._run_queued)
            else:
                self._answer(self._queued, SegmentOutcome(self._queued, False))
            self._queued = request
            return
        if self.run(request) is None:
            self._answer(request, SegmentOutcome(request, False))

    def _run_queued(self) -> None:
        request, self._queued = self._queued, None
        if request is not None:
            self.segment_request(request)

    @staticmethod
    def _answer(request: SegmentRequest, outcome: SegmentOutcome) -> None:
        if request.on_done is not None:
            request.on_done(outcome)

    def _series_target(self, layer):
        """The Labels layer the image ``layer`` always segments into (the series'), shown in the choosers."""
        name = self.state.target_for(layer.name)
        if name is None or name not in self.viewer.layers:
            return None
        self.mode_combo.setCurrentIndex(self.mode_combo.findData("replace"))
        self._refresh_layers()
        self.target_combo.setCurrentText(name)
        return self.viewer.layers[name]

    def run(self, request: SegmentRequest | None = None):
        """Check the inputs, then segment in a background worker."""
        if request is not None:
            self.image_combo.setCurrentText(request.image)
        layer = self.image_layer()
        if layer is not None and self.worker is None:
            self._series_target(layer)
        if layer is None:
            return self._refuse("No image layer: open an image (File > Open, or a sample) and choose it above.")
        if not self.prompts:
            return self._refuse("The prompt is empty: type what to segment, for example 'polyp'.")
        try:
            check_single_scale(layer)
        except ValueError as exc:
            return self._refuse(str(exc))
        if self.mode != "new":
            target = self._target_layer()
            if target is None:
                return self._refuse("Choose the Labels layer to write into, or write to a new Labels layer.")
            try:
                label_writing.check_target(target, layer)
            except ValueError as exc:
                return self._refuse(str(exc))
        if self.worker is not None:
            return self._refuse("A segmentation is already running; wait for it or press Cancel.")
        indices = all_indices(layer) if self.all_slices.isChecked() else \
            [current_index(layer, self.viewer.dims.point)]
        self._remember(self.prompt_edit.toPlainText().strip())
        mode, target = self.mode, (self._target_layer() if self.mode != "new" else None)
        segmented = (layer.data, None if target is None else target.data)  # what the result belongs to
        if target is not None:  # the planes as asked for: strokes made while it runs are kept
            segmented += ({i: plane(target, i).copy() for i in indices},)
        worker = thread_worker(self.session.segment, progress={"total": len(indices), "desc": "Segmenting"},
                               ignore_errors=True)(
            self.model_spec, self.device_combo.currentText(), layer, indices, self.prompts, self.threshold_value)
        worker.returned.connect(lambda result: self._write(result, layer, mode, target, segmented))
        worker.errored.connect(self._failed)
        worker.finished.connect(self._done)
        self.worker = worker
        self._request, self._outcome = request, None
        self._set_running(True)
        self.status.setText(f"Segmenting {len(indices)} plane(s) of '{layer.name}'…")
        worker.start()
        return worker

    def _refuse(self, message: str) -> None:
        """An input problem: a notification, and the status line says the same (not an old result)."""
        show_error(message)
        self.status.setText(message)

    def _forget_removed(self, event) -> None:
        if f"'{event.value.name}'" in self.status.text():  # never point at a layer that is gone
            self.status.setText(f"'{event.value.name}' was removed.")

    def cancel(self):
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("Cancelled; nothing was written.")

    def _done(self):
        self.worker = None
        self._set_running(False)
        self._enable_clicks()  # the model that loaded says whether it takes clicks
        request, self._request = self._request, None
        if request is not None:
            self._answer(request, self._outcome or SegmentOutcome(request, False))
        calls, self._when_done = self._when_done, []
        for call in calls:
            call()

    def when_done(self, call) -> None:
        """Call ``call`` once the running segmentation has ended (at once when none runs).
        Connecting to the worker's own signal could miss an end already on its way."""
        if self.worker is None:
            call()
        else:
            self._when_done.append(call)

    def _set_running(self, running: bool):
        for w in (self.segment_btn, self.mode_combo, self.target_combo, self.model_combo, self.device_combo):
            w.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if not running:
            self.target_combo.setEnabled(self.mode != "new")
        self.state.set_segmenting(running)

    def _failed(self, exc: Exception):
        if isinstance(exc, (VLSMError, ValueError, OSError)):
            show_error(str(exc))
        else:
            show_error(f"Segmentation failed: {type(exc).__name__}: {exc}")
        self.status.setText("Failed; your layers were not changed.")
        failed = self.model_spec
        if failed != (self.session.spec or "default") and failed != "default":  # the model did not load
            self.model_combo.removeItem(self.model_combo.findData(failed))
            if failed in self.state.models:
                self.state.models.remove(failed)
            self.state.use_model(self.session.spec or "default")
            self.status.setText(f"Could not load {failed}; back to {self.model_spec}. Your layers were not changed.")

    def _remember(self, text: str):
        self.history = [text] + [h for h in self.history if h != text][:HISTORY_SIZE - 1]
        self._fill_prompt_choices()

    def _fill_prompt_choices(self):
        """Recent prompts first, then what the model was trained on."""
        self.history_combo.clear()
        self.history_combo.addItems(self.history + [s for s in self.suggestions if s not in self.history])

    def _target_layer(self):
        name = self.target_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _write(self, result, image_layer, mode: str, target, segmented: tuple):
        """Put the probabilities of a finished run into Labels (on the GUI thread), unless the
        image or the Labels layer was given other data meanwhile (the image series' Previous and
        Next swap both): then the result belongs to nothing on screen and is dropped."""
        for msg in result.messages:
            show_warning(msg)
        if not result.probs:
            return
        if target is not None and target not in self.viewer.layers:
            return show_error(f"The Labels layer '{target.name}' was removed while segmenting; nothing was written.")
        if image_layer.data is not segmented[0] or (target is not None and target.data is not segmented[1]):
            self.status.setText(f"'{image_layer.name}' or its Labels layer changed while segmenting, so the result "
                                "was not written; press Segment to segment what is shown now.")
            return
        keep, kept = ({}, 0) if target is None else label_writing.pixels_to_keep(target, segmented[2], self.edits, mode)
        if result.threshold != self.threshold_value:  # the slider moved while it ran
            result.choices = {i: label_writing.choose(p, self.threshold_value) for i, p in result.probs.items()}
        before = None if target is None else {i: plane(target, i).copy() for i in result.choices}
        target, write = label_writing.write_result(self.viewer, image_layer, target, result.choices, result.prompts,
                                                   self.threshold_value, mode, keep)
        result.choices = {}  # written; the probabilities stay for the slider
        self._follow_undo(target)
        for index in result.probs:
            self.edits.forget(target, index)
        target.metadata.update({layer_keys.MODEL: self.session.spec, layer_keys.PROMPTS: list(result.prompts),
                                layer_keys.THRESHOLD: self.threshold_value, layer_keys.IMAGE: image_layer.name})
        if self._request is not None:
            self._outcome = SegmentOutcome(self._request, True, kept)
        self.session.last = result if write is not None else None  # the slider re-thresholds one plane
        self.session.last_write = write
        self._last_target = target
        if write is not None:  # each prompt's probabilities: a click on its object refines them
            for value, probs in zip(write.values, result.probs[write.index]):
                self._remember_object(target, write.index, value, probs)
        if self.show_probs.isChecked():
            self._add_probability_layer(image_layer, result)
        # the result becomes the active layer, ready for the brush; announced again even when it
        # already was (a new layer is active before its metadata is set), so Finetune follows it
        clicking = self.viewer.layers.selection.active
        self.viewer.layers.selection.active = None
        self.viewer.layers.selection.active = target
        if clicking is not None and self.click_tools.is_tool(clicking):
            self.viewer.layers.selection.active = clicking  # the annotator goes on clicking
        backend = self.session.backend
        from napari_vlsm.core.device import describe

        changed = None if before is None else sum(int((plane(target, i) != b).sum()) for i, b in before.items())
        self.status.setText(self._result_message(result, target, f"{backend.name} on "
                                                 f"{describe(backend.device, backend.dtype)}", kept, mode, changed))

    def _result_message(self, result, target, engine: str, kept: int = 0, mode: str = "new",
                        changed: int | None = None) -> str:
        card = card_for(self.session.spec)
        highest = [max(float(p[i].max()) for p in result.probs.values()) for i in range(len(result.prompts))]
        empty = [p for p, h in zip(result.prompts, highest) if not label_writing.reaches(h, self.threshold_value)]
        if len(empty) == len(result.prompts):
            text = (f"Nothing above threshold {self.threshold_value:.2f} (highest probability {max(highest):.2f}) "
                    f"for {', '.join(repr(p) for p in result.prompts)}. " + nothing_found_hint(card, result.prompts))
        elif changed == 0:
            text = (f"Nothing changed in '{target.name}': " + (
                "every pixel the model found is labelled there already (this mode writes only where the layer is 0)."
                if mode == "fill" else "it held this result already."))
        else:
            pixels = "" if changed is None else f" ({changed} pixel(s) changed)"
            text = f"Wrote {len(result.probs)} plane(s) to '{target.name}' with {engine}{pixels}."
            if empty:
                text += (f" Nothing above threshold {self.threshold_value:.2f} for "
                         f"{', '.join(repr(p) for p in empty)}.")
        if kept:
            text += f" Kept {kept} pixel(s) you edited while it ran."
        return f"{text} {unknown_words_note(card, result.prompts)}".strip()

    def _add_probability_layer(self, image_layer, result):
        index, probs = next(iter(result.probs.items()))
        name = f"{image_layer.name} · probability"
        data = probs.max(axis=0)
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
        else:
            self.viewer.add_image(data, name=name, colormap="magma", opacity=0.5, contrast_limits=(0, 1),
                                  scale=image_layer.scale[-2:], translate=image_layer.translate[-2:],
                                  metadata={layer_keys.PROBABILITY: True})

    def _rethreshold(self, value: int):
        """Apply a new threshold to the last probabilities, without running the model. The new
        plane is worked out in a worker; only the write itself is on the GUI thread."""
        self.threshold_label.setText(f"{value / 100:.2f}")
        last, write = self.session.last, self.session.last_write
        if last is None or write is None or write.layer not in self.viewer.layers:
            if self.viewer.layers:
                self.status.setText(f"Threshold {value / 100:.2f} applies to the next Segment (the slider "
                                    "re-thresholds a single segmented plane only).")
            return
        self._wanted_threshold = self.threshold_value
        if self.thresholding is None:
            self._plan_threshold()

    def _plan_threshold(self):
        last, write, threshold = self.session.last, self.session.last_write, self._wanted_threshold
        worker = thread_worker(label_writing.plan_threshold)(write, last.probs[write.index], threshold)
        worker.returned.connect(lambda planned: self._apply_threshold(write, planned, threshold))
        worker.errored.connect(self._failed)
        worker.finished.connect(lambda: self._threshold_planned(threshold))
        self.thresholding = worker
        worker.start()

    def _apply_threshold(self, write, planned, threshold: float):
        if write is not self.session.last_write or write.layer not in self.viewer.layers or self.worker is not None:
            return  # a newer result, a removed layer, or a run whose result will replace it
        if not label_writing.rethreshold(write, planned, threshold):
            self.status.setText("The layer was edited since; press Segment to apply the new threshold.")
            return
        self.edits.forget(write.layer, write.index)
        write.layer.metadata[layer_keys.THRESHOLD] = threshold

    def _threshold_planned(self, threshold: float):
        self.thresholding = None
        if self._wanted_threshold != threshold and self.session.last_write is not None:
            self._plan_threshold()  # the slider moved on while this one was worked out

    def _follow_undo(self, layer) -> None:
        key = label_writing.layer_key(layer)
        if key not in self._watched_layers:
            self._watched_layers.add(key)
            layer.events.set_data.connect(lambda event: self._undo_timer.start())

    def _show_threshold_of_plane(self):
        """After an undo or redo the plane may hold an earlier threshold's result: the slider says which."""
        write = self.session.last_write
        if write is None or write.layer not in self.viewer.layers or self.thresholding is not None:
            return
        shown = label_writing.threshold_shown(write)
        if shown is not None and shown != self.threshold_value:
            self.threshold.blockSignals(True)
            self.threshold.setValue(round(shown * 100))
            self.threshold.blockSignals(False)
            self.threshold_label.setText(f"{shown:.2f}")
            self._wanted_threshold = shown

    # ---------- clicks and the box ----------
    def takes_clicks(self) -> bool:
        """Whether the chosen model reads clicks and a box: the loaded model's word, else its
        folder's config (a hub model not loaded yet counts as text only until it loads)."""
        backend = self.session.backend
        if backend is not None and self.session.spec == self.model_spec:
            return bool(backend.takes_clicks)
        return bool(click_tools.model_takes_clicks(self.model_spec))

    def _enable_clicks(self) -> None:
        takes = self.takes_clicks()
        if takes:
            why = CLICKS_HELP
        else:
            why = (f"The model {short_model_name(self.model_spec)} takes text prompts only, so clicks and a box "
                   "cannot refine its results. Choose a model that takes them (a FiLM-UNet trained with clicks).")
        self.clicks_group.setEnabled(takes)
        self.clicks_group.setToolTip(why)
        tips = {self.clicks_btn: "Add clicks (napari's Points layer 'clicks', add mode)",
                self.box_btn: "Draw a box around the object (Shapes layer 'box', rectangle mode)",
                self.sign_btn: f"The sign of the next click; the key {click_tools.TOGGLE_KEY} toggles it",
                self.clear_clicks_btn: "Remove the clicks and the box (Shift+C); the labels stay"}
        for button, tip in tips.items():
            button.setToolTip(f"{tip}.\n\n{why}")

    def _show_sign(self, positive: bool) -> None:
        self.next_positive = positive
        self.sign_btn.setText(f"{'+ positive' if positive else '− negative'} ({click_tools.TOGGLE_KEY})")
        colour = click_tools.POSITIVE_COLOUR if positive else click_tools.NEGATIVE_COLOUR
        self.sign_btn.setStyleSheet(f"QPushButton {{ color: {colour}; font-weight: bold; }}")

    def set_next_sign(self, positive: bool) -> None:
        """The sign of the next click (the button and the key T)."""
        layer = self.image_layer()
        if layer is not None and self.takes_clicks():
            points, _ = self.click_tools.layers(layer)
            click_tools.set_next_positive(points, positive)
        self._show_sign(positive)

    def _tool_layers(self):
        layer = self.image_layer()
        if layer is None:
            self._refuse("No image layer: open an image (File > Open, or a sample) and choose it above.")
            return None
        if not self.takes_clicks():
            self._refuse(self.clicks_group.toolTip())
            return None
        return self.click_tools.layers(layer)

    def start_clicking(self) -> None:
        """Select the clicks layer in add mode: each click on the image refines the object."""
        layers = self._tool_layers()
        if layers is not None:
            points = layers[0]
            click_tools.set_next_positive(points, self.next_positive)
            self.viewer.layers.selection.active = points
            points.mode = "add"

    def start_box(self) -> None:
        layers = self._tool_layers()
        if layers is not None:
            self.viewer.layers.selection.active = layers[1]
            layers[1].mode = "add_rectangle"

    def clear_clicks(self) -> None:
        """Remove the clicks and the box; the labels they produced stay."""
        self._click_serial += 1  # a click still being answered is not written
        self._pending_click = None
        self.click_tools.clear()

    def _series_shown(self, name: str) -> None:
        """The series shows another image in its layers: clicks refine its objects in its
        Labels layer; the clicks and box of the image left are kept, this one's come back."""
        series = self.state.series
        if series is not None and self._clicks_shown is not None and self._clicks_shown[0] is series:
            # the image left, of this series (not of one opened since)
            series.keep_clicks(self._clicks_shown[1], self.click_tools.state())
        self._clicks_shown = (series, name)
        image = next((i for i in self.state.targets if i in self.viewer.layers), None)
        if image is None:
            return
        self.image_combo.setCurrentText(image)
        self._series_target(self.viewer.layers[image])
        self._click_serial += 1  # nothing is refined by showing them
        self._pending_click = None
        kept = series.clicks.get(name) if series is not None else None
        if kept or self.click_tools.has_prompts():
            self.click_tools.restore(kept, self.viewer.layers[image])
        self.click_tools.raise_()

    def _watch_object(self, layer) -> None:
        """Another label selected is another object: the clicks were for the one before."""
        key = label_writing.layer_key(layer)
        if key not in self._watched_labels:
            self._watched_labels.add(key)
            layer.events.selected_label.connect(lambda event: self._object_changed(layer))
            layer.events.data.connect(lambda event: self._forget_objects(layer))  # another image's labels

    def _forget_objects(self, layer) -> None:
        key = label_writing.layer_key(layer)
        self._object_probs = {k: v for k, v in self._object_probs.items() if k[0] != key}

    def _object_changed(self, layer) -> None:
        target = self._click_target_layer()
        same = target is not None and label_writing.layer_key(target) == label_writing.layer_key(layer)
        if same and self.click_tools.has_prompts():
            self.clear_clicks()
            self.status.setText(f"Label {layer.selected_label} selected: the clicks of the label before were "
                                "cleared.")

    def _remember_object(self, target, index: tuple, value: int, probs) -> None:
        """The probabilities behind label ``value`` as just written: the next click refines
        them, as long as the layer still shows what they gave there."""
        mask = plane(target, index) == value
        self._object_probs[(label_writing.layer_key(target), index, value)] = (probs, label_writing.digest(mask))

    def _previous(self, target, index: tuple, value: int, mask):
        """What a click refines: the object's probabilities when the layer shows them as they
        were written, else its ``mask`` there (edited since), or None when it has no pixel."""
        stored = self._object_probs.get((label_writing.layer_key(target), index, value))
        if stored is not None and stored[1] == label_writing.digest(mask):
            return stored[0]
        return mask if mask.any() else None

    def _click_target_layer(self):
        """The Labels layer clicks write into: the one chosen, or (new layer mode) the last result's."""
        if self.mode != "new":
            return self._target_layer()
        last = self._last_target
        return last if last is not None and last in self.viewer.layers else None

    def _clicks_changed(self) -> None:
        self._click_timer.start()

    def _answer_clicks(self) -> None:
        """The clicks or the box changed: refine the object in a worker. One worker at a time;
        a request made meanwhile waits, replacing any that waited before it, and the result of
        a request that is no longer the newest is dropped."""
        self._click_serial += 1
        self._pending_click = None
        if self.worker is not None:  # a segmentation runs: refine its result once it is written
            serial = self._click_serial
            self.when_done(lambda: serial == self._click_serial and self._answer_clicks())
            return
        request = self._click_request()
        if request is None:
            return
        self._pending_click = request
        if self.clicking is None:
            self._start_click()

    def _click_request(self) -> dict | None:
        image = self.image_layer()
        if image is None:
            return self._refuse("No image layer: open an image (File > Open, or a sample) and choose it above.")
        if not self.takes_clicks():
            self.status.setText(self.clicks_group.toolTip() + " The clicks were not used.")
            return None
        try:
            check_single_scale(image)
        except ValueError as exc:
            return self._refuse(str(exc))
        index = current_index(image, self.viewer.dims.point)
        clicks = click_tools.clicks_on_plane(self.click_tools.points, image, index)
        box = click_tools.box_on_plane(self.click_tools.shapes, image, index)
        if not clicks and box is None:
            self.status.setText("No clicks or box left on this plane; the labels stay as they are (Ctrl+Z on the "
                                "Labels layer undoes what the clicks wrote).")
            return None
        target = self._click_target_layer()
        if self.mode != "new" and target is None:
            return self._refuse("Choose the Labels layer the clicks refine, or write to a new Labels layer.")
        if target is not None:
            try:
                label_writing.check_target(target, image)
            except ValueError as exc:
                if self.mode != "new":
                    return self._refuse(str(exc))
                target = None
        if target is None:  # made before napari sees data in it: no undo entry for the new layer
            with self.click_tools.quiet():
                active = self.viewer.layers.selection.active
                target = label_writing.new_labels_layer(self.viewer, image, f"{image.name} · clicks")
                label_writing.use_bright_colours(target, list(range(1, 9)))
                target.metadata[layer_keys.IMAGE] = image.name
                self.viewer.layers.selection.active = active
            self._last_target = target
            self._refresh_layers()
            self.click_tools.raise_()
        value = int(target.selected_label)
        if value == 0:
            return self._refuse(f"Label 0 is the background of '{target.name}'; select the label of the object "
                                "to refine (the Labels layer's label field).")
        names = {int(k): v for k, v in target.metadata.get(layer_keys.LABELS, {}).items()}
        prompt = names.get(value, "")
        shown = plane(target, index)
        mask = shown == value
        if prompt and not mask.any():
            # The words found nothing here (a kind of image the model does not know): asked with
            # them, the clicks would be read as "that, which is absent". The clicks alone say what
            # the object is: the empty prompt, "the thing I click".
            prompt = ""
        return dict(serial=self._click_serial, image=image, image_data=image.data, target=target,
                    target_data=target.data, index=index, value=value, prompt=prompt, clicks=clicks,
                    box=box, previous=self._previous(target, index, value, mask),
                    before=shown.copy(), threshold=self.threshold_value)

    def _start_click(self) -> None:
        request, self._pending_click = self._pending_click, None
        worker = thread_worker(self.session.refine, ignore_errors=True)(
            self.model_spec, self.device_combo.currentText(), request["image"], request["index"], request["prompt"],
            request["clicks"], request["box"], request["previous"], request["threshold"])
        worker.returned.connect(lambda result: self._write_click(request, result))
        worker.errored.connect(lambda exc: self._click_failed(request, exc))
        worker.finished.connect(self._click_done)
        self.clicking = worker
        worker.start()

    def _click_done(self) -> None:
        self.clicking = None
        if self._pending_click is not None:
            self._start_click()

    def _click_failed(self, request: dict, exc: Exception) -> None:
        if request["serial"] != self._click_serial:
            return
        text = str(exc) if isinstance(exc, (VLSMError, ValueError, OSError)) else \
            f"The click could not be answered: {type(exc).__name__}: {exc}"
        show_error(text)
        self.status.setText(f"{text} The labels were not changed.")
        self._enable_clicks()

    def _write_click(self, request: dict, result) -> None:
        """Write a refined object into its label value, as one undo step: pixels of the object
        no longer found cleared, new ones set where nothing else is, other labels and the
        strokes made since the last result left as they are. Dropped when a newer request was
        made, or the image or its labels were swapped meanwhile (the series moved on)."""
        target, index, value = request["target"], request["index"], request["value"]
        if request["serial"] != self._click_serial or target not in self.viewer.layers:
            return
        if request["image"].data is not request["image_data"] or target.data is not request["target_data"]:
            return
        probs, mask = result
        current = plane(target, index)
        keep = current != request["before"]  # painted while it ran
        touched = self.edits.touched(target, index)
        if touched is not None:
            keep |= touched  # painted or erased since the last result
        label_writing.widen_for(target, value)
        planned = click_tools.refined_plane(current, mask, value, keep)
        label_writing.write_plane(target, index, planned)  # one undo step
        self.edits.forget(target, index)
        if request["prompt"]:
            label_writing.set_label_names(target, {value: request["prompt"]})
        kept = int((planned != click_tools.refined_plane(current, mask, value)).sum())
        if not kept:
            self._remember_object(target, index, value, probs)
        else:  # strokes were kept: the next click refines the layer's mask, strokes and all
            self._object_probs.pop((label_writing.layer_key(target), index, value), None)
        added = int(((planned == value) & (current != value)).sum())
        removed = int(((planned != value) & (current == value)).sum())
        n = len(request["clicks"])
        what = f"{n} click{'s' * (n != 1)}" + (" and a box" if request["box"] is not None else "")
        if not n:
            what = "a box"
        name = f" ('{request['prompt']}')" if request["prompt"] else " (no words: the thing clicked)"
        text = f"Refined label {value}{name} of '{target.name}' with {what}: {added} pixel(s) added, {removed} removed."
        if kept:
            text += f" Kept {kept} pixel(s) you painted since the last result."
        self.status.setText(text)
