"""Model logits to probability maps at the image's own size, masks and label images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from napari_vlsm.core.images.threshold import DEFAULT_THRESHOLD, binarize


def logits_to_probs(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(P, h, w) logits -> (P, H, W) float32 probabilities, bilinearly resized to ``size``."""
    probs = torch.sigmoid(logits.float())
    if tuple(probs.shape[-2:]) != tuple(size):
        probs = F.interpolate(probs[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return probs.cpu().numpy()


def combine_labels(probs: np.ndarray, value: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """One label image from P probability maps: label i+1 where prompt i is the most likely
    of those at or above the threshold, 0 where none is. Worked in bands of rows, so a very
    large image needs no full-size index array (argmax gives int64)."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    labels = np.zeros(probs.shape[1:], np.uint8 if probs.shape[0] < 255 else np.uint16)
    if probs.shape[0] == 1:
        binarize(probs[0], value, out=labels)
        return labels
    band = max(1, 2**22 // max(1, probs.shape[-1]))  # rows per band: about 4M pixels
    for top in range(0, probs.shape[1], band):
        chunk = probs[:, top: top + band]
        best = chunk.argmax(axis=0) + 1
        best[~binarize(chunk.max(axis=0), value)] = 0
        labels[top: top + band] = best
    return labels
