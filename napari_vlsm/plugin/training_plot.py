"""A small live plot of training loss and validation Dice, drawn with QPainter: axes with
ticks, one point per logged step (lines between them), and a legend above the curves that
names only the curves drawn (a run without validation has no val Dice)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QWidget

SERIES = {"loss": QColor("#f0a030"), "val Dice": QColor("#40c0f0")}
LEFT, RIGHT, TOP, BOTTOM = 34, 8, 20, 18  # margins: tick labels left and below, legend on top


class CurvePlot(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(130)
        self.data: dict[str, list[tuple[float, float]]] = {k: [] for k in SERIES}

    def clear(self):
        self.data = {k: [] for k in SERIES}
        self.update()

    def add(self, name: str, value: float | None, step: float | None = None):
        """Add a point at ``step`` (default: after the series' last point); None and NaN are skipped."""
        if value is not None and value == value:
            series = self.data[name]
            x = float(step) if step is not None else (series[-1][0] + 1 if series else 1.0)
            series.append((x, float(value)))
            self.update()

    def legend(self) -> list[str]:
        """The legend's entries: the curves drawn, each with its last value."""
        return [f"{name} {series[-1][1]:.3f}" for name, series in self.data.items() if series]

    def paintEvent(self, event):
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        box = QRectF(LEFT, TOP, max(w - LEFT - RIGHT, 10), max(h - TOP - BOTTOM, 10))
        points = [pt for s in self.data.values() for pt in s]
        x_max = max((x for x, _ in points), default=1.0) or 1.0
        y_max = max([1.0] + [y for _, y in points])
        axis = QPen(QColor("#999999"))
        p.setPen(axis)
        p.drawLine(box.bottomLeft(), box.topLeft())
        p.drawLine(box.bottomLeft(), box.bottomRight())
        for frac in (0.0, 0.5, 1.0):
            y = box.bottom() - frac * box.height()
            p.drawText(QRectF(0, y - 7, LEFT - 4, 14), Qt.AlignmentFlag.AlignRight, f"{frac * y_max:.2g}")
        align = {0.0: Qt.AlignmentFlag.AlignLeft, 1.0: Qt.AlignmentFlag.AlignRight}
        for frac, text in ((0.0, "0"), (0.5, "step"), (1.0, f"{x_max:.0f}")):
            x = box.left() + frac * box.width() - (0 if frac == 0 else 60 if frac == 1 else 30)
            p.drawText(QRectF(x, box.bottom() + 2, 60, 14), align.get(frac, Qt.AlignmentFlag.AlignCenter), text)
        legend_x = LEFT
        for (name, color), label in zip(((n, c) for n, c in SERIES.items() if self.data[n]), self.legend()):
            series = self.data[name]
            p.setPen(QPen(color, 2))
            p.drawLine(QPointF(legend_x, 9), QPointF(legend_x + 12, 9))
            p.setPen(QPen(QColor("#dddddd")))
            p.drawText(QPointF(legend_x + 16, 13), label)
            legend_x += 30 + p.fontMetrics().horizontalAdvance(label)
            xy = [QPointF(box.left() + x / x_max * box.width(), box.bottom() - y / y_max * box.height())
                  for x, y in series]
            p.setPen(QPen(color, 2))
            for a, b in zip(xy, xy[1:]):
                p.drawLine(a, b)
            if len(xy) < 40:  # markers while they can be told apart
                for pt in xy:
                    p.drawEllipse(pt, 2.5, 2.5)
        p.end()
