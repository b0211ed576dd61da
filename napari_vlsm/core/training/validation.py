"""Validation of a training run: Dice per data set at the model's input size, and how often
another concept's prompt draws a mask where it should find nothing."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from napari_vlsm.core.data.concepts import absent_concepts
from napari_vlsm.core.data.training_sets import Example, PairCache
from napari_vlsm.core.inference.predictor import decode_views, encode_views
from napari_vlsm.core.models.backend import TorchBackend


@dataclass
class Validation:
    dice: float                        # mean over the data sets of each set's mean Dice
    by_set: dict                       # data set (folder name) -> mean Dice
    cross_prompt_rate: float | None    # share of images where another concept's p1 gives a mask over 1%


@torch.no_grad()
def validate(backend: TorchBackend, cache: PairCache, examples, prompt_type: str, batch_size: int = 8,
             concepts: dict | None = None) -> Validation:
    """Dice at the model's input size, threshold 0.5, one fixed prompt per image, per data set,
    from the image and its mirror when the model is set to answer so (``flip_average``).
    Images without the object are asked for their set's class (``concepts``: group -> concept,
    from the training set), and each image is also asked for
    another concept, which should find nothing there."""
    from napari_vlsm.core.images.metrics import dice

    backend.module.eval()
    rng = random.Random(0)
    scores, crossed = defaultdict(list), []
    finite = True  # logits that are NaN or infinite give a NaN Dice, not the 0 their empty masks would score
    for start in range(0, len(cache), batch_size):
        idx = list(range(start, min(start + batch_size, len(cache))))
        images = [cache[i][0] for i in idx]
        prompts = [val_prompt(examples[i], cache[i][1].any(), prompt_type, concepts, rng) for i in idx]
        cross = []
        for j, i in enumerate(idx):
            others = absent_concepts(concepts, examples[i].kind) if examples[i].kind in (concepts or {}) else []
            if others:
                cross.append((j, others[i % len(others)]))
        views = encode_views(backend, backend.preprocess(images), backend.flip_average)  # as the predictor
        text = backend.encode_text(prompts + [c for _, c in cross])
        if cross:
            views = [[torch.cat([f, f[[j for j, _ in cross]]]) for f in feats] for feats in views]
        logits = decode_views(backend, views, text).float()
        finite = finite and bool(torch.isfinite(logits).all())
        for j, i in enumerate(idx):
            truth = cache[i][1]
            pred = at_size(logits[j], truth.shape)
            scores[examples[i].kind].append(dice(pred > 0, truth))
        for k, (j, _) in enumerate(cross):
            crossed.append(float((at_size(logits[len(idx) + k], cache[idx[j]][1].shape) > 0).mean() > 0.01))
    by_set = {g: float(np.mean(v)) if finite else float("nan") for g, v in sorted(scores.items())}
    return Validation(float(np.mean(list(by_set.values()))) if by_set else float("nan"), by_set,
                      float(np.mean(crossed)) if crossed else None)


def val_prompt(ex: Example, has_object: bool, prompt_type: str, concepts: dict | None, rng) -> str:
    """An image without the object is asked for its set's class, as a person would ask it
    ("No tumor in the breast ultrasound image." is its own p1); the others, their own prompt."""
    concept = (concepts or {}).get(ex.kind)
    return concept if concept and not has_object else ex.prompt((prompt_type,), rng)


def at_size(logits: torch.Tensor, shape) -> np.ndarray:
    if tuple(logits.shape) != tuple(shape):
        logits = F.interpolate(logits[None, None], size=tuple(shape), mode="bilinear")[0, 0]
    return logits.cpu().numpy()
