"""The "Finetune" dock widget: collect corrected masks, train in the background, use the
new model at once. Layout and wiring only; the work is ``core.train.finetune``. The model it
trains, the device, the training set's folder and what becomes of a new model are the
viewer's ``PluginState``'s; the image series asks it for runs there."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import napari
import numpy as np
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_vlsm.core.training.checkpoint import BEST, new_run_folder
from napari_vlsm.core.errors import VLSMError
from napari_vlsm.core.file_names import CONFIG
from napari_vlsm.core.training.settings import ROUND_STEPS
from napari_vlsm.core.training.train import SMALL_SET, TRAIN_MODES_OFFERED, TrainSettings, finetune
from napari_vlsm.core.data.training_sets import read_index, remove_example, write_benchmark_example
from . import layer_keys
from .label_writing import check_target
from .planes import check_single_scale, current_index, plane
from .qt_helpers import (
    ask,
    bind_to_state,
    fill_layer_combo,
    join_plugin_tabs,
    name_combo,
    on_layers_changed,
    on_window_close,
    scrolling_layout,
)
from .state import FINETUNE, state_for
from .training_plot import CurvePlot

DEFAULTS = TrainSettings()  # one recipe for the widget and the command line


def _finetune_with_summary(*args, **kwargs):
    """``finetune``'s events, returning its closing line (so the dock shows it however the
    last queued events and the worker's end are ordered)."""
    summary = ""
    for ev in finetune(*args, **kwargs):
        summary = ev.message if ev.kind == "done" else summary
        yield ev
    return summary


class FinetuneWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.state = state_for(viewer)
        self.worker = None
        self.pbar = None
        self._summary = ""  # the last run's closing line
        self._auto_epochs = False  # the run going on has its length in steps, not epochs
        self._closing = None  # watches the window once a run starts
        self._build()
        join_plugin_tabs(self, "Finetune")
        self._wire()
        self._bind()
        self._refresh_layers()
        self._refresh_examples()

    def _build(self):
        form = QFormLayout()
        self.folder_edit = QLineEdit(str(state_for(self.viewer).training_folder))
        self.folder_btn = QPushButton("…")
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(self.folder_btn)
        form.addRow("Training set", row)
        self.image_combo = name_combo()
        self.labels_combo = name_combo()
        self.label_value = QSpinBox()
        self.label_value.setRange(1, 65535)
        self.prompt_edit = QLineEdit()
        self.prompt_edit.setPlaceholderText("prompt for this label, e.g. polyp")
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Label value", self.label_value)
        form.addRow("Prompt", self.prompt_edit)
        self.add_btn = QPushButton("Add current image + labels")
        self.examples = QListWidget()
        self.examples.setMinimumHeight(110)  # the dock scrolls; the list shows its rows
        self.remove_btn = QPushButton("Remove selected")

        self.mode_combo = QComboBox()
        self.mode_combo.addItems(TRAIN_MODES_OFFERED)
        self.mode_combo.setCurrentText(DEFAULTS.mode)
        self.epochs = QSpinBox()
        self.epochs.setRange(0, 1000)
        self.epochs.setSpecialValueText(f"auto ({ROUND_STEPS} steps)")
        # no promise of a duration: 100 steps of the default model on 6 corrections took 278 s on a
        # busy 2-core CPU here; the status line estimates the time left from the run's own pace
        self.epochs.setToolTip(f"auto: {ROUND_STEPS} optimiser steps for a round of corrections, more for a larger "
                               "set; the time left is estimated once the run is going")
        self.epochs.setValue(DEFAULTS.epochs or 0)
        self.lr = QLineEdit("")
        self.lr.setPlaceholderText("model's default")
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(DEFAULTS.batch_size)
        self.val_share = QDoubleSpinBox()
        self.val_share.setRange(-0.05, 0.9)
        self.val_share.setSingleStep(0.05)
        self.val_share.setSpecialValueText("auto")
        self.val_share.setToolTip(f"auto: every correction trains below {SMALL_SET} examples, else 0.2 held out")
        self.val_share.setValue(-0.05 if DEFAULTS.val_fraction is None else DEFAULTS.val_fraction)
        settings = QFormLayout()
        settings.addRow("Train", self.mode_combo)
        settings.addRow("Epochs", self.epochs)
        settings.addRow("Learning rate", self.lr)
        settings.addRow("Batch size", self.batch)
        settings.addRow("Validation share", self.val_share)

        self.train_btn = QPushButton("Train")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        self.back_btn = QPushButton("Back to previous model")
        self.back_btn.setEnabled(False)
        brow = QHBoxLayout()
        for b in (self.train_btn, self.stop_btn):
            brow.addWidget(b)
        self.plot = CurvePlot()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.add_btn)
        layout.addWidget(QLabel("Collected examples"))
        layout.addWidget(self.examples)
        layout.addWidget(self.remove_btn)
        layout.addLayout(settings)
        layout.addLayout(brow)
        layout.addWidget(self.plot)
        layout.addWidget(self.back_btn)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _wire(self):
        on_layers_changed(self.viewer, self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self.labels_combo.currentTextChanged.connect(self._suggest_prompt)
        self.label_value.valueChanged.connect(self._suggest_prompt)
        self.folder_btn.clicked.connect(self._browse)
        self.folder_edit.editingFinished.connect(lambda: self.state.set_training_folder(self.folder))
        self.add_btn.clicked.connect(self.add_current)
        self.remove_btn.clicked.connect(self.remove_selected)
        self.train_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(self.stop)
        self.back_btn.clicked.connect(self.use_previous_model)

    def _bind(self):
        """Follow the state; let go of it when the dock goes."""
        bound = [(self.state.examples_changed, self._examples_changed),
                 (self.state.training_wanted, self.start),
                 (self.state.model_changed, self._show_models), (self.state.pending_changed, self._show_models)]
        bind_to_state(self, self.state, FINETUNE, bound)

    @property
    def folder(self) -> Path:
        return Path(self.folder_edit.text()).expanduser()

    def _refresh_layers(self, *_):
        fill_layer_combo(self.image_combo, self.viewer, napari.layers.Image)
        fill_layer_combo(self.labels_combo, self.viewer, napari.layers.Labels)
        self._suggest_prompt()

    def _follow_selection(self, event=None):
        """A selected Labels layer becomes the one to add; one written by the segmentation
        widget also brings its image, label value and prompt."""
        layer = self.viewer.layers.selection.active
        if not isinstance(layer, napari.layers.Labels):
            return
        self._refresh_layers()
        self.labels_combo.setCurrentText(layer.name)
        image = layer.metadata.get(layer_keys.IMAGE)
        if image in self.viewer.layers:
            self.image_combo.setCurrentText(image)
        names = layer.metadata.get(layer_keys.LABELS) or {}
        if names:
            self.label_value.setValue(int(max(names)))  # the newest label written
        self._suggest_prompt()

    def _suggest_prompt(self, *_):
        name = self.labels_combo.currentText()
        if name in self.viewer.layers:
            names = self.viewer.layers[name].metadata.get(layer_keys.LABELS, {})
            if self.label_value.value() in names:
                self.prompt_edit.setText(names[self.label_value.value()])

    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Training-set folder")
        if folder:
            self.folder_edit.setText(folder)
            self.state.set_training_folder(folder)

    def _examples_changed(self):
        """The training set's folder or contents changed (the series stored pairs)."""
        if self.folder != self.state.training_folder:
            self.folder_edit.setText(str(self.state.training_folder))
        self._refresh_examples()

    def _refresh_examples(self):
        self.examples.clear()
        try:
            entries = read_index(self.folder)
        except ValueError as exc:
            show_error(str(exc))
            return
        for e in entries:
            self.examples.addItem(f"{e['img_name']}  —  {e['prompts'].get('p1', '')}")

    def add_current(self):
        """Store a copy of the current image plane and its label mask in the training set."""
        img_name, lab_name = self.image_combo.currentText(), self.labels_combo.currentText()
        if img_name not in self.viewer.layers or lab_name not in self.viewer.layers:
            return show_error("Choose an image layer and the Labels layer with its corrected mask.")
        prompt = self.prompt_edit.text().strip()
        if not prompt:
            return show_error("Type the prompt this label stands for, for example 'polyp'.")
        image_layer, labels_layer = self.viewer.layers[img_name], self.viewer.layers[lab_name]
        try:
            check_single_scale(image_layer)
            check_target(labels_layer, image_layer)
        except ValueError as exc:
            return show_error(str(exc))
        index = current_index(image_layer, self.viewer.dims.point)
        labels = plane(labels_layer, index)
        value = self.label_value.value()
        if not (labels == value).any():
            present = np.unique(labels[labels != 0])
            if len(present) == 1:  # a mask with one value, such as 255 from a PNG on disk
                value = int(present[0])
                self.label_value.setValue(value)
            elif not self._confirm(f"Label {value} is absent from this image. Store it as an empty (negative) "
                                   f"example for '{prompt}', meaning there is nothing of it here?"):
                return self.status.setText("Nothing stored.")
        mask = labels == value
        name = f"{img_name}-{'-'.join(map(str, index)) or '0'}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        try:
            write_benchmark_example(self.folder, name, plane(image_layer, index), mask, prompt)
        except OSError as exc:
            return show_error(f"Could not store the example in {self.folder}: {exc}")
        self._refresh_examples()
        self.status.setText(f"Stored example {name} ({self.examples.count()} in the training set).")

    def _confirm(self, question: str) -> bool:
        return ask(self, question)

    def remove_selected(self):
        for item in self.examples.selectedItems():
            remove_example(self.folder, item.text().split("  —  ")[0])
        self._refresh_examples()

    # ---------- training ----------
    def settings(self) -> TrainSettings:
        text = self.lr.text().strip()
        val = self.val_share.value()
        return TrainSettings(mode=self.mode_combo.currentText(), epochs=self.epochs.value() or None,
                             lr=float(text) if text else None, batch_size=self.batch.value(),
                             val_fraction=None if val < 0 else val)

    def start(self):
        """Train the model in use on the training set, in a worker; the job, or None when refused."""
        job = self._start()
        if job is None and not self.state.training:
            self.state.defer_activation = False  # a run the series asked for did not start
        return job

    def _start(self):
        if self.worker is not None:
            return show_warning("Training is already running.")
        try:
            settings = self.settings()
        except ValueError:
            return show_error(f"The learning rate {self.lr.text()!r} is not a number (e.g. 1e-4).")
        self.state.set_training_folder(self.folder)  # what the field says, typed or not
        if not read_index(self.folder):
            return show_error("The training set is empty: add an image and its corrected labels first.")
        spec, device = self.state.model, self.state.device
        try:
            out = new_run_folder(self.folder.parent / "models")
        except OSError as exc:
            return show_error(f"Cannot create a folder for the new model: {exc}. Choose a writable training "
                              "set folder.")
        self.plot.clear()
        self._auto_epochs = settings.epochs is None
        job = thread_worker(_finetune_with_summary, ignore_errors=True)(
            spec, [self.folder], out, settings, val_split="none", device=device, metadata={"source": "napari widget"})
        job.yielded.connect(self._on_progress)
        job.returned.connect(lambda summary: self._finished(out, summary))
        job.errored.connect(self._failed)
        job.finished.connect(self._cleanup)
        job.aborted.connect(lambda: self._stopped(out))
        self.worker = job
        self.state.training_started()
        self._closing = self._closing or on_window_close(self, self._window_closing)
        self.pbar = progress(total=0, desc="Finetuning")
        self.train_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.status.setText(f"Training {settings.mode} of {spec} on {self.examples.count()} example(s) "
                            f"({self.device_text()})…")
        job.start()
        return job

    def device_text(self) -> str:
        return "the device chosen automatically" if self.state.device == "auto" else self.state.device

    def stop(self):
        if self.worker is not None:
            self.worker.quit()

    def _window_closing(self) -> None:
        """napari is closing during a run: stop it (the last good checkpoint stays on disk) and
        cut it off from this dock, whose widgets are about to go."""
        job, self.worker = self.worker, None
        if job is None:
            return
        for signal in (job.yielded, job.returned, job.errored, job.finished, job.aborted):
            signal.disconnect()
        job.quit()
        self.state.training_ended(None)
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None

    def _on_progress(self, ev):
        if self.worker is None:  # an event still queued after the worker finished
            return
        if ev.kind == "step":
            self.plot.add("loss", ev.loss, ev.step)
        elif ev.kind == "epoch":
            self.plot.add("val Dice", ev.val_dice, ev.step)
            # the first epoch also loads the images and writes the first checkpoint: its pace
            # would overstate the rest (measured: 562 s said, 265 s taken), so wait for the second
            eta = "" if ev.epoch >= ev.epochs else ", estimating the time left" if ev.epoch < 2 or not ev.eta \
                else f", about {ev.eta:.0f} s left"
            self.status.setText(f"{self._where(ev)}: loss {ev.loss:.3f}"
                                + (f", val Dice {ev.val_dice:.3f}" if ev.val_dice is not None else "") + eta)
        elif ev.kind == "done":
            self.status.setText(ev.message)
        pbar = self.pbar
        if pbar is not None:  # last: redrawing it processes Qt events, the worker's end among them
            pbar.total, pbar.n = ev.steps, ev.step
            pbar.set_description(f"Finetuning, {self._where(ev).lower()}")

    def _where(self, ev) -> str:
        """How far the run is, in the unit its length was given in (auto: steps)."""
        return f"Step {ev.step}/{ev.steps}" if self._auto_epochs else f"Epoch {ev.epoch}/{ev.epochs}"

    def _finished(self, out: Path, summary: str = ""):
        best = out / BEST
        if not (best / CONFIG).exists():
            self.state.training_ended(None)
            self.status.setText(f"{summary} Training ended before any checkpoint was written.".strip())
            return show_warning("Training ended before any checkpoint was written.")
        self._summary = summary
        if self.state.training_ended(str(best)) == "used":
            show_info(f"Finetuned model saved to {best} and now in use.")
        self._show_models()

    def _stopped(self, out: Path):
        best = out / BEST
        if (best / CONFIG).exists():
            self._summary = f"Stopped; the last good checkpoint is {best}."
            self.state.training_ended(str(best))
            self._show_models()
        else:
            self.state.training_ended(None)
            self.status.setText(f"Stopped before the first checkpoint; the model in use ({self.state.model}) is "
                                "unchanged.")

    def _show_models(self, *_):
        """The status after a run: which model is in use, and the new one's fate. Said again
        whenever either changes (the series brings a waiting model in, Back is pressed)."""
        state = self.state
        self.back_btn.setEnabled(bool(state.previous_model or state.pending_model))
        if state.training or not state.last_trained:
            return
        new = state.last_trained
        if state.pending_model == new:
            text = f"New model {new} is ready; it is used from the series' next image."
        elif state.model == new:
            text = f"The new model {new} is in use."
        else:
            text = f"In use: {state.model}. The new model {new} stays on disk."
        self.status.setText(f"{self._summary} {text}".strip())

    def use_previous_model(self):
        """Back to the model used before the last one came in; a model still waiting for the
        next image is dropped, so Back sticks."""
        self.state.back_to_previous_model()
        self._show_models()

    def _failed(self, exc):
        msg = str(exc) if isinstance(exc, (VLSMError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        show_error(f"Training failed: {msg}")
        self.status.setText(f"Training failed: {msg}")

    def _cleanup(self):
        self.worker = None
        if self.state.training:  # failed: nothing came of it
            self.state.training_ended(None)
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        self.train_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
