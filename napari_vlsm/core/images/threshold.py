"""The threshold: its default and the one comparison with it (numpy only, light to import)."""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5  # for a model whose folder names no threshold of its own (``default_threshold``)


def binarize(probs, threshold: float = DEFAULT_THRESHOLD, out=None):
    """Where a pixel is the prompt's: its probability is at or above ``threshold`` (``>=``).
    The one comparison with the threshold, for the predictor's masks, the slider's new
    threshold, the uncertainty scores and everything else. ``out``: an array (uint8 labels) to
    write the 0/1 answer into instead of a new boolean array."""
    if out is None:
        return np.greater_equal(probs, threshold)
    return np.greater_equal(probs, threshold, out=out, casting="unsafe")


def check_threshold(threshold) -> None:
    try:
        ok = 0.0 <= float(threshold) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"The threshold is {threshold!r}; it must be a probability between 0 and 1, such as {DEFAULT_THRESHOLD}.")
