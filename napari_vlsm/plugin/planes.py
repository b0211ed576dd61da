"""Which 2D plane of a napari layer to segment: the one on screen, or all of a stack."""

from __future__ import annotations

import hashlib
from itertools import product

import numpy as np


def check_single_scale(layer) -> None:
    """Refuse a multiscale (pyramid) layer: its array is the coarsest level, not the image."""
    if getattr(layer, "multiscale", False):
        raise ValueError(f"'{layer.name}' is a multiscale (pyramid) image, which is not supported. Open one "
                         "level as a plain image layer (for example viewer.add_image(layer.data[0]) for the "
                         "full resolution) and choose that.")


def spatial_shape(layer) -> tuple[int, ...]:
    """Data shape without the colour axis of an RGB(A) layer."""
    shape = tuple(layer.data.shape)
    return shape[:-1] if layer.rgb else shape


def leading_shape(layer) -> tuple[int, ...]:
    """Shape of the axes above the 2D plane (empty for a plain 2D image)."""
    return spatial_shape(layer)[:-2]


def current_index(layer, world_point) -> tuple[int, ...]:
    """Index of the plane shown at ``world_point`` (the viewer's dims point)."""
    lead = leading_shape(layer)
    if not lead:
        return ()
    data_point = layer.world_to_data(tuple(world_point)[-layer.ndim:])
    return tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(data_point[: len(lead)], lead))


def all_indices(layer) -> list[tuple[int, ...]]:
    return list(product(*(range(n) for n in leading_shape(layer))))


def plane(layer, index: tuple[int, ...]) -> np.ndarray:
    """The 2D image (H, W) or (H, W, C) at ``index``, as an in-memory array."""
    return np.asarray(layer.data[index] if index else layer.data)


def plane_key(layer, index, image: np.ndarray) -> tuple:
    """Identifies an image plane's content, so cached features are reused only for it."""
    return (id(layer), index, image.shape, hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest())
