"""Small Qt helpers the dock widgets share."""

from __future__ import annotations

from . import layer_keys

DOCK_PROPERTY = "vlsm_dock"  # set on the plugin's QDockWidgets, so they find each other's docks to join as tabs


def is_probability_map(layer) -> bool:
    return bool(layer.metadata.get(layer_keys.PROBABILITY))


def on_layers_changed(viewer, callback) -> None:
    """Call ``callback`` when layers are added, removed, reordered or renamed."""
    ev = viewer.layers.events
    for e in (ev.inserted, ev.removed, ev.reordered):
        e.connect(callback)
    for layer in viewer.layers:
        layer.events.name.connect(callback)
    ev.inserted.connect(lambda event: event.value.events.name.connect(callback))


def scrolling_layout(widget):
    """Give ``widget`` a scroll area and return the layout inside it, so a dock taller than
    the screen scrolls instead of pushing its last controls off the bottom."""
    from qtpy.QtCore import QEvent, QSize, Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    class VerticalScroll(QScrollArea):
        """Scrolls up and down only: never narrower than its controls, so none is cut at the side."""

        def minimumSizeHint(self):
            inner = self.widget().minimumSizeHint()
            return QSize(inner.width() + self.verticalScrollBar().sizeHint().width(),
                         super().minimumSizeHint().height())

        def eventFilter(self, watched, event):
            # the controls grew (a long model name, a new status): the dock must learn the new minimum
            if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
                self.updateGeometry()
            return super().eventFilter(watched, event)

    inner = QWidget()
    scroll = VerticalScroll()
    scroll.setWidget(inner)
    inner.installEventFilter(scroll)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    return QVBoxLayout(inner)


def ask(parent, question: str) -> bool:
    """A Yes/No question; True for Yes."""
    from qtpy.QtWidgets import QMessageBox

    buttons = QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
    return QMessageBox.question(parent, "napari-vlsm", question, buttons) == QMessageBox.StandardButton.Yes


def name_combo(min_chars: int = 20):
    """A chooser of names (layers, prompts) that does not widen its dock to the longest name:
    it shows ``min_chars`` characters or more; the list it opens shows every name whole."""
    from qtpy.QtWidgets import QComboBox

    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(min_chars)
    return combo


def fill_layer_combo(combo, viewer, kind) -> None:
    """List the names of the viewer's layers of ``kind``, keeping the current choice. The
    plugin's own probability maps are not images to segment and are left out."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems([ly.name for ly in viewer.layers if isinstance(ly, kind) and not is_probability_map(ly)])
    if current:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def on_window_close(widget, callback):
    """Call ``callback`` when the window holding ``widget`` is about to close (before napari
    tears its layers down). The watcher lives as long as ``widget``; returned so it is kept."""
    from qtpy.QtCore import QEvent, QObject

    class CloseWatcher(QObject):
        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Close:
                callback()
            return False

    watcher = CloseWatcher(widget)
    widget.window().installEventFilter(watcher)
    return watcher


def dock_of(widget):
    """The QDockWidget holding ``widget``, or None while it is not docked."""
    from qtpy.QtWidgets import QDockWidget

    while widget is not None and not isinstance(widget, QDockWidget):
        widget = widget.parentWidget()
    return widget


def join_plugin_tabs(widget, title: str) -> None:
    """Once ``widget`` is docked: give its dock the short tab title ``title`` (napari's
    "Text-prompt segmentation (napari-vlsm)" is cut in a tab), and put it in tabs with the
    plugin's other docks in the same area, whichever was opened first (three docks stacked
    in one column leave each too little height, and the last buttons scroll out of view)."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    def join():
        try:
            mine, window = dock_of(widget), widget.window()
        except RuntimeError:  # closed before the event loop came round
            return
        if mine is None or not isinstance(window, QMainWindow):
            return
        mine.setWindowTitle(title)
        mine.setProperty(DOCK_PROPERTY, True)
        others = [d for d in window.findChildren(QDockWidget)
                  if d is not mine and d.property(DOCK_PROPERTY) and not d.isFloating() and d.isVisible()
                  and window.dockWidgetArea(d) == window.dockWidgetArea(mine)]
        if not others or mine.isFloating() or mine in window.tabifiedDockWidgets(others[0]):
            return
        window.tabifyDockWidget(others[0], mine)
        QTimer.singleShot(0, mine.raise_)  # the newest tab in front, once the tabs exist

    QTimer.singleShot(0, join)


def bind_to_state(widget, state, dock: str, bound) -> None:
    """Connect each (state signal, widget slot) of ``bound``, tell the state that ``dock`` is
    open, and undo both when the widget goes (a closed dock must not hear the state)."""
    for signal, slot in bound:
        signal.connect(slot)
    state.dock_opened(dock)

    def unbind(*_):
        for signal, slot in bound:
            signal.disconnect(slot)
        state.dock_closed(dock)

    widget.destroyed.connect(unbind)
