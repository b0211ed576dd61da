"""Screenshots for the docs, from a real napari window (under Xvfb when there is no display)
on a 1600x1000 screen, the docks opened as the Plugins menu opens them, the embedded model.

    .venv/bin/python scripts/make_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settle(seconds: float = 0.5):
    from qtpy.QtWidgets import QApplication

    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def wait(seg):
    from qtpy.QtWidgets import QApplication

    while seg.worker is not None:
        QApplication.processEvents()
        time.sleep(0.02)


def click_three_times(viewer, seg, truth) -> str:
    """Three clicks on the image shown, each placed from ``truth`` as bench_clicks places them."""
    import random

    import numpy as np

    from napari_vlsm.core.training.click_simulation import first_click, next_click

    seg.clicks_btn.click()
    points = viewer.layers["clicks"]
    click = first_click(truth, random.Random(0))
    for _ in range(3):
        seg.set_next_sign(click.positive)
        points.add([[click.row, click.col]])
        settle(0.5)  # the refinement waits for a pause in the clicks
        while seg.clicking is not None or seg._pending_click is not None:
            settle(0.1)
        labels = next(l for l in viewer.layers if l.name.endswith("· clicks"))
        click = next_click(truth, np.asarray(labels.data) != 0)
        if click is None:
            break
    return seg.status.text()


def new_viewer():
    import napari

    viewer = napari.Viewer(title="napari-vlsm", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    return viewer


def shoot(out: Path):
    viewer = new_viewer()
    seg_dock, seg = viewer.window.add_plugin_dock_widget("napari-vlsm", "Text-prompt segmentation")
    fine_dock, fine = viewer.window.add_plugin_dock_widget("napari-vlsm", "Finetune")
    fine.folder_edit.setText(tempfile.mkdtemp(prefix="vlsm-training-set-"))
    fine.folder_edit.editingFinished.emit()  # as pressing Enter: the series stores its pairs there too

    # 1. the prompt chooses: a tumour in breast ultrasound
    viewer.open_sample("napari-vlsm", "breast_ultrasound")
    viewer.layers.selection.active = viewer.layers[0]
    seg.prompt_edit.setPlainText("breast tumor")
    seg.run()
    wait(seg)
    viewer.reset_view()
    settle()
    seg_dock.raise_()  # the docks are tabs: the segmentation's in front
    settle()
    viewer.screenshot(str(out / "screenshot.png"), canvas_only=False, flash=False)

    # 2. the same model asked for a polyp there: nothing, and the status line says so
    seg.prompt_edit.setPlainText("polyp")
    seg.run()
    wait(seg)
    settle()
    viewer.screenshot(str(out / "screenshot_nothing_found.png"), canvas_only=False, flash=False)

    # 3. the image series on a folder of polyp frames
    for layer in list(viewer.layers):
        viewer.layers.remove(layer)
    folder = Path(tempfile.mkdtemp(prefix="vlsm-series-"))
    data = ROOT / "tests" / "data" / "kvasir_seg" / "images"
    for p in sorted(data.iterdir())[:6]:
        shutil.copy(p, folder / p.name)
    fine_dock.hide()  # still there (the series adds its pairs to it), out of the picture
    _, series = viewer.window.add_plugin_dock_widget("napari-vlsm", "Image series")
    seg.prompt_edit.setPlainText("polyp")
    series.open(folder)
    wait(seg)
    while series.scoring is not None:  # the order by kind is worked out in the background
        settle(0.1)
    series.next()
    wait(seg)
    series.next()
    wait(seg)
    viewer.reset_view()
    settle()
    viewer.screenshot(str(out / "screenshot_series.png"), canvas_only=False, flash=False)
    status = {"segment": seg.status.text(), "series": series.progress.text()}

    # 4. no words, three clicks: a skin lesion outlined from the clicks alone (the empty prompt),
    #    each click where an annotator puts it (the centre of the larger error, as bench_clicks)
    viewer.close()
    viewer = new_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-vlsm", "Text-prompt segmentation")
    viewer.open_sample("napari-vlsm", "skin_lesion")
    image = next(l for l in viewer.layers if l.__class__.__name__ == "Image")
    truth = next(l for l in viewer.layers if l.__class__.__name__ == "Labels").data != 0
    seg.image_combo.setCurrentText(image.name)
    seg.prompt_edit.setPlainText("")
    status["clicks"] = click_three_times(viewer, seg, truth)
    viewer.reset_view()
    settle()
    viewer.screenshot(str(out / "screenshot_clicks.png"), canvas_only=False, flash=False)
    viewer.close()
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import os

    if os.environ.get("DISPLAY"):
        print(json.dumps(shoot(out), indent=1))
        return
    from pyvirtualdisplay import Display

    with Display(visible=False, size=(1600, 1000)):
        print(json.dumps(shoot(out), indent=1))


if __name__ == "__main__":
    main()
