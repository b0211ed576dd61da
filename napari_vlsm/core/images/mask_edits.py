"""Quick edits of one label in a 2D label image, beyond the brush: keep or remove the
connected piece under a click, fill holes, remove specks. Each returns a new array."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _piece_at(labels: np.ndarray, point: tuple[int, int]) -> tuple[np.ndarray, int]:
    value = int(labels[point])
    if value == 0:
        raise ValueError("There is no label under that point; click on the piece to keep or remove.")
    pieces, _ = ndimage.label(labels == value)
    return pieces == pieces[point], value


def keep_piece(labels: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """Keep only the connected piece under ``point`` of its label; other pieces of that label go."""
    piece, value = _piece_at(labels, point)
    out = labels.copy()
    out[(labels == value) & ~piece] = 0
    return out


def remove_piece(labels: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """Remove the connected piece under ``point``."""
    piece, _ = _piece_at(labels, point)
    out = labels.copy()
    out[piece] = 0
    return out


def fill_holes(labels: np.ndarray, value: int) -> np.ndarray:
    """Fill the holes inside ``value``'s pieces (only pixels that are 0 are changed)."""
    filled = ndimage.binary_fill_holes(labels == value)
    out = labels.copy()
    out[filled & (labels == 0)] = value
    return out


def remove_specks(labels: np.ndarray, value: int, min_pixels: int) -> np.ndarray:
    """Remove pieces of ``value`` smaller than ``min_pixels``."""
    pieces, n = ndimage.label(labels == value)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    small = sizes < min_pixels
    small[0] = False
    out = labels.copy()
    out[small[pieces]] = 0
    return out
