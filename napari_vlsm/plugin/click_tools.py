"""Clicks and a box as prompts in napari (issue 42): a Points layer of clicks whose points
carry a boolean feature ``positive``, and a rectangle in a Shapes layer as the box. What a
dock needs of them, without the dock: finding or making the two layers, the sign of the
next click, the clicks and the box of the plane shown in the image's own pixels (as
``Predictor.predict`` takes them), what a refined object makes of a Labels plane, keeping
and restoring an image's clicks, and calling back when the annotator adds, moves or deletes
a click or the box.

Shortcuts and colours follow micro-sam's annotators where they fit: positive clicks green,
negative red, T toggles the sign of the next click, Shift+C clears the prompts; napari's
own keys stay (2 or P: add points, Delete: remove the selected ones, R: draw a rectangle).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np

from .label_writing import layer_key
from .planes import leading_shape, spatial_shape

CLICKS_LAYER, BOX_LAYER = "clicks", "box"
POSITIVE_COLOUR, NEGATIVE_COLOUR = "limegreen", "red"  # micro-sam's green and red
BOX_COLOUR = "yellow"
TOGGLE_KEY, CLEAR_KEY = "T", "Shift-C"
SHORTCUTS = ("T: the next click positive or negative · Shift+C: clear the clicks and the box · "
             "napari's own: 2 adds points, 3 selects and moves them, Delete removes the selected, "
             "R draws a rectangle")


def model_takes_clicks(spec: str) -> bool | None:
    """Whether the model ``spec`` reads clicks and a box, from its folder's config.json (its
    family takes them and its config has guidance maps), without loading it; None when it is
    not a folder here (a hub id: known once loaded). ONNX exports take text only."""
    from napari_vlsm.core.file_names import CONFIG, ENCODER_ONNX
    from napari_vlsm.core.models.families import family_of
    from napari_vlsm.core.models.loading import local_folder

    folder = local_folder(spec)
    if folder is None:
        return None
    if (folder / ENCODER_ONNX).exists():
        return False
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    family = family_of(config.get("model_type"))
    return bool(family is not None and family.clicks and config.get("guidance"))


def _tools_of(viewer, name: str, kind):
    layer = viewer.layers[name] if name in viewer.layers else None
    return layer if isinstance(layer, kind) else None


def _same_geometry(image_layer) -> dict:
    return dict(scale=image_layer.scale, translate=image_layer.translate, affine=image_layer.affine,
                rotate=image_layer.rotate, shear=image_layer.shear)


def point_size(image_layer) -> float:
    """Clicks big enough to see and small enough to aim: about 1/50 of the image's side."""
    return float(max(8, round(max(spatial_shape(image_layer)[-2:]) / 50)))


def make_clicks_layer(viewer, image_layer):
    """The Points layer of clicks over ``image_layer``: feature ``positive`` (its
    ``feature_defaults`` is the sign of the next click), drawn green or red by it."""
    import pandas as pd

    ndim = len(spatial_shape(image_layer))
    return viewer.add_points(
        np.empty((0, ndim)), ndim=ndim, name=CLICKS_LAYER,
        features=pd.DataFrame({"positive": np.array([], bool)}), feature_defaults={"positive": True},
        face_color="positive", face_color_cycle={True: POSITIVE_COLOUR, False: NEGATIVE_COLOUR},
        border_color="white", border_width=0.1, size=point_size(image_layer), **_same_geometry(image_layer))


def make_box_layer(viewer, image_layer):
    """The Shapes layer of the box: rectangles drawn as outlines."""
    ndim = len(spatial_shape(image_layer))
    return viewer.add_shapes(ndim=ndim, name=BOX_LAYER, face_color="transparent", edge_color=BOX_COLOUR,
                             edge_width=max(1.0, point_size(image_layer) / 4), **_same_geometry(image_layer))


def next_positive(points) -> bool:
    return bool(points.feature_defaults["positive"][0])


def set_next_positive(points, positive: bool) -> None:
    points.feature_defaults = {"positive": bool(positive)}


def _in_image(layer, image_layer, coords: np.ndarray) -> np.ndarray:
    """Coordinates of ``layer``'s data -> ``image_layer``'s data coordinates (through the world)."""
    return np.array([image_layer.world_to_data(layer.data_to_world(c)) for c in coords]).reshape(len(coords), -1)


