"""The segmentation widget in a real napari viewer (under Xvfb through pytest-xvfb)."""

import shutil

import numpy as np
import pytest
from qtpy.QtCore import Qt, QTimer

from napari_vlsm.plugin.segment_widget import SegmentWidget

from .conftest import open_docks


@pytest.fixture
def widget(make_napari_viewer, tiny_clipseg):
    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="Text-prompt segmentation")
    w.add_model(str(tiny_clipseg))
    return w


def segment(qtbot, w, prompts="polyp", timeout=60000):
    w.prompt_edit.setPlainText(prompts)
    assert w.run() is not None
    wait_done(qtbot, w, timeout)


def wait_done(qtbot, w, timeout=60000):
    # the widget's own finished handler clears .worker (connected before the worker starts)
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)


def set_threshold(qtbot, w, value: int):
    """Move the slider and wait until the new threshold's plane is worked out and written."""
    w.threshold.setValue(value)
    qtbot.waitUntil(lambda: w.thresholding is None, timeout=10000)


def segmented_frame(qtbot, w, image):
    """Segment ``image`` for 'polyp' into a new layer: (that Labels layer, the probabilities)."""
    w.viewer.add_image(image, name="frame")
    segment(qtbot, w)
    (labels,) = labels_layers(w.viewer)
    return labels, w.session.last.probs[()][0]


def labels_layers(viewer):
    return [ly for ly in viewer.layers if ly._type_string == "labels"]


def test_segment_rgb_into_new_editable_labels_layer(qtbot, widget, polyp_image):
    viewer = widget.viewer
    image = viewer.add_image(polyp_image, name="frame", scale=(0.5, 0.5), translate=(10, 20))
    assert image.rgb
    segment(qtbot, widget, "polyp\nmucosa")
    (labels,) = labels_layers(viewer)
    assert labels.data.shape == (256, 256)
    assert tuple(labels.scale) == (0.5, 0.5) and tuple(labels.translate) == (10, 20)
    assert set(np.unique(labels.data)) <= {0, 1, 2} and labels.data.any()
    assert labels.metadata["vlsm_labels"] == {1: "polyp", 2: "mucosa"}
    assert list(labels.features["prompt"]) == ["background", "polyp", "mucosa"]
    assert labels.editable
    assert widget.history_combo.itemText(0) == "polyp\nmucosa"
    assert "CLIPSeg" in widget.status.text() and "cpu" in widget.status.text()


def test_layer_chooser_follows_selection(widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="a")
    b = viewer.add_image(polyp_image[..., 0], name="b")
    viewer.layers.selection.active = viewer.layers["a"]
    assert widget.image_combo.currentText() == "a"
    viewer.layers.selection.active = b
    assert widget.image_combo.currentText() == "b"


def test_threshold_slider_rethresholds_without_running_the_model(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    segment(qtbot, widget)
    labels = labels_layers(viewer)[0]
    probs = widget.session.last.probs[()][0]
    calls = []
    module = widget.session.predictor.backend.module
    for part in (module.clip.vision_model.embeddings, module.decoder):
        part.register_forward_hook(lambda *a: calls.append(1))
    set_threshold(qtbot, widget, 80)
    assert calls == []
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.8)
    set_threshold(qtbot, widget, 20)
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.2)


def test_the_slider_labels_a_probability_exactly_at_the_threshold_as_the_predictor_does(qtbot, docked,
                                                                                        polyp_image):
    """A pixel whose probability equals the threshold is labelled (>=), by the slider as by Segment."""
    docked.viewer.add_image(polyp_image, name="frame")
    segment(qtbot, docked)
    labels = labels_layers(docked.viewer)[0]
    probs = docked.session.last.probs[()]
    probs[0, 10, 10], probs[0, 20, 20] = 0.25, np.nextafter(np.float32(0.25), np.float32(0))  # 0.25: exact in float32
    set_threshold(qtbot, docked, 25)
    assert labels.data[10, 10] == 1 and labels.data[20, 20] == 0
    np.testing.assert_array_equal(labels.data > 0, probs[0] >= 0.25)


