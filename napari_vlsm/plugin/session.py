"""The loaded model, the cached image features and the last probabilities, without Qt: the
viewer's ``PluginState`` holds one, so every dock uses the backend loaded once. Its
``segment`` generator is what a thread_worker runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD
from napari_vlsm.core.inference.predictor import Predictor, clean_prompts
from .label_writing import LabelWrite, choose, reaches
from .planes import plane, plane_key


@dataclass
class PlaneProbabilities:
    """Probabilities per plane index for one run, and which prompt each pixel is at the
    threshold the run was asked with (worked out in the worker, not on the GUI thread)."""

    prompts: list[str]
    probs: dict = field(default_factory=dict)  # index -> (P, H, W)
    messages: list[str] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    choices: dict = field(default_factory=dict)  # index -> (H, W) prompt numbers, 0 for none


class SegmentSession:
    def __init__(self):
        self.spec: str | None = None
        self.device: str = "auto"
        self.predictor: Predictor | None = None
        self._key = None
        self.last: PlaneProbabilities | None = None
        self.last_write: LabelWrite | None = None
        # one worker at a time uses the predictor (a click answered while a run segments)
        self.lock = threading.RLock()

    @property
    def backend(self):
        return self.predictor.backend if self.predictor else None

    def ensure_model(self, spec: str, device: str = "auto"):
        """Load ``spec`` unless it is the model already loaded."""
        from napari_vlsm.core.models.loading import load_model

        if self.predictor is None or spec != self.spec or device != self.device:
            backend = load_model(spec, device=device)
            self.predictor, self.spec, self.device, self._key = Predictor(backend), spec, device, None
        return self.predictor.backend

    def segment(self, spec: str, device: str, layer, indices: list[tuple], prompts: list[str],
                threshold: float = DEFAULT_THRESHOLD):
        """Generator: yields (done, total) per plane; returns a PlaneProbabilities. Cancelling the worker
        stops it between planes."""
        prompts = clean_prompts(prompts)
        result = PlaneProbabilities(prompts, threshold=threshold)
        try:
            for n, index in enumerate(indices):
                with self.lock:
                    self.ensure_model(spec, device)
                    result.probs[index] = self._predict_plane(layer, index, prompts)
                yield n + 1, len(indices)
        except RuntimeError as exc:
            if not _is_cuda_oom(exc):
                raise
            result.messages.append("The GPU ran out of memory; running on the CPU instead (slower).")
            with self.lock:
                self.predictor, self._key = None, None
                self.ensure_model(spec, "cpu")
            for n, index in enumerate(i for i in indices if i not in result.probs):
                with self.lock:
                    result.probs[index] = self._predict_plane(layer, index, prompts)
                yield n + 1, len(indices)
        result.choices = {index: choose(probs, threshold) for index, probs in result.probs.items()}
        return result

    def refine(self, spec: str, device: str, layer, index: tuple, prompt: str, clicks, box, previous,
               threshold: float = DEFAULT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
        """One object of the plane ``index`` refined by ``clicks`` and ``box`` (the image's
        pixels) from ``previous`` (its probabilities or mask, or None), for the prompt (""
        for the thing clicked): its (H, W) probabilities and mask at ``threshold``. What a
        worker runs for each click; the image's features are reused from the last call."""
        with self.lock:
            self.ensure_model(spec, device)
            self._set_plane(layer, index)
            probs = self.predictor.predict(prompt, threshold, clicks=list(clicks) or None, box=box,
                                           previous=previous).probs[0]
        return probs, reaches(probs, threshold)

    def _set_plane(self, layer, index) -> None:
        image = plane(layer, index)
        key = plane_key(layer, index, image)
        if key != self._key or not self.predictor.has_image:
            self._key = None
            self.predictor.set_image(image)
            self._key = key

    def _predict_plane(self, layer, index, prompts) -> np.ndarray:
        self._set_plane(layer, index)
        return self.predictor.predict(prompts).probs


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)
