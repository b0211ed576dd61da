"""The README's main job: a sample colonoscopy frame, segmented by the offline default model.

With a display: napari opens with the frame, the widget docked and the result in a Labels
layer. Without one: the same pipeline runs headless (under Xvfb when it is installed,
otherwise without the viewer) and the mask and a screenshot are written to files.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from napari_vlsm.core.errors import VLSMError
from napari_vlsm.core.images.imageio import write_mask
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.inference.predictor import Predictor

PROMPT = "polyp"


def sample_frame() -> Path:
    from .plugin.samples import colonoscopy_frames

    return next(p for p in colonoscopy_frames() if p.name.startswith("kvasir"))


def segment_headless(model: str, out: Path) -> Path:
    """Core library only: read the frame, segment it, write the mask."""
    from napari_vlsm.core.images.imageio import read_image

    image = read_image(sample_frame())
    predictor = Predictor(load_model(model))
    t = time.perf_counter()
    predictor.set_image(image)
    pred = predictor.predict(PROMPT)
    ms = (time.perf_counter() - t) * 1e3
    path = write_mask(out / f"{sample_frame().stem}_mask.png", pred.labels)  # 0/1, as `segment` writes
    print(f"Segmented {sample_frame().name} with '{PROMPT}' in {ms:.0f} ms: {int(pred.masks.sum())} pixels.")
    return path


def run_viewer(model: str, out: Path, interactive: bool) -> list[Path]:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-vlsm demo", show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.open_sample("napari-vlsm", "kvasir_polyp")
    # opened as the Plugins menu opens them
    viewer.window.add_plugin_dock_widget("napari-vlsm", "Finetune")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-vlsm", "Text-prompt segmentation", tabify=True)
    widget.add_model(model)
    viewer.layers.selection.active = viewer.layers[0]
    widget.prompt_edit.setPlainText(PROMPT)
    widget.run()
    while widget.worker is not None:
        QApplication.processEvents()
        time.sleep(0.01)
    viewer.reset_view()
    labels = [ly for ly in viewer.layers if ly._type_string == "labels" and "ground truth" not in ly.name]
    if not labels:
        viewer.close()
        raise VLSMError(f"Segmentation failed: {widget.status.text()}")
    written = [write_mask(out / f"{sample_frame().stem}_mask.png", labels[-1].data)]
    shot = out / "napari_vlsm_demo.png"
    dock.raise_()  # the tab with the result in front (the Finetune dock joined the tabs first)
    end = time.time() + 0.5  # let the status bar finish redrawing (it was caught mid-update)
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(shot), canvas_only=False, flash=False)
    written.append(shot)
    if interactive:
        print("napari is open; close the window to finish.")
        napari.run()
    else:
        viewer.close()
    return written


def run(model: str = "default", out: Path = Path("vlsm_demo"), headless: bool = False) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    try:
        import napari  # noqa: F401
        from pyvirtualdisplay import Display
    except ImportError:
        print("napari is not installed (pip install 'napari-vlsm[napari]'): running the pipeline without the viewer.")
        return [segment_headless(model, out)]
    if has_display and not headless:
        return run_viewer(model, out, interactive=True)
    if shutil.which("Xvfb"):

        print("No display: running napari under Xvfb and saving a screenshot.")
        with Display(visible=False, size=(1600, 1000)):  # larger than the window, so nothing is cut
            return run_viewer(model, out, interactive=False)
    print("No display and no Xvfb: running the pipeline without the viewer.")
    return [segment_headless(model, out)]