def test_fill_mode_never_overwrites_annotations(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    user = np.zeros((256, 256), np.uint8)
    user[:128] = 7  # the annotator's work
    target = viewer.add_labels(user.copy(), name="mine")
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("fill"))
    widget.target_combo.setCurrentText("mine")
    widget.threshold.setValue(5)  # low threshold: the model claims most pixels
    segment(qtbot, widget)
    assert (target.data[:128] == 7).all()
    assert target.metadata["vlsm_labels"] == {8: "polyp"}  # a new value: 7 keeps its meaning
    assert set(np.unique(target.data[128:])) <= {0, 8} and target.data[128:].any()
    set_threshold(qtbot, widget, 60)  # re-threshold: still only unlabelled pixels change
    assert (target.data[:128] == 7).all() and set(np.unique(target.data)) <= {0, 7, 8}
    assert len(labels_layers(viewer)) == 1


def test_replace_mode_is_undoable(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    user = np.zeros((256, 256), np.uint8)
    user[100:150, 100:150] = 3
    target = viewer.add_labels(user.copy(), name="mine")
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("replace"))
    widget.target_combo.setCurrentText("mine")
    widget.threshold.setValue(30)  # the random model claims part of the image, the square included
    segment(qtbot, widget)
    probs = widget.session.last.probs[()][0]
    written = np.where(probs >= 0.3, 4, 0)  # polyp gets 4, above the layer's 3; the rest is replaced by 0
    assert written[100:150, 100:150].any() and not written[100:150, 100:150].all()
    np.testing.assert_array_equal(target.data, written)
    assert target.metadata["vlsm_labels"] == {4: "polyp"}
    target.undo()
    np.testing.assert_array_equal(target.data, user)


def test_stack_current_slice_and_all_slices(qtbot, widget, polyp_image):
    viewer = widget.viewer
    stack = np.stack([polyp_image[..., 0], polyp_image[..., 1], polyp_image[..., 2]])
    layer = viewer.add_image(stack, name="stack")
    assert not layer.rgb
    viewer.dims.set_current_step(0, 1)
    segment(qtbot, widget)
    labels = labels_layers(viewer)[0]
    assert labels.data.shape == (3, 256, 256)
    assert labels.data[1].any() and not labels.data[0].any() and not labels.data[2].any()
    widget.all_slices.setChecked(True)
    segment(qtbot, widget)
    labels = labels_layers(viewer)[1]
    assert all(labels.data[i].any() for i in range(3))


def test_rgb_stack_is_segmented_per_frame(qtbot, widget, polyp_image):
    viewer = widget.viewer
    layer = viewer.add_image(np.stack([polyp_image, polyp_image[::-1]]), name="rgb stack", rgb=True)
    viewer.dims.set_current_step(0, 1)
    segment(qtbot, widget)
    labels = labels_layers(viewer)[0]
    assert layer.rgb and labels.data.shape == (2, 256, 256)
    assert labels.data[1].any() and not labels.data[0].any()


@pytest.mark.parametrize("setup, message", [
    ("no image", "No image layer"),
    ("empty prompt", "prompt is empty"),
    ("missing model", "models pull CIDAS/not-here"),
    ("bad image", "NaN or infinite"),
    ("wrong target", "has shape"),
    ("pyramid", "multiscale (pyramid)"),
])
def test_errors_are_notifications_and_layers_stay_untouched(qtbot, widget, polyp_image, monkeypatch, setup, message):
    shown = []
    monkeypatch.setattr("napari_vlsm.plugin.segment_widget.show_error", shown.append)
    viewer = widget.viewer
    if setup != "no image":
        data = polyp_image.astype(np.float32)
        if setup == "bad image":
            data[0, 0, 0] = np.nan
        viewer.add_image([data, data[::2, ::2]] if setup == "pyramid" else data, name="frame",
                         multiscale=setup == "pyramid")
    mine = viewer.add_labels(np.ones((20, 20), np.uint8), name="mine")
    if setup == "wrong target":
        widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("fill"))
        widget.target_combo.setCurrentText("mine")
    if setup == "missing model":
        widget.add_model("CIDAS/not-here")
    widget.prompt_edit.setPlainText("" if setup == "empty prompt" else "polyp")
    widget.run()
    wait_done(qtbot, widget)
    assert any(message in m for m in shown), shown
    assert [ly.name for ly in viewer.layers if ly._type_string == "labels"] == ["mine"]
    assert (mine.data == 1).all()


