"""Small Qt helpers the two dock widgets share."""

from __future__ import annotations


def on_layers_changed(viewer, callback) -> None:
    """Call ``callback`` when layers are added, removed or reordered."""
    ev = viewer.layers.events
    for e in (ev.inserted, ev.removed, ev.reordered):
        e.connect(callback)


def sibling(widget, cls):
    """The first widget of class ``cls`` in the same main window as ``widget`` (napari gives
    each dock widget its own viewer proxy, so the window is what plugin docks share)."""
    window = widget.window()
    if window is widget:  # not docked
        return None
    found = window.findChildren(cls)
    return found[0] if found else None


def fill_layer_combo(combo, viewer, kind) -> None:
    """List the names of the viewer's layers of ``kind``, keeping the current choice."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems([ly.name for ly in viewer.layers if isinstance(ly, kind)])
    if current:
        combo.setCurrentText(current)
    combo.blockSignals(False)
