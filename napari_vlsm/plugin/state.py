"""What the plugin's three docks share in one viewer, without Qt (as micro-sam's
``AnnotatorState``): the active model and device, the loaded backend and its cache, the
prompts, the training job and a model waiting to be used, the image series' progress.

The docks bind to it: each writes what its own controls say and listens to the events for
what the others changed. No dock touches another dock's controls or methods; where one dock
needs work done by another (the series asks for a segmentation or a training run), it asks
here and the dock that does that work answers the request.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from psygnal import Signal

from .session import SegmentSession

SEGMENT, FINETUNE, SERIES = "Text-prompt segmentation", "Finetune", "Image series"  # napari.yaml's names
ORDERS = ("kinds", "uncertain", "name")  # how the series picks the next image


def default_training_folder() -> Path:
    return Path.home() / "napari-vlsm" / "training_set"


@dataclass
class SegmentRequest:
    """Segment the image layer ``image`` into the Labels layer ``labels`` (replacing what
    the model wrote there before, keeping the annotator's strokes); ``on_done(outcome)``
    is called once it was written or dropped."""

    image: str
    labels: str
    on_done: Callable[[SegmentOutcome], None] | None = None


@dataclass
class SegmentOutcome:
    request: SegmentRequest
    written: bool       # False: refused, failed, cancelled, or the layers changed meanwhile
    kept: int = 0       # pixels the annotator painted while it ran, kept in the result


class PluginState:
    """One per viewer: ``state_for(viewer)``."""

    model_changed = Signal(str)         # the model spec now in use
    models_changed = Signal()           # a model was added to those on offer
    device_changed = Signal(str)
    prompts_changed = Signal(list)
    segmenting_changed = Signal(bool)
    segment_wanted = Signal(object)     # a SegmentRequest, for the segmentation dock
    training_wanted = Signal()          # the series asks the Finetune dock for a run
    training_changed = Signal(bool)     # a run started (True) or ended (False)
    pending_changed = Signal(object)    # the model waiting for the next image, or None
    examples_changed = Signal()         # the training set's folder or contents changed
    docks_changed = Signal()
    series_changed = Signal()           # a series was opened, or its settings changed
    series_shown = Signal(str)          # the series shows its image of this file name

    def __init__(self):
        self.model = "default"
        self.models: list[str] = []      # models added in this session (finetuned runs, folders)
        self.previous_model: str | None = None  # what "Back to previous model" returns to
        self.device = "auto"
        self.prompts: list[str] = []
        self.session = SegmentSession()  # the loaded backend and its image-feature cache
        self.segmenting = False
        self._waiting: SegmentRequest | None = None  # asked before the segmentation dock opened
        self.targets: dict[str, str] = {}  # image layer -> the Labels layer it always segments into
        self.training_folder = default_training_folder()
        self.training = False            # a run is going on
        self.defer_activation = False    # the run going on was started by the series
        self.pending_model: str | None = None  # trained meanwhile, used from the next image
        self.last_trained: str | None = None
        self.docks: set[str] = set()
        self.series = None               # core.inference.series.Series being annotated
        self.train_every = 0             # the series trains after this many saved images (0: never)
        self.order = ORDERS[0]
        self.walk: list[str] = []        # the series' images in the order they were shown
        self.walk_pos = -1               # the image shown, as a position in ``walk``

    # ---------- model and device ----------
    def add_model(self, spec: str) -> None:
        spec = str(spec)
        if spec not in self.models:
            self.models.append(spec)
            self.models_changed.emit()

    def use_model(self, spec: str, remember_previous: bool = False) -> None:
        """Make ``spec`` the model every dock uses; ``remember_previous``: "Back to previous
        model" returns to the one in use until now."""
        spec = str(spec or "default")
        self.add_model(spec)
        if spec == self.model:
            return
        if remember_previous:
            self.previous_model = self.model
        self.model = spec
        self.model_changed.emit(spec)
        self._remember_series_settings()

    def back_to_previous_model(self) -> str | None:
        """Back to the model used before the last one came in; a model still waiting for
        the next image is dropped, so Back sticks. The model now in use, or None."""
        self.set_pending(None)
        previous, self.previous_model = self.previous_model, None
        if previous:
            self.use_model(previous)
        return previous

    def set_device(self, device: str) -> None:
        if device != self.device:
            self.device = device
            self.device_changed.emit(device)

    def loaded_backend(self, spec: str):
        """The backend of ``spec`` when it is the one loaded, else None."""
        return self.session.backend if self.session.spec == spec else None

    # ---------- prompts and segmentation ----------
    def set_prompts(self, prompts: list[str]) -> None:
        prompts = [p.strip() for p in prompts if p.strip()]
        if prompts != self.prompts:
            self.prompts = prompts
            self.prompts_changed.emit(list(prompts))
            self._remember_series_settings()

    def set_segmenting(self, running: bool) -> None:
        if running != self.segmenting:
            self.segmenting = running
            self.segmenting_changed.emit(running)

    def request_segment(self, request: SegmentRequest) -> bool:
        """Ask the segmentation dock for ``request``; False when none is open (the request
        waits for it, replacing any that waited before)."""
        if len(self.segment_wanted):
            self._waiting = None
            self.segment_wanted.emit(request)
            return True
        self._waiting = request
        return False

    def take_waiting_request(self) -> SegmentRequest | None:
        request, self._waiting = self._waiting, None
        return request

    def target_for(self, image: str) -> str | None:
        """The Labels layer the image layer ``image`` always segments into (the series'), or None."""
        return self.targets.get(image)

    # ---------- training ----------
    def set_training_folder(self, folder) -> None:
        folder = Path(folder).expanduser()
        if folder != self.training_folder:
            self.training_folder = folder
            self.examples_changed.emit()

    def request_training(self) -> bool:
        """The series asks for a run whose model comes in between images; False when no
        Finetune dock is open or a run is going on already."""
        if self.training or not len(self.training_wanted):
            return False
        self.activate_pending()  # between images: each training builds on the one before
        self.defer_activation = True
        self.training_wanted.emit()
        return True

    def training_started(self) -> None:
        self.training = True
        self.training_changed.emit(True)

    def training_ended(self, best: str | None) -> str:
        """A run ended with the checkpoint ``best`` (None: none written). Returns what became
        of it: "used", "pending" (used from the series' next image) or "none"."""
        deferred, self.defer_activation = self.defer_activation, False
        self.training = False
        outcome = "none"
        if best:
            self.last_trained = best
            if deferred:
                self.set_pending(best)
                outcome = "pending"
            else:
                self.use_model(best, remember_previous=True)
                outcome = "used"
        self.training_changed.emit(False)
        return outcome

    def set_pending(self, spec: str | None) -> None:
        if spec != self.pending_model:
            self.pending_model = spec
            self.pending_changed.emit(spec)

    def activate_pending(self) -> None:
        """Use a model that finished while an image was being annotated (between images)."""
        if self.pending_model:
            spec = self.pending_model
            self.set_pending(None)
            self.use_model(spec, remember_previous=True)

    # ---------- docks ----------
    def dock_opened(self, name: str) -> None:
        self.docks.add(name)
        self.docks_changed.emit()

    def dock_closed(self, name: str) -> None:
        self.docks.discard(name)
        self.docks_changed.emit()

    # ---------- the image series ----------
    def open_series(self, series) -> list[str]:
        """Take ``series`` (a core ``Series``) with the settings its folder kept: prompts, the
        training interval, the order, the walk and the model. Returns notes for the annotator
        (a model folder that is gone)."""
        self.series = series
        kept, notes = series.settings, []
        if isinstance(kept.get("train_every"), int):
            self.train_every = kept["train_every"]
        self.order = kept.get("order") if kept.get("order") in ORDERS else self.order
        names = {p.name for p in series.images}
        self.walk = [n for n in kept.get("walked", []) if n in names]
        self.walk_pos = len(self.walk) - 1
        if kept.get("prompts"):
            self.set_prompts(list(kept["prompts"]))
        model = kept.get("model")
        if model and (model == "default" or Path(model).expanduser().exists() or not _looks_like_a_path(model)):
            self.use_model(model)
        elif model:
            notes.append(f"The series was annotated with the model {model}, which is no longer there; "
                         f"using {self.model}.")
        self.series_changed.emit()
        self._remember_series_settings()
        return notes

    def set_series_settings(self, train_every: int | None = None, order: str | None = None) -> None:
        changed = False
        if train_every is not None and train_every != self.train_every:
            self.train_every, changed = int(train_every), True
        if order is not None and order != self.order:
            self.order, changed = order, True
        if changed:
            self.series_changed.emit()
            self._remember_series_settings()

    def walked_to(self, name: str, forward: bool = True) -> None:
        """The series shows ``name``: the next step of the walk (after the image shown, the
        rest of an earlier walk forward from there is replaced) or, going back, a step back."""
        if not forward:
            self.walk_pos = self.walk.index(name) if name in self.walk else self.walk_pos
        elif self.walk_pos + 1 < len(self.walk) and self.walk[self.walk_pos + 1] == name:
            self.walk_pos += 1
        elif not (0 <= self.walk_pos < len(self.walk) and self.walk[self.walk_pos] == name):
            del self.walk[self.walk_pos + 1:]
            self.walk = [n for n in self.walk if n != name] + [name]
            self.walk_pos = len(self.walk) - 1
        self._remember_series_settings()

    def walked_before(self) -> str | None:
        """The image shown before the current one on the walk, or None."""
        return self.walk[self.walk_pos - 1] if self.walk_pos > 0 else None

    def walked_after(self) -> str | None:
        """The image shown after the current one on the walk (after going back), or None."""
        return self.walk[self.walk_pos + 1] if 0 <= self.walk_pos < len(self.walk) - 1 else None

    def series_settings(self) -> dict:
        return {"prompts": list(self.prompts), "train_every": self.train_every, "order": self.order,
                "model": self.model, "walked": list(self.walk)}

    def _remember_series_settings(self) -> None:
        if self.series is not None:
            try:
                self.series.remember(self.series_settings())
            except OSError:  # a read-only folder: the masks' own save says so
                pass

    def close_series(self) -> None:
        if self.series is not None:
            self.series.close()
        self.series, self.walk, self.walk_pos = None, [], -1


def _looks_like_a_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or Path(spec).suffix != "" or spec.count("/") > 1


_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state_for(viewer) -> PluginState:
    """The plugin state of ``viewer``: one per viewer, the same whichever of napari's
    per-dock proxies of it is passed; it goes with the viewer."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    state = _states.get(viewer)
    if state is None:
        state = _states[viewer] = PluginState()
    return state