def test_fill_into_an_8_bit_layer_whose_labels_reach_255_widens_it(qtbot, widget, polyp_image):
    """A 0/255 mask from disk, opened as Labels: the prompt's new label 256 does not fit in 8 bits."""
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    mask = np.zeros(polyp_image.shape[:2], np.uint8)
    mask[:20, :20] = 255
    layer = viewer.add_labels(mask, name="mask from disk")
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("fill"))
    widget.target_combo.setCurrentText("mask from disk")
    segment(qtbot, widget)
    assert layer.data.dtype == np.uint16 and (layer.data[:20, :20] == 255).all()
    assert layer.metadata["vlsm_labels"] == {256: "polyp"} and (layer.data == 256).any()
    assert set(np.unique(layer.data)) == {0, 255, 256}
    assert widget.status.text().startswith("Wrote 1 plane(s)")


def test_gui_stays_responsive_during_full_size_inference(qtbot, make_napari_viewer, tmp_path_factory, polyp_image):
    from napari_vlsm.core.models.random_models import build_random_clipseg

    rd64 = build_random_clipseg(tmp_path_factory.mktemp("rd64") / "rd64", shape="rd64")
    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    w.add_model(str(rd64))
    viewer.add_image(polyp_image, name="frame")
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    w.prompt_edit.setPlainText("polyp")
    assert w.run() is not None
    wait_done(qtbot, w, 180000)
    timer.stop()
    assert len(labels_layers(viewer)) == 1
    assert len(ticks) >= 10, f"the GUI thread ran only {len(ticks)} timer ticks during inference"


def test_cancel_writes_nothing(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(np.stack([polyp_image] * 6), name="frames", rgb=True)
    widget.all_slices.setChecked(True)
    widget.prompt_edit.setPlainText("polyp")
    worker = widget.run()
    with qtbot.waitSignal(worker.yielded, timeout=30000):
        pass
    widget.cancel()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30000)
    assert labels_layers(viewer) == []
    assert "Cancelled" in widget.status.text()


def test_screenshot_shows_the_labels(qtbot, make_napari_viewer, tiny_clipseg, polyp_image, tmp_path):
    viewer = make_napari_viewer(show=True)  # a hidden canvas draws nothing
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Text-prompt segmentation")
    widget.add_model(str(tiny_clipseg))
    viewer.add_image(polyp_image, name="frame")
    widget.threshold.setValue(30)
    segment(qtbot, widget)
    labels = labels_layers(viewer)[0]
    assert labels.data.any()
    with_labels = viewer.screenshot(canvas_only=True, flash=False)
    labels.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    changed = np.abs(with_labels[..., :3].astype(int) - without[..., :3].astype(int)).sum(-1) > 30
    assert changed.mean() > 0.5 * (labels.data > 0).mean() * 0.5, changed.mean()
    labels.visible = True
    full = viewer.screenshot(path=str(tmp_path / "window.png"), canvas_only=False, flash=False)
    assert full.shape[1] > with_labels.shape[1]  # the docked widget is in the window shot


