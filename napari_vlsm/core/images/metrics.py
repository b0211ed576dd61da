"""Dice and IoU for binary masks.

Conventions: masks are compared as booleans (non-zero is foreground). When prediction and
truth are both empty the score is 1 (nothing to find, nothing found); when exactly one is
empty it is 0. Means are plain averages of per-image scores.
"""

from __future__ import annotations

import numpy as np


def _counts(pred, truth) -> tuple[int, int, int]:
    p, t = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"Prediction shape {p.shape} differs from ground-truth shape {t.shape}.")
    return int(np.logical_and(p, t).sum()), int(p.sum()), int(t.sum())


def dice(pred, truth) -> float:
    inter, sp, st = _counts(pred, truth)
    return 1.0 if sp + st == 0 else 2.0 * inter / (sp + st)


def iou(pred, truth) -> float:
    inter, sp, st = _counts(pred, truth)
    union = sp + st - inter
    return 1.0 if union == 0 else inter / union


def mean_scores(pairs) -> dict[str, float]:
    """Mean Dice and IoU over an iterable of (prediction, truth) pairs."""
    d, j = [], []
    for pred, truth in pairs:
        d.append(dice(pred, truth))
        j.append(iou(pred, truth))
    if not d:
        return {"dice": float("nan"), "iou": float("nan"), "n": 0}
    return {"dice": float(np.mean(d)), "iou": float(np.mean(j)), "n": len(d)}
