"""The "Image series" dock widget: annotate a folder image by image (segment, correct, Next),
with auto-save, resume, quick mask edits, and training on the corrections every N images.
Layout and wiring only; the work is ``core.series`` and ``core.mask_edits``. Segmentations
and training runs are asked for through the viewer's ``PluginState``, which the other two
docks answer; the series' prompts, model, training interval, order and walk are kept there
and in the folder's series.json, so a reopened series takes up where it was left."""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_vlsm.core.data.training_sets import remove_label_examples, write_benchmark_example
from napari_vlsm.core.images import mask_edits
from napari_vlsm.core.inference.ordering import KIND_BATCH, order_images
from napari_vlsm.core.inference.series import Series
from napari_vlsm.core.inference.uncertainty import DEFAULT_SCORE, score_files

from . import layer_keys
from .label_writing import forget_history, use_bright_colours, write_plane
from .qt_helpers import ask, bind_to_state, join_plugin_tabs, on_window_close, scrolling_layout
from .state import FINETUNE, SEGMENT, SERIES, SegmentRequest, state_for

IMAGE_LAYER, LABELS_LAYER = "series image", "series labels"
AUTOSAVE_MS = 60_000  # a crash loses at most the current image's last minute
ORDERS = {"kinds": "Least sure of each kind first", "uncertain": "Most uncertain first", "name": "Name order"}
MIN_FOR_ESTIMATE = 3  # corrected images before the estimate of the model's Dice is shown
NO_SEGMENTER = ("Each image is segmented once Text-prompt segmentation is open (Plugins > napari-vlsm > "
                "Text-prompt segmentation).")
NO_PROMPTS = "To segment each image, type the prompts in Text-prompt segmentation."