def test_prompt_builder_and_probability_layer(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    widget.class_edit.setText("polyp")
    widget.attr_combos["number"].setCurrentText("one")
    widget.attr_combos["size"].setCurrentText("small")
    widget.attr_combos["location"].setCurrentText("top left")
    widget._add_built_prompt()
    assert widget.prompts == ["one small polyp, located in top left of the image"]
    widget.show_probs.setChecked(True)
    widget.run()
    wait_done(qtbot, widget)
    probs = viewer.layers["frame · probability"]
    np.testing.assert_allclose(probs.data, widget.session.last.probs[()].max(0))
    assert 0.0 <= probs.data.min() and probs.data.max() <= 1.0


def test_a_slider_drag_is_one_undo_step_and_says_when_it_cannot_apply(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    segment(qtbot, widget)
    labels = labels_layers(viewer)[0]
    probs = widget.session.last.probs[()][0]
    widget.threshold.setSliderDown(True)  # a mouse drag: many positions, applied on release
    for v in range(50, 81):
        widget.threshold.setSliderPosition(v)
    assert widget.threshold_label.text() == "0.80"
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.5)  # nothing applied while dragging
    widget.threshold.setSliderDown(False)
    qtbot.waitUntil(lambda: widget.thresholding is None)
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.8)
    labels.undo()  # one step back is the mask at 0.5 again
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.5)
    widget.all_slices.setChecked(True)
    widget.session.last = None  # as after an all-slices run
    widget.threshold.setValue(30)
    assert "applies to the next Segment" in widget.status.text()


def test_probability_map_never_becomes_the_image_to_segment(qtbot, widget, polyp_image):
    viewer = widget.viewer
    viewer.add_image(polyp_image, name="frame")
    widget.show_probs.setChecked(True)
    segment(qtbot, widget)
    assert "frame · probability" in viewer.layers
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == ["frame"]
    viewer.layers.selection.active = viewer.layers["frame · probability"]
    assert widget.image_combo.currentText() == "frame"


def test_renamed_layers_and_a_model_that_fails_to_load(qtbot, widget, polyp_image, tmp_path):
    viewer = widget.viewer
    layer = viewer.add_image(polyp_image, name="frame")
    layer.name = "renamed frame"
    assert widget.image_combo.currentText() == "renamed frame"
    segment(qtbot, widget)  # the model in use
    before = widget.model_spec
    (tmp_path / "broken").mkdir()
    widget.add_model(str(tmp_path / "broken"))
    segment(qtbot, widget)
    assert widget.model_spec == before and widget.model_combo.findData(str(tmp_path / "broken")) < 0
    assert "Could not load" in widget.status.text()


@pytest.fixture
def docked(make_napari_viewer, tiny_clipseg):
    """The segmentation dock as napari opens it from the Plugins menu."""
    (w,) = open_docks(make_napari_viewer(), "segment", model=tiny_clipseg)
    return w


def test_fill_mode_leaves_what_the_annotator_erased_empty(qtbot, docked, polyp_image):
    viewer = docked.viewer
    viewer.add_image(polyp_image, name="frame")
    docked.threshold.setValue(5)  # low threshold: the model claims most pixels
    segment(qtbot, docked)
    (labels,) = labels_layers(viewer)
    before = labels.data.copy()
    labels.brush_size = 40
    labels.paint(np.argwhere(before)[len(np.argwhere(before)) // 2], 0)  # the annotator erases a false
    erased = before != labels.data                                        # positive: erased, not empty
    assert erased.sum() > 100
    docked.mode_combo.setCurrentIndex(docked.mode_combo.findData("fill"))
    docked.target_combo.setCurrentText(labels.name)
    segment(qtbot, docked, "polyp\nmucosa")
    assert not labels.data[erased].any()  # only pixels nobody touched were filled
    labels.data[:] = 0  # untouched zeros (not painted) are filled as before
    set_threshold(qtbot, docked, 6)
    segment(qtbot, docked)
    assert labels.data.any()


def test_the_status_names_the_prompt_that_found_nothing(qtbot, docked, polyp_image):
    from napari_vlsm.plugin.session import PlaneProbabilities

    viewer = docked.viewer
    viewer.add_image(polyp_image, name="frame")
    segment(qtbot, docked, "polyp\nmucosa")
    (labels,) = labels_layers(viewer)
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, 2:4, 2:4] = 0.9  # polyp found, mucosa nowhere above 0.5
    probs[1] = 0.3
    text = docked._result_message(PlaneProbabilities(["polyp", "mucosa"], probs={(): probs}), labels, "CLIPSeg on cpu")
    assert text.startswith("Wrote 1 plane(s)") and "Nothing above threshold 0.50 for 'mucosa'." in text
    assert "'polyp'" not in text


def test_the_slider_moves_on_after_an_undo_of_a_threshold(qtbot, docked, polyp_image):
    labels, probs = segmented_frame(qtbot, docked, polyp_image)
    set_threshold(qtbot, docked, 80)
    labels.undo()  # Ctrl+Z: back to the 0.50 mask, and the slider says so
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.5)
    qtbot.waitUntil(lambda: docked.threshold_label.text() == "0.50")
    assert docked.threshold.value() == 50
    labels.redo()
    qtbot.waitUntil(lambda: docked.threshold_label.text() == "0.80")
    labels.undo()
    qtbot.waitUntil(lambda: docked.threshold.value() == 50)
    set_threshold(qtbot, docked, 30)  # not refused: the layer holds what threshold 0.50 wrote
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.3)
    labels.data_setitem((np.array([0]), np.array([0])), 7)  # a real edit still stops the slider
    set_threshold(qtbot, docked, 60)
    assert labels.data[0, 0] == 7 and "edited since" in docked.status.text()


