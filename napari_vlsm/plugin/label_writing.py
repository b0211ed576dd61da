"""Writing results into napari Labels layers without losing the annotator's work, in one
place: the label value of each prompt, thresholding to labels, what a plane should become
(new, only where still 0, or replace), the undoable write, names and colours, and applying
a new threshold to the last write. No Qt here; the widget calls these."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from napari_vlsm.core.images.postprocess import combine_labels
from .planes import plane, spatial_shape

MODES = ("new", "fill", "replace")
MODE_LABELS = {
    "new": "New Labels layer",
    "fill": "Existing layer: only where still 0",
    "replace": "Existing layer: replace (undo restores)",
}


@dataclass
class LabelWrite:
    """What the last write did, so a new threshold can be applied to it safely."""

    layer: object
    index: tuple
    mode: str                      # "replace" or "fill"
    values: list                   # label value of each prompt
    before: np.ndarray             # the plane before the write
    dtype: np.dtype                # the layer's
    written: bytes                 # digest of the plane as the write left it
    keep: np.ndarray | None = None  # the annotator's pixels the write left as they were
    thresholds: dict = field(default_factory=dict)  # digest of each plane it wrote -> its threshold


def digest(array: np.ndarray) -> bytes:
    """A plane's fingerprint, to tell an undo back to an earlier threshold from an edit (SHA-1:
    the fastest exact hash in hashlib here, and nothing adversarial is at stake)."""
    return hashlib.sha1(np.ascontiguousarray(array).data, usedforsecurity=False).digest()


def label_values(target, prompts: list[str]) -> list[int]:
    """The label value for each prompt in an existing layer: the value a prompt already has
    there, else values above every label in use, so the annotator's labels keep their meaning
    (a new layer's values are 1..P)."""
    known = {name: int(v) for v, name in target.metadata.get("vlsm_labels", {}).items()}
    top = max([int(np.max(target.data, initial=0))] + list(known.values()))
    values = []
    for p in prompts:
        if p not in known:
            top += 1
            known[p] = top
        values.append(known[p])
    return values


def widen_for(target, value: int) -> None:
    """Give ``target`` an integer type that holds ``value`` (an 8-bit layer whose labels go up
    to 255 cannot take a new label 256); its labels stay as they are."""
    dtype = np.dtype(target.data.dtype)
    if np.issubdtype(dtype, np.integer) and value > np.iinfo(dtype).max:
        target.data = np.asarray(target.data).astype(np.uint16 if value <= np.iinfo(np.uint16).max else np.uint32)


def planned_plane(before: np.ndarray, labels: np.ndarray, mode: str, keep: np.ndarray | None = None) -> np.ndarray:
    """What the plane should become: ``labels``, or (fill) ``labels`` only where it was 0;
    either way the pixels in ``keep`` (the annotator's own) stay as they are."""
    planned = np.where(before == 0, labels, before) if mode == "fill" else labels
    return planned if keep is None or not keep.any() else np.where(keep, before, planned)


def forget_history(layer) -> None:
    """Start the layer's undo history afresh: after its data was swapped for another image's,
    undo must not bring back pixels of the image before. napari clears the history when a
    layer stops being editable (it has no public call for it alone); the tool is kept."""
    mode = layer.mode
    layer.editable = False
    layer.editable = True
    layer.mode = mode


def layer_key(layer):
    """A layer's identity that survives napari's plugin proxies (a new wrapper on each access)."""
    return getattr(layer, "unique_id", None) or id(layer)


class EditTracker:
    """Which pixels the annotator painted, erased or filled in each watched Labels layer since
    the plugin last wrote a result there (napari's ``paint`` event carries each undo step's
    indices), so "only where still 0" never refills what was erased on purpose."""

    def __init__(self):
        self._touched: dict[int, np.ndarray] = {}
        self._watched: set[int] = set()

    def watch(self, layer) -> None:
        if layer_key(layer) in self._watched:
            return
        self._watched.add(layer_key(layer))
        layer.events.paint.connect(lambda event: self._record(layer, event.value))
        layer.events.data.connect(lambda event: self._touched.pop(layer_key(layer), None))  # another image

    def _record(self, layer, atoms) -> None:
        touched = self._touched.get(layer_key(layer))
        if touched is None or touched.shape != layer.data.shape:
            touched = self._touched[layer_key(layer)] = np.zeros(layer.data.shape, bool)
        for atom in atoms:
            if not hasattr(atom, "slice_key"):
                touched[tuple(atom[0])] = True  # data_setitem: (indices, old values, new values)
            elif atom.mask is None:
                touched[atom.slice_key] = True  # the brush, fill or polygon: a box and its mask
            else:
                touched[atom.slice_key] |= atom.mask

    def touched(self, layer, index: tuple):
        """The plane's pixels touched since the last result, or None when there are none."""
        touched = self._touched.get(layer_key(layer))
        if touched is None:
            return None
        return touched[index] if index else touched

    def forget(self, layer, index: tuple) -> None:
        touched = self._touched.get(layer_key(layer))
        if touched is not None:
            if index:
                touched[index] = False
            else:
                del self._touched[layer_key(layer)]


def new_labels_layer(viewer, image_layer, name: str, data: np.ndarray | None = None):
    """A Labels layer over ``image_layer`` (same spatial shape, scale, translate, affine),
    empty or holding ``data``."""
    data = np.zeros(spatial_shape(image_layer), np.uint8) if data is None else data
    return viewer.add_labels(data, name=name, scale=image_layer.scale,
                             translate=image_layer.translate, affine=image_layer.affine,
                             rotate=image_layer.rotate, shear=image_layer.shear)


def check_target(target, image_layer) -> None:
    if tuple(target.data.shape) != spatial_shape(image_layer):
        raise ValueError(f"Labels layer '{target.name}' has shape {tuple(target.data.shape)} but image "
                         f"'{image_layer.name}' has {spatial_shape(image_layer)}; choose a matching layer "
                         "or write into a new one.")


def write_plane(target, index: tuple, labels: np.ndarray) -> None:
    """Make the plane of ``target`` at ``index`` equal ``labels``, through ``data_setitem``
    (one undo entry that brings the old content back)."""
    current = plane(target, index)
    if labels.shape != current.shape:
        raise ValueError(f"Result shape {labels.shape} does not match the layer plane {current.shape}.")
    change = current != labels
    if change.any():
        rows, cols = np.nonzero(change)
        idx = tuple(np.full(rows.shape, i) for i in index) + (rows, cols)
        target.data_setitem(idx, labels[change].astype(target.data.dtype, copy=False))


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


def choose(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(P, H, W) probabilities -> which prompt each pixel is (1..P, 0 for none): the slow part
    of a write, done off the GUI thread; the label values are applied when it lands. A pixel
    at the threshold counts, as in the predictor (``combine_labels``)."""
    return combine_labels(probs, threshold)


def reaches(probs, threshold: float):
    """Where probabilities reach ``threshold``: the plugin's one comparison with it outside
    ``choose`` (>=, as the predictor's)."""
    return np.asarray(probs) >= threshold


def to_labels(choice: np.ndarray, values: list[int], dtype) -> np.ndarray:
    """A plane of prompt numbers (0..P) -> the label value of each prompt, 0 where none is."""
    if list(values) == list(range(1, len(values) + 1)):
        return choice.astype(dtype, copy=False)  # a new layer's values are the prompt numbers
    return np.array([0] + list(values), dtype=dtype)[choice]


def write_result(viewer, image_layer, target, choices: dict, prompts: list[str], threshold: float,
                 mode: str, keep: dict | None = None):
    """Write one run's result (``choices[index]``: ``choose`` at ``threshold``): into a new
    Labels layer (``target`` None) or into ``target`` by ``mode`` ("fill" or "replace"),
    leaving the pixels ``keep[index]`` (the annotator's strokes) as they are. Returns (layer,
    LabelWrite of a single plane for re-thresholding, or None)."""
    created = target is None
    write_mode = "fill" if mode == "fill" else "replace"
    if created:  # filled before napari sees it: no undo entry (and its index arrays) for a new layer
        values = list(range(1, len(prompts) + 1))
        data = np.zeros(spatial_shape(image_layer), np.uint8 if len(prompts) < 255 else np.uint16)
        for index, choice in choices.items():
            data[index] = to_labels(choice, values, data.dtype)
        target = new_labels_layer(viewer, image_layer, layer_name(image_layer, prompts), data)
        before, kept = np.zeros(data.shape[-2:], data.dtype), None  # untouched zeros take no memory
    else:
        values = label_values(target, prompts)
        widen_for(target, max(values))
        for index, choice in choices.items():
            before = plane(target, index).copy()
            kept = (keep or {}).get(index)
            write_plane(target, index, planned_plane(before, to_labels(choice, values, target.data.dtype),
                                                     write_mode, kept))
    set_label_names(target, dict(zip(values, prompts)))
    if created:
        use_bright_colours(target, values)
    if len(choices) != 1:
        return target, None
    written = digest(plane(target, index))
    return target, LabelWrite(target, index, write_mode, values, before, target.data.dtype, written, kept,
                              {written: threshold})


def pixels_to_keep(target, snapshots: dict, edits: EditTracker, mode: str) -> tuple[dict, int]:
    """What a result must leave alone in each plane of ``target``: the pixels that differ from
    ``snapshots[index]`` (the plane when the run was asked for: strokes made while it ran)
    and, in fill mode, every pixel touched since the last result (erased is not empty).
    Returns ({index: mask}, how many pixels were edited while it ran)."""
    keep, edited = {}, 0
    for index, snap in snapshots.items():
        keep[index] = plane(target, index) != snap
        edited += int(keep[index].sum())
        touched = edits.touched(target, index) if mode == "fill" else None
        if touched is not None:
            keep[index] |= touched
    return keep, edited


def plan_threshold(write: LabelWrite, probs: np.ndarray, threshold: float) -> tuple[np.ndarray, bytes]:
    """The plane the last write would leave at ``threshold``, and its digest. Reads only what
    the write fixed (the plane before, the kept pixels), so it runs off the GUI thread."""
    labels = to_labels(choose(probs, threshold), write.values, write.dtype)
    planned = planned_plane(write.before, labels, write.mode, write.keep)
    return planned, digest(planned)


def rethreshold(write: LabelWrite, planned: tuple[np.ndarray, bytes], threshold: float) -> bool:
    """Write ``planned`` (from ``plan_threshold``) over the last write; False (nothing changed)
    when the plane was edited since, so an annotator's correction is never overwritten. An
    undo back to what an earlier threshold wrote is not an edit."""
    current = digest(plane(write.layer, write.index))
    if current != write.written and current not in write.thresholds:  # an edit, not an undo to an earlier threshold
        return False
    write_plane(write.layer, write.index, planned[0])
    write.written = planned[1]
    write.thresholds[planned[1]] = threshold
    return True


def threshold_shown(write: LabelWrite) -> float | None:
    """The threshold whose result the plane holds now (after an undo, an earlier one), or
    None when it holds an edit."""
    return write.thresholds.get(digest(plane(write.layer, write.index)))
