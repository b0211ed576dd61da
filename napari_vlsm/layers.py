"""napari layer logic without Qt: which 2D plane to segment, and writing results into
Labels layers without losing the annotator's work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import product

import numpy as np

MODES = ("new", "fill", "replace")
MODE_LABELS = {
    "new": "New Labels layer",
    "fill": "Existing layer: only where still 0",
    "replace": "Existing layer: replace (undo restores)",
}


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


@dataclass
class LabelWrite:
    """What the last write did, so a new threshold can be applied to it safely."""

    layer: object
    index: tuple
    mode: str                      # "replace" or "fill"
    values: list                   # label value of each prompt
    before: np.ndarray             # the plane before the write
    written: np.ndarray            # the plane as the write left it


def label_values(target, prompts: list[str], created: bool) -> list[int]:
    """The label value for each prompt: 1..P in a new layer; in an existing layer the value
    a prompt already has there, else values above every label in use, so the annotator's
    labels keep their meaning."""
    if created:
        return list(range(1, len(prompts) + 1))
    known = {name: int(v) for v, name in target.metadata.get("vlsm_labels", {}).items()}
    top = max([int(np.max(target.data, initial=0))] + list(known.values()))
    values = []
    for p in prompts:
        if p not in known:
            top += 1
            known[p] = top
        values.append(known[p])
    return values


def planned_plane(before: np.ndarray, labels: np.ndarray, mode: str) -> np.ndarray:
    """What the plane should become: ``labels``, or (fill) ``labels`` only where it was 0."""
    return np.where(before == 0, labels, before) if mode == "fill" else labels


def new_labels_layer(viewer, image_layer, name: str):
    """An empty Labels layer over ``image_layer``: same spatial shape, scale, translate, affine."""
    shape = spatial_shape(image_layer)
    dtype = np.uint8
    return viewer.add_labels(np.zeros(shape, dtype), name=name, scale=image_layer.scale,
                             translate=image_layer.translate, affine=image_layer.affine,
                             rotate=image_layer.rotate, shear=image_layer.shear)


def check_target(target, image_layer) -> None:
    if tuple(target.data.shape) != spatial_shape(image_layer):
        raise ValueError(f"Labels layer '{target.name}' has shape {tuple(target.data.shape)} but image "
                         f"'{image_layer.name}' has {spatial_shape(image_layer)}; choose a matching layer "
                         "or write into a new one.")


def write_plane(target, index: tuple, labels: np.ndarray, mode: str) -> np.ndarray:
    """Write a 2D label image into ``target`` at ``index``.

    new/replace: the plane becomes ``labels`` (through ``data_setitem``, so napari's undo
    brings the old content back); fill: only pixels that are still 0 take a label.
    Returns the plane as written.
    """
    current = np.asarray(target.data[index] if index else target.data)
    if labels.shape != current.shape:
        raise ValueError(f"Result shape {labels.shape} does not match the layer plane {current.shape}.")
    if mode == "fill":
        change = (current == 0) & (labels != 0)
    else:
        change = current != labels
    if change.any():
        rows, cols = np.nonzero(change)
        idx = tuple(np.full(rows.shape, i) for i in index) + (rows, cols)
        target.data_setitem(idx, labels[change].astype(target.data.dtype, copy=False))
    return np.asarray(target.data[index] if index else target.data).copy()


def set_label_names(target, names: dict[int, str]) -> None:
    """Keep prompt names in the layer's features (shown on hover) and metadata."""
    import pandas as pd

    known = dict(target.metadata.get("vlsm_labels", {}))
    known.update({int(k): v for k, v in names.items()})
    target.metadata["vlsm_labels"] = known
    if len(target.features) and "prompt" not in target.features.columns:
        return  # the annotator's own features table stays as it is
    values = [0] + sorted(known)
    target.features = pd.DataFrame({"index": values, "prompt": ["background"] + [known[v] for v in values[1:]]})


BRIGHT = ["cyan", "yellow", "lime", "magenta", "orange", "deepskyblue", "white", "springgreen"]


def use_bright_colours(layer, values: list[int]) -> None:
    """Colours that stand out on red-pink tissue (napari's label 1 is a dark red)."""
    from napari.utils.colormaps import DirectLabelColormap

    colours = {None: "white", 0: "transparent"}
    colours.update({v: BRIGHT[i % len(BRIGHT)] for i, v in enumerate(values)})
    layer.colormap = DirectLabelColormap(color_dict=colours)


def layer_name(image_layer, prompts: list[str]) -> str:
    text = ", ".join(prompts)
    return f"{image_layer.name} · {text[:40] + '…' if len(text) > 40 else text}"