class SeriesWidget(QWidget):
    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.state = state_for(viewer)
        self.index = 0
        self.loaded: np.ndarray | None = None  # the mask as shown, as the model proposed it, or as saved: not an edit
        self.saved_since_training = 0
        self.scores: dict[int, float] = {}  # image index -> uncertainty under the model scored with
        self.described: dict[int, np.ndarray] = {}  # image index -> its description by the image encoder
        self.queue: list[int] = []  # the images the order by kind chose, to do next
        self.drawn: set[int] = set()  # those of them drawn at random, for the stop estimate
        self._scored_with = None  # (model, prompt, order) of those scores or descriptions
        self.scoring = None  # the worker scoring (or describing) the images
        self.proposal: tuple[int, np.ndarray] | None = None  # (image, the model's mask as shown)
        self._walk_unknown = False
        self._build()
        join_plugin_tabs(self, "Series")
        self.timer = QTimer(self)
        self.timer.setInterval(AUTOSAVE_MS)
        self.timer.timeout.connect(self.autosave)
        self.timer.start()
        self._closing = None
        viewer.layers.events.removing.connect(self._before_removal)  # viewer.close() removes layers first
        self._show_settings()
        self._bind()

    def _bind(self):
        """Follow the state; let go of it when the dock goes."""
        bound = [(self.state.series_changed, self._show_settings), (self.state.docks_changed, self._docks_changed),
                 (self.state.prompts_changed, self._prompts_changed),
                 (self.state.training_changed, self._show_training), (self.state.pending_changed, self._show_training),
                 (self.state.model_changed, self._model_changed)]
        bind_to_state(self, self.state, SERIES, bound)

    @property
    def series(self) -> Series | None:
        return self.state.series

    # ---------- layout ----------
    def _build(self):
        form = QFormLayout()
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder of images, or a data set with images/")
        self.open_btn = QPushButton("Open…")
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(self.open_btn)
        form.addRow("Folder", row)
        self.out_label = QLabel("")
        self.out_label.setWordWrap(True)
        form.addRow("Masks go to", self.out_label)
        # short labels, the rest on hover: a checkbox does not wrap, and would widen the dock
        self.auto_segment = QCheckBox("Segment each new image")
        self.auto_segment.setToolTip("With the prompts typed in Text-prompt segmentation")
        self.auto_segment.setChecked(True)
        self.to_training = QCheckBox("Add each saved pair to training")
        self.to_training.setToolTip("Each saved image and mask joins the Finetune dock's training set")
        self.to_training.setChecked(True)
        self.train_every = QSpinBox()
        self.train_every.setRange(0, 1000)
        self.train_every.setSpecialValueText("never")
        form.addRow(self.auto_segment)
        form.addRow(self.to_training)
        form.addRow("Train on my corrections every", self.train_every)
        self.order_combo = QComboBox()
        for key, text in ORDERS.items():
            self.order_combo.addItem(text, key)
        self.order_combo.setToolTip("Next goes to the image the model is least sure of among a kind of image not "
                                    "yet corrected (no near copies in a row), or among all, or to the next name. "
                                    "Worked out in the background, again after each training.")
        form.addRow("Next image", self.order_combo)
        self.prev_btn = QPushButton("◀ Previous  (Alt+Left)")
        self.prev_btn.setShortcut("Alt+Left")
        self.next_btn = QPushButton("Save, next ▶  (Alt+Right)")
        self.next_btn.setShortcut("Alt+Right")
        nav = QHBoxLayout()
        nav.addWidget(self.prev_btn)
        nav.addWidget(self.next_btn, 1)
        self.progress = QLabel("No folder open.")
        self.progress.setWordWrap(True)
        self.training_line = QLabel("")  # a line of its own: quick edits do not wipe it
        self.training_line.setWordWrap(True)
        self.keep_btn = QPushButton("Keep piece (click)")
        self.remove_btn = QPushButton("Remove piece (click)")
        self.fill_btn = QPushButton("Fill holes")
        self.specks_btn = QPushButton("Remove specks under")
        self.speck_size = QSpinBox()
        self.speck_size.setRange(1, 100000)
        self.speck_size.setValue(50)
        self.speck_size.setSuffix(" px")
        edits1, edits2 = QHBoxLayout(), QHBoxLayout()
        edits1.addWidget(self.keep_btn)
        edits1.addWidget(self.remove_btn)
        edits2.addWidget(self.fill_btn)
        edits2.addWidget(self.specks_btn)
        edits2.addWidget(self.speck_size)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addLayout(nav)
        layout.addWidget(self.progress)
        layout.addWidget(self.training_line)
        layout.addWidget(QLabel("Quick edits of the selected label:"))
        layout.addLayout(edits1)
        layout.addLayout(edits2)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.open_btn.clicked.connect(self._browse)
        self.folder_edit.returnPressed.connect(lambda: self.open(self.folder_edit.text()))
        self.prev_btn.clicked.connect(self.previous)
        self.next_btn.clicked.connect(self.next)
        self.order_combo.currentIndexChanged.connect(self._order_changed)
        self.train_every.valueChanged.connect(lambda n: self.state.set_series_settings(train_every=n))
        self.keep_btn.clicked.connect(lambda: self._on_next_click(mask_edits.keep_piece))
        self.remove_btn.clicked.connect(lambda: self._on_next_click(mask_edits.remove_piece))
        self.fill_btn.clicked.connect(lambda: self._edit(lambda a, v: mask_edits.fill_holes(a, v)))
        self.specks_btn.clicked.connect(
            lambda: self._edit(lambda a, v: mask_edits.remove_specks(a, v, self.speck_size.value())))

    def _show_settings(self) -> None:
        """The state's training interval and order in the controls (a reopened series restores them)."""
        for control in (self.train_every, self.order_combo):
            control.blockSignals(True)
        self.train_every.setValue(self.state.train_every)
        self.order_combo.setCurrentIndex(max(self.order_combo.findData(self.state.order), 0))
        for control in (self.train_every, self.order_combo):
            control.blockSignals(False)

    # ---------- the series ----------
    def _browse(self):
        folder = QFileDialog.getExistingDirectory(self, "Folder of images to annotate")
        if folder:
            self.open(folder)

    def open(self, folder) -> None:
        """Open a folder as a series, with the prompts, model, training interval, order and walk
        its series.json kept, at the image left last (or the first not done)."""
        try:
            series = Series(Path(folder).expanduser())
        except OSError as exc:
            return show_error(str(exc))
        if self.series is not None:
            self._leave()
            self.state.close_series()
        self._forget_order()
        self._walk_unknown = "walked" not in series.settings and series.n_done > 0  # a series.json from before walks
        notes = self.state.open_series(series)
        self.state.targets = {IMAGE_LAYER: LABELS_LAYER}  # the series image always segments into its labels
        self._closing = self._closing or on_window_close(self, self._on_close)  # closing napari saves first
        self.folder_edit.setText(str(series.folder))
        self.out_label.setText(str(series.out_dir))
        self.status.setText(" ".join(notes))
        names = [p.name for p in series.images]
        left = self.state.walk[self.state.walk_pos] if self.state.walk else None
        self.show(names.index(left) if left in names and left not in series.done else series.first_undone())

    def show(self, i: int, forward: bool = True) -> None:
        """Show image ``i`` with its saved mask, or segment it if it has none (and that is on),
        fit to the view. ``forward``: a step on along the walk, not back."""
        s = self.series
        self.index = i
        image = s.image(i)
        saved = s.saved_mask(i)
        labels = saved if saved is not None else np.zeros(image.shape[:2], np.uint8)
        self._set_layer(IMAGE_LAYER, image, "image", rgb=image.ndim == 3 and image.shape[-1] in (3, 4))
        self._set_layer(LABELS_LAYER, labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16),
                        "labels")
        forget_history(self.labels_layer)  # undo stays within the image shown
        self.loaded = self.labels_layer.data.copy()
        self.viewer.reset_view()  # each image whole in the view, whatever the last one's zoom
        self.state.walked_to(s.images[i].name, forward)
        self.state.series_shown.emit(s.images[i].name)  # clicks refine this image's labels
        self.state.activate_pending()  # a model trained meanwhile comes in between images
        self.proposal = None
        self._rescore_if_stale()
        self._report()
        if saved is None and self.auto_segment.isChecked():
            self._segment()

    def _set_layer(self, name, data, kind, **kwargs):
        cls = napari.layers.Image if kind == "image" else napari.layers.Labels
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], cls) \
                and getattr(self.viewer.layers[name], "rgb", False) == kwargs.get("rgb", False):
            self.viewer.layers[name].data = data
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            add = self.viewer.add_image if kind == "image" else self.viewer.add_labels
            layer = add(data, name=name, **kwargs)
            if kind == "labels":
                use_bright_colours(layer, list(range(1, 9)))
        self.viewer.layers.selection.active = self.viewer.layers[LABELS_LAYER if LABELS_LAYER in self.viewer.layers
                                                                 else name]

    @property
    def labels_layer(self):
        return self.viewer.layers[LABELS_LAYER]

    def _segment(self):
        """Ask the segmentation dock to segment the image shown into the series' labels."""
        if not self.state.prompts:
            self.status.setText(NO_PROMPTS)
            return
        index = self.index
        request = SegmentRequest(IMAGE_LAYER, LABELS_LAYER, on_done=lambda outcome: self._segmented(index, outcome))
        if not self.state.request_segment(request):
            self.status.setText(NO_SEGMENTER)

    def _segmented(self, index: int, outcome) -> None:
        """The model's mask as it landed, before any correction: not an edit of the annotator's
        (so it is not auto-saved), and its agreement with the saved mask is what estimates the
        model's Dice on the rest."""
        if not outcome.written or index != self.index or LABELS_LAYER not in self.viewer.layers:
            return
        data = np.asarray(self.labels_layer.data).copy()
        self.proposal = (index, data)
        if not outcome.kept:  # strokes painted while it ran are edits, and are saved with it
            self.loaded = data.copy()
        if self.status.text() in (NO_SEGMENTER, NO_PROMPTS):
            self.status.setText("")

    def _docks_changed(self) -> None:
        if SEGMENT in self.state.docks and self.status.text() == NO_SEGMENTER:
            self.status.setText("")  # the dock took the waiting request when it opened

    def _prompts_changed(self, prompts) -> None:
        if prompts and self.status.text() == NO_PROMPTS:
            self.status.setText("Press Segment in Text-prompt segmentation for this image; each next image is "
                                "segmented as it comes.")

    def _model_changed(self, spec) -> None:
        if self.series is not None:
            self._report()

    def next(self) -> bool:
        """Save the current mask (asking before replacing a different saved one), mark it done,
        add it to the training set, maybe train, and show the next image: the one shown after
        this one before (after going back), else the next in the order."""
        if self.series is None:
            return False
        if not self.save(done=True):
            return False
        after = self.state.walked_after()
        names = [p.name for p in self.series.images]
        following = names.index(after) if after in names else self.next_index()
        if following is not None:
            if following in self.drawn and self.state.order == "kinds":
                self.series.checks.add(self.series.images[following].name)  # handed out at random
            self.show(following)
        else:
            self._report()
            self.status.setText(f"All {len(self.series)} images are done. Masks are in {self.series.out_dir}.")
        return True

    def previous(self) -> None:
        """Back to the image shown before this one (the walk, in any order), saving this one's
        edits first; a mask from an earlier session is replaced only if the annotator says so."""
        if self.series is None:
            return
        names = [p.name for p in self.series.images]
        before = self.state.walked_before()
        if before in names:
            target = names.index(before)
        elif self._walk_unknown and self.index > 0:  # the way walked before is not known: back by name
            target = self.index - 1
        else:
            self.status.setText("This is the first image shown in this series.")
            return
        if self._leave():
            self.show(target, forward=False)

    def next_index(self) -> int | None:
        """The image Next goes to: the next of those chosen by kind, or the most uncertain one not
        done (where scores are in), else the next by name; None at the end of a name-ordered walk
        or when every image is done. (The one place the series orders its images.)"""
        s = self.series
        undone = [i for i in range(len(s)) if i != self.index and s.images[i].name not in s.done]
        order = self.state.order
        if order == "kinds":
            self.queue = [i for i in self.queue if i in undone] or self._kind_queue()
            if self.queue:
                return self.queue[0]
        if order == "uncertain" and any(i in self.scores for i in undone):
            done = [i not in undone for i in range(len(s))]
            return order_images("uncertain", done, scores=[self.scores.get(i) for i in range(len(s))]).rows[0]
        if order != "name":
            if undone:
                return next((i for i in undone if i > self.index), undone[0])
            return None
        return self.index + 1 if self.index + 1 < len(s) else None

    # ---------- the order of the images ----------
    def _order_changed(self) -> None:
        self.state.set_series_settings(order=self.order_combo.currentData())
        if self.series is not None:
            self._rescore_if_stale()
            self._report()

    def _forget_order(self) -> None:
        self._stop_scoring()
        self.scores, self.described, self.queue, self.drawn, self._scored_with = {}, {}, [], set(), None

    def _rescore_if_stale(self) -> None:
        """Describe every image (orders by kind) and score those not done (by uncertainty) under
        the current model and prompt, in a worker, when that was done for another model, prompt
        or order (a training finished, a new prompt was typed)."""
        state = self.state
        order = state.order
        if self.series is None or not state.prompts or order == "name":
            return
        key = (state.model, state.prompts[0], order)
        if key == self._scored_with:
            return
        self._forget_order()
        self._scored_with = key
        images = self.series.images
        todo = [p.name not in self.series.done for p in images]
        # the order by kind describes every image, done or not; uncertainty needs only those to do
        indices = list(range(len(images))) if order == "kinds" else [i for i in range(len(images)) if todo[i]]
        backend = state.loaded_backend(key[0])
        # bound methods, not lambdas: Qt drops the connections when the dock is deleted
        worker = thread_worker(self._scores_of, start_thread=False)(
            backend, key, [images[i] for i in indices], indices, [todo[i] for i in indices])
        worker.yielded.connect(self._scored)
        worker.returned.connect(self._scoring_ended)
        self.scoring = worker
        worker.start()

    @staticmethod
    def _scores_of(backend, key, paths, indices, todo):
        """Yields (key, image index, description or None, score or None) for each of ``paths``
        (the series' images ``indices``): described in the order by kind, scored where ``todo``."""
        from napari_vlsm.core.models.loading import load_model

        for k, description, score in score_files(backend or load_model(key[0]), paths, key[1], todo,
                                                 describe=key[2] == "kinds"):
            yield key, indices[k], description, score
        return key

    def _scored(self, item) -> None:
        key, index, description, score = item
        if key != self._scored_with:
            return
        if description is not None:
            self.described[index] = description
        if score is not None:
            self.scores[index] = score.value(DEFAULT_SCORE)
        if index == self.index or (len(self.scores) + len(self.described)) % 10 == 0:
            self._report()

    def _kind_queue(self) -> list[int]:
        """The next images by kind (core/inference/kinds.py), the least sure of each, once the
        worker is through: as many as are corrected between trainings (after which the new
        model looks again); one in four drawn at random instead, for the stop estimate."""
        if self.scoring is not None or not self.described:
            return []
        s = self.series
        rows = sorted(self.described)
        done = [s.images[i].name in s.done or i == self.index for i in rows]
        ordering = order_images("kinds", done, scores=[self.scores.get(i) for i in rows],
                                embeddings=np.stack([self.described[i] for i in rows]),
                                n=self.train_every.value() or KIND_BATCH, check_seed=s.n_done)
        self.drawn = {rows[k] for k in ordering.drawn}
        return [rows[k] for k in ordering.rows[:ordering.chosen]]

    def _scoring_ended(self, key) -> None:
        if key == self._scored_with:
            self.scoring = None
            if self.series is not None:
                if key[2] == "kinds":
                    self.queue = self._kind_queue()
                self._report()

    def _stop_scoring(self) -> None:
        if self.scoring is not None:
            self.scoring.quit()
            self.scoring = None

    def save(self, done: bool) -> bool:
        """Write the mask shown; ``done``: mark it done (Save, next), asking first where it
        would replace a different mask that this session did not write."""
        s, labels = self.series, np.asarray(self.labels_layer.data)
        if done and s.would_replace(self.index, labels) and not self._confirm(self._replace_question()):
            return False
        try:
            proposal = self.proposal[1] if self.proposal and self.proposal[0] == self.index else None
            s.save(self.index, labels, self._prompt_names(), done=done, proposal=proposal)
        except OSError as exc:
            show_error(f"Could not save the mask: {exc}")
            return False
        self.loaded = labels.copy()
        if done:
            self._after_done(labels)
        return True

    def _replace_question(self) -> str:
        return (f"{self.series.mask_path(self.index).name} was saved before and differs from what is shown. "
                "Replace it? (the previous version is kept in .previous/)")

    def edited(self) -> bool:
        """Whether the annotator changed the mask shown since it was shown, proposed or saved."""
        return (self.series is not None and LABELS_LAYER in self.viewer.layers and self.loaded is not None
                and not np.array_equal(self.labels_layer.data, self.loaded))

    def _leave(self) -> bool:
        """Before the image shown goes (Previous, another folder, closing): save its edits; a
        mask from an earlier session is replaced only if the annotator says so, as Save, next
        asks. False when the annotator said No (the image stays, edits and all)."""
        if not self.edited():
            return True
        if self.series.would_replace(self.index, self.labels_layer.data) and not self._confirm(
                self._replace_question()):
            return False
        return self.save(done=False)

    def _on_close(self) -> None:
        self._stop_scoring()
        self._leave()
        self.loaded = None  # asked once: the layers' removal that follows asks nothing more

    def autosave(self) -> None:
        """Save the annotator's edits of the image shown (not marking it done), if there are any;
        never over a mask of an earlier session (Save, next, Previous and closing ask first)."""
        if not self.edited():
            return
        if self.series.would_replace(self.index, self.labels_layer.data):
            self.status.setText(f"Your edits are not auto-saved over {self.series.mask_path(self.index).name}, "
                                "saved in an earlier session: Save, next asks before replacing it.")
            return
        self.save(done=False)

    def _before_removal(self, event) -> None:
        if self.viewer.layers[event.index].name == LABELS_LAYER:
            self._leave()
            self.loaded = None

    def _after_done(self, labels):
        if self.to_training.isChecked():
            self._store_pairs(labels)
        self.saved_since_training += 1
        every = self.state.train_every
        if every and self.saved_since_training >= every:
            if self.state.request_training():
                self.saved_since_training = 0
            elif FINETUNE not in self.state.docks:
                self.training_line.setText(f"Training every {every} images needs the Finetune dock: open it from "
                                           "Plugins > napari-vlsm > Finetune.")

    def _show_training(self, *_) -> None:
        """The series' training line, from the state (a quick edit's message leaves it alone)."""
        state = self.state
        if state.training and state.defer_activation:
            text = ("Training on the corrections in the background; the new model is used from the next image "
                    "after it finishes.")
        elif state.pending_model:
            text = f"A new model is ready: {state.pending_model}. It is used from the next image."
        elif state.last_trained and state.model == state.last_trained:
            text = f"Using the model trained on your corrections: {state.last_trained}."
        else:
            text = ""
        self.training_line.setText(text)

    def _store_pairs(self, labels) -> None:
        """One training pair per label: the label's mask for each label present, and an empty
        mask (a negative: "nothing here") for each prompt asked for but absent, so erasing a
        false positive teaches too. Into the training set the Finetune dock trains on."""
        names = self._prompt_names() or dict(enumerate(self.state.prompts, start=1))
        folder = self.state.training_folder
        stem = self.series.mask_path(self.index).stem  # unique where image stems collide (a.png, a.jpg)
        present = [int(v) for v in np.unique(labels[labels != 0])]
        values = sorted(set(present) | set(names))
        remove_label_examples(folder, stem, values)  # a label cleared on a second visit
        image = np.asarray(self.viewer.layers[IMAGE_LAYER].data)
        fallback = self.state.prompts[0] if self.state.prompts else "object"
        for value in values:  # in place of what an earlier visit stored
            write_benchmark_example(folder, f"{stem}-{value}", image, labels == value, names.get(value, fallback))
        self.state.examples_changed.emit()

    def _prompt_names(self) -> dict[int, str]:
        names = self.labels_layer.metadata.get(layer_keys.LABELS) or {}
        return {int(k): v for k, v in names.items()}

    def _report(self):
        s = self.series
        model = f" · model: {self.state.model}"
        text = f"{s.n_done} / {len(s)} done · image {self.index + 1}: {s.images[self.index].name}" + model
        if self.index in self.scores:
            text += f" · uncertainty {self.scores[self.index]:.2f}"
        if self.scoring is not None and len(self.described) < len(s) and self._scored_with[2] == "kinds":
            text += f" · grouping the images by kind ({len(self.described)} looked at so far)"
        elif self.scoring is not None:
            text += f" · scoring the rest ({len(self.scores)} so far)"
        elif self.state.order == "kinds" and self.queue:
            text += f" · {len(self.queue)} more chosen to cover the kinds of image"
            if self.drawn & set(self.queue):
                text += f", {len(self.drawn & set(self.queue))} of them at random"
        if s.images[self.index].name in s.checks:
            text += " · drawn at random, to check the model"
        estimate, drawn = s.estimate()
        read_on = drawn or len(s.agreements)
        if estimate is not None and read_on < MIN_FOR_ESTIMATE:  # one image's agreement says little
            text += (f"\nThe model's Dice on the images not done is estimated once {MIN_FOR_ESTIMATE} images "
                     f"{'drawn at random ' if drawn else ''}are corrected ({read_on} so far).")
        elif estimate is not None:
            on = (f"your corrections of the last {drawn} image{'s' * (drawn > 1)} drawn at random" if drawn else
                  "your last corrections")
            text += (f"\nEstimated Dice on the images not done: {estimate:.2f} (the model's proposals against {on})."
                     " When that is good enough, label the rest with napari-vlsm segment.")
            if not drawn and self.state.order != "name":
                text += " In this order it tends to read low: it hands you the images the model is least sure of."
        self.progress.setText(text)

    def _confirm(self, question: str) -> bool:
        self.timer.stop()  # no auto-save while the question is open
        try:
            return ask(self, question)
        finally:
            self.timer.start()

    # ---------- quick edits ----------
    def _edit(self, change) -> None:
        if LABELS_LAYER not in self.viewer.layers:
            return
        layer = self.labels_layer
        value = int(layer.selected_label)
        write_plane(layer, (), change(np.asarray(layer.data), value).astype(layer.data.dtype))  # one undo entry

    def _on_next_click(self, change) -> None:
        if LABELS_LAYER not in self.viewer.layers:
            return
        layer = self.labels_layer
        self.status.setText("Click on the piece in the image.")

        def once(layer_, event):
            layer.mouse_drag_callbacks.remove(once)
            row, col = (int(round(c)) for c in layer.world_to_data(event.position)[-2:])
            self.apply_at(change, (row, col))

        layer.mouse_drag_callbacks.append(once)

    def apply_at(self, change, point: tuple[int, int]) -> None:
        layer = self.labels_layer
        try:
            write_plane(layer, (), change(np.asarray(layer.data), point).astype(layer.data.dtype))
            self.status.setText("")
        except (ValueError, IndexError) as exc:
            self.status.setText(str(exc))
