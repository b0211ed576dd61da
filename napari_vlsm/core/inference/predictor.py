"""A Segment-Anything-style predictor: encode an image once, prompt it many times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from napari_vlsm.core.models.backend import Backend
from napari_vlsm.core.errors import VLSMError
from napari_vlsm.core.images.guidance import check_clicks, draw_guidance, previous_at
from napari_vlsm.core.images.postprocess import combine_labels, logits_to_probs
from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD, binarize, check_threshold
from napari_vlsm.core.images.preprocess import shrink_for_model, to_rgb8, validate_image

TEXT_CACHE_SIZE = 1024


@dataclass
class Prediction:
    """Per-prompt probabilities (P, H, W) at the image's size, and their masks."""

    prompts: list[str]
    probs: np.ndarray
    threshold: float

    def __post_init__(self):  # predict_batch's too, and any other maker of a Prediction
        check_threshold(self.threshold)
        self.threshold = float(self.threshold)

    @property
    def masks(self) -> np.ndarray:
        return binarize(self.probs, self.threshold)

    @property
    def labels(self) -> np.ndarray:
        """One label image: value i+1 for prompt i (the most likely where they overlap)."""
        return combine_labels(self.probs, self.threshold)


def clean_prompts(prompts: str | list[str]) -> list[str]:
    """Strip prompts and refuse empty ones with a clear message."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"Prompts must be a string or a list of strings, not {type(prompts).__name__}; "
                         "for example 'polyp' or ['polyp', 'instrument'].")
    cleaned = [str(p).strip() for p in prompts]
    broken = [p for p in cleaned if not _is_text(p)]
    if broken:  # bytes that were not UTF-8, kept by Python as lone surrogates: no tokenizer reads them
        raise ValueError(f"The prompt {broken[0].encode('utf-8', 'backslashreplace').decode()!r} holds bytes that are "
                         "not text (not UTF-8); type it again in plain text.")
    if not cleaned or any(not p for p in cleaned):
        raise ValueError("The prompt is empty; type what to segment, for example 'polyp'.")
    return cleaned


def _is_text(prompt: str) -> bool:
    try:
        prompt.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise VLSMError("The model produced NaN or infinite values, so its masks would be meaningless. Its weights "
                        "are broken (a diverged training?): load another checkpoint, such as the run's best/.")


class Predictor:
    """``set_image`` runs the image encoder once; ``predict`` runs only text + decoder.

    Text embeddings are cached per prompt string too, so switching back and forth
    between prompts on a new image costs one decoder pass each.

    Arguments: ``backend`` (from ``loading.load_model``); ``flip_average`` (None: the
    backend's own setting, from its model's config): also encode the left-right mirror of the
    image and average the two views' logits, at twice the cost (docs/offline_model.md measures
    what it gains). Shapes: an image is (H, W) or (H, W, C), C in 1-4; ``predict`` returns
    (P, H, W) probabilities for P prompts.
    """

    def __init__(self, backend: Backend, flip_average: bool | None = None):
        if not all(hasattr(backend, name) for name in ("encode_image", "encode_text", "decode")):
            raise TypeError(f"Predictor needs a model backend, such as load_model('default'), not {backend!r}.")
        self.backend = backend
        self.flip_average = getattr(backend, "flip_average", False) if flip_average is None else bool(flip_average)
        self._features = None
        self._size: tuple[int, int] | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def has_image(self) -> bool:
        return self._features is not None

    @torch.inference_mode()
    def set_image(self, image) -> None:
        """Encode ``image``: (H, W) or (H, W, C) with C in 1-4, any integer or float dtype
        (see ``preprocess``). Masks come back at (H, W). If this fails, no image is set."""
        self.reset_image()
        rgb = self._model_rgb(image)
        self._features = self._encode([rgb])
        self._size = np.shape(image)[:2]

    def _model_rgb(self, image) -> np.ndarray:
        arr = validate_image(image)
        return to_rgb8(shrink_for_model(arr, max(self.backend.input_size)))

    def reset_image(self) -> None:
        self._features, self._size = None, None

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str]):
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if len(self._text_cache) + len(missing) > TEXT_CACHE_SIZE:
            self._text_cache.clear()
            missing = list(dict.fromkeys(prompts))
        if missing:
            for p, emb in zip(missing, self.backend.encode_text(missing)):
                self._text_cache[p] = emb
        return torch.stack([torch.as_tensor(self._text_cache[p]) for p in prompts])

    @property
    def takes_clicks(self) -> bool:
        return self.backend.takes_clicks

    @torch.inference_mode()
    def predict(self, prompts: str | list[str], threshold: float = DEFAULT_THRESHOLD, clicks=None, box=None,
                previous=None) -> Prediction:
        """Probabilities (P, H, W) at the image's size for P prompts, from the cached image
        features: runs only the text encoder (for prompts not seen before) and the decoder.
        ``threshold`` makes the Prediction's masks and labels; the probabilities do not
        depend on it.

        Refining one object (a model that ``takes_clicks``), as Segment Anything's predictor
        does: ``clicks``, (row, col, positive) in the image's pixels (positive adds what is
        under the click, negative removes it); ``box``, (row0, col0, row1, col1) around the
        object; ``previous``, the result being refined, (H, W) probabilities or a mask. Then
        there is one prompt, and it may be "" (the thing clicked, whatever it is). Only the
        image encoder's later levels run again, not its first (cached) ones."""
        if self._features is None:
            raise RuntimeError("No image is set; call set_image(image) first.")
        check_threshold(threshold)
        if clicks is None and box is None:
            if previous is not None:
                raise ValueError("A previous result is refined with clicks or a box; give at least one of them.")
            prompts = clean_prompts(prompts)
            logits = self._decode(self._features, self.text_embeddings(prompts))
        else:
            prompts = [self._one_prompt(prompts)]
            guidance = self._guidance(clicks, box, previous)
            views = [self.backend.encode_guided(view, g[None]) for view, g in zip(self._features, guidance)]
            logits = self._decode(views, self.text_embeddings(prompts))
        check_finite(logits)
        probs = logits_to_probs(logits, self._size)
        return Prediction(prompts, probs, threshold)

    def _one_prompt(self, prompts) -> str:
        if not self.backend.takes_clicks:
            raise VLSMError(f"The model {self.backend.source or self.backend.name} takes text prompts only, not "
                            "clicks or a box; the embedded default model ('default') takes both.")
        if isinstance(prompts, (list, tuple)):
            if len(prompts) != 1:
                raise ValueError(f"Clicks and a box refine one object, but {len(prompts)} prompts were given; "
                                 "give one prompt, or \"\" for the thing clicked.")
            prompts = prompts[0]
        if not isinstance(prompts, str):
            raise ValueError(f"The prompt must be a string, not {type(prompts).__name__}.")
        return prompts.strip()

    def _guidance(self, clicks, box, previous) -> list[torch.Tensor]:
        """The guidance maps at the model's input, one per view (the mirror's mirrored)."""
        clicks, box = check_clicks(clicks, box, self._size)
        h, w = self.backend.input_size
        prev = None
        if previous is not None:
            prev = previous_at(previous, self._size)
            prev = torch.from_numpy(prev)[None, None]
            prev = torch.nn.functional.interpolate(prev, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            prev = prev.numpy()
        maps = torch.from_numpy(draw_guidance((h, w), clicks, box, prev, (h / self._size[0], w / self._size[1])))
        return [maps, maps.flip(-1)][:len(self._features)]

    @torch.inference_mode()
    def predict_batch(self, images: list, prompts: str | list[str],
                      threshold: float = DEFAULT_THRESHOLD) -> list[Prediction]:
        """Several images (each as for ``set_image``) at once, every prompt on each: one
        encoder pass for the batch; the cached image is left as it was."""
        prompts = clean_prompts(prompts)
        rgbs = [self._model_rgb(im) for im in images]
        views = self._encode(rgbs)
        text = self.text_embeddings(prompts)
        out = []
        for i, image in enumerate(images):
            logits = self._decode([self.backend.select(feats, i) for feats in views], text)
            check_finite(logits)
            out.append(Prediction(prompts, logits_to_probs(logits, np.shape(image)[:2]),
                                  threshold))
        return out

    @torch.inference_mode()
    def embed(self, images: list) -> np.ndarray:
        """(N, d) descriptions of images (each as for ``set_image``) by the model's image
        encoder, for grouping images by kind (``core/inference/kinds.py``)."""
        rgbs = [self._model_rgb(im) for im in images]
        return pooled_features(self.backend.encode_image(self.backend.preprocess(rgbs)))

    def _encode(self, rgbs: list[np.ndarray]) -> list:
        return encode_views(self.backend, self.backend.preprocess(rgbs), self.flip_average)

    def _decode(self, views: list, text) -> torch.Tensor:
        return decode_views(self.backend, views, text)


def pooled_features(features) -> np.ndarray:
    """(N, d) image descriptions from a backend's ``encode_image`` output: each level averaged
    over its positions ((N, C, H, W) maps and (N, tokens, C) activations alike), scaled to unit
    length so that every level counts the same, then joined."""
    parts = []
    for f in features:
        f = np.asarray(f.detach().float().cpu() if hasattr(f, "detach") else f, dtype=np.float32)
        v = f.mean(axis=(2, 3)) if f.ndim == 4 else f.mean(axis=1) if f.ndim == 3 else f.reshape(len(f), -1)
        parts.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
    return np.concatenate(parts, axis=1)


def encode_views(backend: Backend, pixels, flip_average: bool) -> list:
    """The image features of each view: the images, and their mirrors with ``flip_average``."""
    views = [backend.encode_image(pixels)]
    if flip_average:
        views.append(backend.encode_image(_mirror(pixels)))
    return views


def decode_views(backend: Backend, views: list, text) -> torch.Tensor:
    """The logits averaged over the views of ``encode_views``, a mirrored view's mirrored back."""
    logits = backend.decode(views[0], text)
    for feats in views[1:]:
        logits = logits + backend.decode(feats, text).flip(-1)
    return logits / len(views)


def _mirror(pixels):
    """Left-right mirror of a batch (N, C, h, w): a torch tensor, or numpy for ONNX models."""
    if isinstance(pixels, torch.Tensor):
        return pixels.flip(-1)
    return np.ascontiguousarray(pixels[..., ::-1])