def _on_plane(image_layer, coords: np.ndarray, index: tuple) -> np.ndarray:
    """Which of the image coordinates lie on the plane ``index`` (all, for a 2D image)."""
    lead = len(leading_shape(image_layer))
    if not lead or not len(coords):
        return np.ones(len(coords), bool)
    return np.all(np.round(coords[:, :lead]).astype(int) == np.asarray(index, int), axis=1)


def clicks_on_plane(points, image_layer, index: tuple) -> list[tuple[float, float, bool]]:
    """The clicks on the plane ``index`` as (row, col, positive) in the image's pixels."""
    if points is None or not len(points.data):
        return []
    coords = _in_image(points, image_layer, np.asarray(points.data))
    signs = np.asarray(points.features["positive"], bool)
    on = _on_plane(image_layer, coords, index)
    return [(float(r), float(c), bool(s)) for (r, c), s in zip(coords[on][:, -2:], signs[on])]


def box_on_plane(shapes, image_layer, index: tuple) -> tuple[float, float, float, float] | None:
    """The last rectangle on the plane ``index`` as (row0, col0, row1, col1) in the image's
    pixel edges (napari's coordinates are pixel centres: a rectangle from pixel 10 to pixel
    50 covers rows 10.0 to 51.0, so each side moves out by half a pixel)."""
    if shapes is None:
        return None
    for data, kind in zip(reversed(shapes.data), reversed(shapes.shape_type)):
        if kind != "rectangle":
            continue
        coords = _in_image(shapes, image_layer, np.asarray(data))
        if not _on_plane(image_layer, coords, index).all():
            continue
        (r0, c0), (r1, c1) = coords[:, -2:].min(0), coords[:, -2:].max(0)
        return float(r0) + 0.5, float(c0) + 0.5, float(r1) + 0.5, float(c1) + 0.5
    return None


def refined_plane(before: np.ndarray, mask: np.ndarray, value: int, keep: np.ndarray | None = None) -> np.ndarray:
    """What a Labels plane becomes when the object of label ``value`` is now ``mask``: its
    pixels no longer in the mask cleared to 0, the mask's pixels that were 0 set to it, every
    other label as it was, and the pixels in ``keep`` (the annotator's strokes) untouched."""
    planned = before.copy()
    ours = before == value
    planned[ours & ~mask] = 0
    planned[(before == 0) & mask] = value
    if keep is not None and keep.any():
        planned[keep] = before[keep]
    return planned


