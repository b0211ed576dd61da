"""Clicks, a box and the previous result as a model's extra input (interactive segmentation).

Encoded as RITM, SimpleClick and DeepEdit do: four maps at the model's input size, a disk
of radius ``CLICK_RADIUS`` per positive click, the same per negative click, the box filled,
and the previous result's probabilities. Coordinates are napari's data order for a 2D
image, (row, col), in the image's own pixels; they are scaled to the model's input here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

GUIDANCE_CHANNELS = 4  # positive clicks, negative clicks, box, previous probabilities
POSITIVE, NEGATIVE, BOX, PREVIOUS = range(GUIDANCE_CHANNELS)
CLICK_RADIUS = 5  # pixels of the model's input (RITM's disk radius)


class Click(NamedTuple):
    row: float
    col: float
    positive: bool = True


def check_clicks(clicks, box, shape: tuple[int, int]) -> tuple[list[Click], tuple | None]:
    """Clicks as ``Click`` and the box as (row0, col0, row1, col1), ordered, for an image of
    ``shape`` (H, W); a clear ValueError for one outside the image or a box of no area."""
    h, w = shape
    out = []
    for i, c in enumerate(clicks or ()):
        try:
            row, col, *rest = c
            row, col, positive = float(row), float(col), bool(rest[0]) if rest else True
        except (TypeError, ValueError):
            raise ValueError(f"Click {i + 1} is {c!r}; give each click as (row, col, positive), "
                             "for example (120, 80, True).") from None
        if not (math.isfinite(row) and math.isfinite(col)) or not (-0.5 <= row < h - 0.5 and -0.5 <= col < w - 0.5):
            raise ValueError(f"Click {i + 1} at (row {row:g}, col {col:g}) is outside the image, which is "
                             f"{h} x {w} pixels; click inside it.")
        out.append(Click(row, col, positive))
    if box is None:
        return out, None
    try:
        r0, c0, r1, c1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"The box is {box!r}; give it as (row0, col0, row1, col1).") from None
    r0, r1 = sorted((r0, r1))
    c0, c1 = sorted((c0, c1))
    r0, c0, r1, c1 = max(r0, 0.0), max(c0, 0.0), min(r1, float(h)), min(c1, float(w))
    if not all(map(math.isfinite, (r0, c0, r1, c1))) or r1 - r0 < 1 or c1 - c0 < 1:
        raise ValueError(f"The box {tuple(box)} has no area inside the {h} x {w} image; draw a rectangle "
                         "around the object.")
    return out, (r0, c0, r1, c1)


def _disk(out: np.ndarray, row: float, col: float, radius: float) -> None:
    h, w = out.shape
    r0, r1 = max(int(math.floor(row - radius)), 0), min(int(math.ceil(row + radius)) + 1, h)
    c0, c1 = max(int(math.floor(col - radius)), 0), min(int(math.ceil(col + radius)) + 1, w)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.ogrid[r0:r1, c0:c1]
    out[r0:r1, c0:c1][(yy - row) ** 2 + (xx - col) ** 2 <= radius ** 2] = 1.0


def draw_guidance(size: tuple[int, int], clicks=(), box=None, previous=None, scale=(1.0, 1.0),
                  radius: float = CLICK_RADIUS) -> np.ndarray:
    """(GUIDANCE_CHANNELS, h, w) float32 maps at ``size`` (h, w). ``clicks`` and ``box`` are
    in pixels that ``scale`` (rows, cols) turns into the maps' pixels (pixel centres kept);
    ``previous`` is already (h, w) probabilities, or None."""
    h, w = size
    maps = np.zeros((GUIDANCE_CHANNELS, h, w), np.float32)
    sy, sx = scale
    for c in clicks:
        _disk(maps[POSITIVE if c.positive else NEGATIVE], (c.row + 0.5) * sy - 0.5, (c.col + 0.5) * sx - 0.5, radius)
    if box is not None:
        r0, c0, r1, c1 = box
        maps[BOX, int(round(r0 * sy)):max(int(round(r1 * sy)), int(round(r0 * sy)) + 1),
             int(round(c0 * sx)):max(int(round(c1 * sx)), int(round(c0 * sx)) + 1)] = 1.0
    if previous is not None:
        maps[PREVIOUS] = previous
    return maps


def previous_at(previous, shape: tuple[int, int]) -> np.ndarray:
    """A previous result given at the image's size, as float32 probabilities in [0, 1]: a
    probability map as it is, a mask or label image as 0/1."""
    arr = np.asarray(previous)
    if arr.shape != tuple(shape):
        raise ValueError(f"The previous result is {arr.shape}; it must be at the image's size {tuple(shape)} "
                         "(probabilities or a mask of the object being refined).")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("The previous result holds NaN or infinite values; give probabilities in [0, 1].")
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    return (arr != 0).astype(np.float32)
