"""A tiny live plot of training loss and validation Dice, drawn with QPainter."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QWidget

SERIES = {"loss": QColor("#f0a030"), "val Dice": QColor("#40c0f0")}


class CurvePlot(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(90)
        self.data: dict[str, list[float]] = {k: [] for k in SERIES}

    def clear(self):
        self.data = {k: [] for k in SERIES}
        self.update()

    def add(self, name: str, value: float | None):
        if value is not None and value == value:  # skip None and NaN
            self.data[name].append(float(value))
            self.update()

    def paintEvent(self, event):
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        w, h, pad = self.width(), self.height(), 14
        p.setPen(QPen(QColor("#888888")))
        p.drawRect(0, 0, w - 1, h - 1)
        for row, (name, color) in enumerate(SERIES.items()):
            values = self.data[name]
            p.setPen(QPen(color, 2))
            p.drawText(6, 12 + 12 * row, f"{name}: {values[-1]:.3f}" if values else name)
            if len(values) < 2:
                continue
            top = max(max(values), 1.0 if name == "val Dice" else 0.0)
            xs = [pad + i * (w - 2 * pad) / (len(values) - 1) for i in range(len(values))]
            ys = [h - pad - (v / top if top else 0) * (h - 2 * pad) for v in values]
            for i in range(1, len(xs)):
                p.drawLine(QPointF(xs[i - 1], ys[i - 1]), QPointF(xs[i], ys[i]))
        p.end()