class ClickTools:
    """The clicks and box layers of a viewer, and ``on_change`` called (later, on the GUI
    thread) when the annotator adds, moves or deletes a click or the box, unless the change
    is the plugin's own (``quiet``). ``on_sign`` is called with the sign of the next click
    when it changes, ``on_clear`` when Shift+C is pressed on one of the layers."""

    def __init__(self, viewer, on_change, on_sign=None, on_clear=None):
        self.viewer = viewer
        self.on_change, self.on_sign, self.on_clear = on_change, on_sign, on_clear
        self._hooked: set = set()
        self._quiet = 0

    @property
    def points(self):
        import napari

        return _tools_of(self.viewer, CLICKS_LAYER, napari.layers.Points)

    @property
    def shapes(self):
        import napari

        return _tools_of(self.viewer, BOX_LAYER, napari.layers.Shapes)

    def is_tool(self, layer) -> bool:
        """Whether ``layer`` is the clicks or the box layer (plugin proxies are new objects)."""
        return any(t is not None and layer_key(t) == layer_key(layer) for t in (self.points, self.shapes))

    def layers(self, image_layer):
        """The clicks and box layers, made for ``image_layer`` where missing or of another
        number of dimensions, and kept above the image and its labels."""
        ndim = len(spatial_shape(image_layer))
        points, shapes = self.points, self.shapes
        with self.quiet():
            if points is not None and points.ndim != ndim:
                self.viewer.layers.remove(points)
                points = None
            if shapes is not None and shapes.ndim != ndim:
                self.viewer.layers.remove(shapes)
                shapes = None
            active = self.viewer.layers.selection.active
            if shapes is None:
                shapes = make_box_layer(self.viewer, image_layer)
            made = points is None
            if made:
                points = make_clicks_layer(self.viewer, image_layer)
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active  # adding a layer selects it
        self.hook(points)
        self.hook(shapes)
        self.raise_()
        if made:
            self._sign_changed()  # a new layer's next click is positive
        return points, shapes

    def raise_(self) -> None:
        """Put the box and the clicks on top (an image added later would hide them)."""
        layers = self.viewer.layers
        for layer in (self.shapes, self.points):
            if layer is not None and layers.index(layer) != len(layers) - 1:
                layers.move(layers.index(layer), len(layers))

    def hook(self, layer) -> None:
        if layer is None or layer_key(layer) in self._hooked:
            return
        self._hooked.add(layer_key(layer))
        layer.events.data.connect(self._data_changed)
        layer.bind_key(CLEAR_KEY, self._clear_key, overwrite=True)
        import napari

        if isinstance(layer, napari.layers.Points):
            layer.events.feature_defaults.connect(self._sign_changed)
            layer.bind_key(TOGGLE_KEY, self._toggle_key, overwrite=True)

    def _data_changed(self, event) -> None:
        from napari.layers.base._base_constants import ActionType

        action = getattr(event, "action", None)
        if self._quiet or action not in (ActionType.ADDED, ActionType.REMOVED, ActionType.CHANGED):
            return
        self.on_change()

    def _sign_changed(self, event=None) -> None:
        if self.on_sign is not None and self.points is not None:
            self.on_sign(next_positive(self.points))

    def _toggle_key(self, layer) -> None:
        self.toggle()

    def _clear_key(self, layer) -> None:
        if self.on_clear is not None:
            self.on_clear()
        else:
            self.clear()

    def toggle(self) -> bool:
        """Flip the sign of the next click; returns the new sign (True: positive)."""
        points = self.points
        if points is None:
            return True
        set_next_positive(points, not next_positive(points))
        return next_positive(points)

    @contextmanager
    def quiet(self):
        """Changes to the layers made inside are the plugin's own: no refinement."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def has_prompts(self) -> bool:
        return bool((self.points is not None and len(self.points.data))
                    or (self.shapes is not None and len(self.shapes.data)))

    def clear(self) -> None:
        """Remove every click and the box, quietly (the labels stay as they are)."""
        with self.quiet():
            if self.points is not None and len(self.points.data):
                self.points.data = np.empty((0, self.points.ndim))
            if self.shapes is not None and len(self.shapes.data):
                self.shapes.data = []

    def state(self) -> dict | None:
        """The clicks (with their signs) and the rectangles, as JSON values to keep with an
        image (in the series' ``series.json``); None when there are none."""
        if not self.has_prompts():
            return None
        points, shapes = self.points, self.shapes
        return {"points": np.asarray(points.data, float).tolist() if points is not None else [],
                "positive": np.asarray(points.features["positive"], bool).tolist() if points is not None else [],
                "boxes": [np.asarray(d, float).tolist() for d, kind in zip(shapes.data, shapes.shape_type)
                          if kind == "rectangle"] if shapes is not None else []}

    def restore(self, state: dict | None, image_layer) -> None:
        """Show the clicks and rectangles of ``state`` (none for None), quietly: the labels
        they produced were kept with the image. Entries of another shape (a file edited by
        hand, an image of other dimensions) are left out."""
        self.clear()
        if not state:
            return
        points, shapes = self.layers(image_layer)
        coords, signs = _array(state.get("points"), points.ndim), np.asarray(state.get("positive", []), bool)
        with self.quiet():
            if len(coords) and len(coords) == len(signs):
                import pandas as pd

                sign = next_positive(points)
                points.data = coords
                points.features = pd.DataFrame({"positive": signs})
                points.refresh_colors(update_color_mapping=False)
                points.feature_defaults = {"positive": sign}
            boxes = [b for b in (_array(b, shapes.ndim) for b in state.get("boxes", [])) if len(b) == 4]
            if boxes:
                shapes.add_rectangles(boxes)


def _array(values, ndim: int) -> np.ndarray:
    """``values`` as an (N, ndim) float array; empty when they are not that."""
    try:
        a = np.asarray(values if values is not None else [], float)
    except (TypeError, ValueError):
        return np.empty((0, ndim))
    return a if a.ndim == 2 and a.shape[1] == ndim else np.empty((0, ndim))