def test_thresholding_is_never_done_on_the_gui_thread(qtbot, docked, polyp_image, monkeypatch):
    import threading

    from napari_vlsm.plugin import label_writing

    on_gui_thread = []
    combine = label_writing.combine_labels

    def spy(*args):
        on_gui_thread.append(threading.current_thread() is threading.main_thread())
        return combine(*args)

    monkeypatch.setattr(label_writing, "combine_labels", spy)
    viewer = docked.viewer
    viewer.add_image(polyp_image, name="frame")
    segment(qtbot, docked, "polyp\nmucosa")
    (labels,) = labels_layers(viewer)
    probs = docked.session.last.probs[()]
    set_threshold(qtbot, docked, 70)
    assert on_gui_thread == [False, False]  # the result and the slider, each worked out in a worker
    np.testing.assert_array_equal(labels.data, combine(probs, 0.7))


def test_slider_moves_made_while_a_threshold_is_worked_out_end_at_the_last(qtbot, docked, polyp_image):
    labels, probs = segmented_frame(qtbot, docked, polyp_image)
    for value in (60, 70, 40):  # released faster than each is written
        docked.threshold.setValue(value)
    qtbot.waitUntil(lambda: docked.thresholding is None and np.array_equal(labels.data > 0, probs >= 0.4))
    qtbot.wait(300)
    np.testing.assert_array_equal(labels.data > 0, probs >= 0.4)
    assert docked.threshold_label.text() == "0.40" and labels.metadata["vlsm_threshold"] == 0.4


def test_the_status_line_never_keeps_a_stale_result(qtbot, docked, polyp_image):
    viewer = docked.viewer
    viewer.add_image(polyp_image, name="frame")
    segment(qtbot, docked)
    (labels,) = labels_layers(viewer)
    assert f"to '{labels.name}'" in docked.status.text()
    viewer.layers.remove(labels)
    assert "Wrote" not in docked.status.text() and "was removed" in docked.status.text()
    docked.prompt_edit.setPlainText("")
    assert docked.run() is None
    assert docked.status.text().startswith("The prompt is empty")


def test_finetuned_runs_are_told_apart_in_the_model_chooser(docked, tmp_path, tiny_clipseg):
    runs = []
    for name in ("finetune-20261203-0810", "finetune-20261203-0905"):
        run = tmp_path / "a" / "very" / "long" / "path" / "napari-vlsm" / "models" / name / "best"
        shutil.copytree(tiny_clipseg, run)
        runs.append(run)
        docked.add_model(str(run))
    combo = docked.model_combo
    shown = [combo.itemText(combo.findData(str(r))) for r in runs]
    assert shown == ["finetune-20261203-0810/best", "finetune-20261203-0905/best"]
    assert combo.itemData(combo.findData(str(runs[1])), Qt.ItemDataRole.ToolTipRole) == str(runs[1])
    assert docked.model_spec == str(runs[1]) and combo.toolTip() == str(runs[1])
