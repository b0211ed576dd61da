"""What an annotator met with the image series over two sessions (issue 40, section 3), each
through the docks as the Plugins menu opens them and their own buttons: a series reopened in
a new viewer takes up its prompt, training interval, model and target layer; auto-save writes
only edits and never replaces an earlier session's mask unasked; Previous walks back the way
the annotator came; the docks join as tabs in any order; no status line is stale."""

import json

import numpy as np
import pytest
from qtpy.QtWidgets import QTabBar

from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.inference.series import PROGRESS, Series
from napari_vlsm.plugin import layer_keys

from .conftest import DOCKS, copy_images, open_docks


@pytest.fixture
def folder(tmp_path, kvasir):
    return copy_images(kvasir, tmp_path / "new_images", 5)


def wait_segmented(qtbot, seg, series):
    qtbot.waitUntil(lambda: seg.worker is None and series.proposal is not None, timeout=60000)


def stroke(layer, centre, value=1, size=15):
    layer.brush_size = size
    layer.paint(centre, value)


def open_folder(series, folder):
    series.folder_edit.setText(str(folder))
    series.folder_edit.returnPressed.emit()  # as typing the folder and Enter


def test_a_series_reopened_in_a_new_viewer_takes_up_its_session(qtbot, make_napari_viewer, tiny_unet, folder,
                                                                 tmp_path):
    """Prompt, Train every N, the model trained on the corrections and the series' own Labels
    layer come back with the folder, even with the series dock opened before the others."""
    first = make_napari_viewer()
    seg, fine, series = open_docks(first, "segment", "finetune", "series", model=tiny_unet, prompt="polyp",
                                   training_folder=tmp_path / "training_set", order="name")
    fine.epochs.setValue(1)
    series.train_every.setValue(1)
    open_folder(series, folder)
    wait_segmented(qtbot, seg, series)
    stroke(first.layers["series labels"], (60, 60))
    series.next_btn.click()  # saves image 1 and trains on it
    qtbot.waitUntil(lambda: fine.worker is None and bool(fine.state.pending_model), timeout=120000)
    trained = fine.state.pending_model
    stroke(first.layers["series labels"], (90, 90))
    series.next_btn.click()  # the trained model comes in between images
    assert seg.model_spec == trained
    qtbot.waitUntil(lambda: seg.worker is None and fine.worker is None, timeout=120000)
    first.close()
    kept = json.loads((folder / "vlsm_masks" / PROGRESS).read_text())["settings"]
    assert kept["prompts"] == ["polyp"] and kept["train_every"] == 1 and kept["model"] == trained

    second = make_napari_viewer()
    (series,) = open_docks(second, "series")
    open_folder(series, folder)
    assert series.train_every.value() == 1 and series.index == 2
    assert "Text-prompt segmentation" in series.status.text()  # segmenting waits for that dock
    seg, fine = open_docks(second, "segment", "finetune")
    assert seg.prompt_edit.toPlainText() == "polyp" and seg.model_spec == trained
    assert seg.model_combo.currentData() == trained
    wait_segmented(qtbot, seg, series)  # the waiting request was taken when the dock opened
    labels = second.layers["series labels"]
    assert labels.metadata[layer_keys.MODEL] == trained and series.status.text() == ""
    before = {layer.name for layer in second.layers}
    del labels.metadata[layer_keys.MODEL]
    seg.segment_btn.click()  # pressing Segment writes into the series' labels, never a new layer
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    assert {layer.name for layer in second.layers} == before
    assert labels.metadata[layer_keys.MODEL] == trained


def test_an_older_series_json_without_settings_still_opens(qtbot, make_napari_viewer, tiny_unet, folder):
    out = folder / "vlsm_masks"
    out.mkdir()
    (out / PROGRESS).write_text(json.dumps({"done": [sorted(folder.iterdir())[0].name], "agreements": []}))
    seg, series = open_docks(make_napari_viewer(), "segment", "series", model=tiny_unet, prompt="polyp",
                             order="name")
    open_folder(series, folder)
    assert series.index == 1 and "1 / 5 done" in series.progress.text()
    wait_segmented(qtbot, seg, series)
    series.prev_btn.click()  # no walk kept: back by name
    assert series.index == 0
    assert json.loads((out / PROGRESS).read_text())["settings"]["prompts"] == ["polyp"]


def test_auto_save_writes_only_edits_and_asks_before_replacing_an_earlier_sessions_mask(
        qtbot, make_napari_viewer, tiny_unet, folder, monkeypatch):
    first = make_napari_viewer()
    seg, series = open_docks(first, "segment", "series", model=tiny_unet, prompt="polyp", order="name")
    seg.threshold.setValue(5)  # the random model proposes something
    series.to_training.setChecked(False)
    open_folder(series, folder)
    wait_segmented(qtbot, seg, series)
    s = series.series
    assert series.proposal[1].any()
    series.autosave()
    assert not s.mask_path(0).exists()  # the model's proposal, untouched, is not saved
    stroke(first.layers["series labels"], (40, 40), 2)
    series.autosave()
    assert read_image(s.mask_path(0))[40, 40] == 2  # the annotator's edit is
    series.next_btn.click()
    wait_segmented(qtbot, seg, series)
    stroke(first.layers["series labels"], (60, 60), 2)
    series.next_btn.click()
    wait_segmented(qtbot, seg, series)
    first.close()
    earlier = read_image(s.mask_path(1))

    second = make_napari_viewer()
    seg, series = open_docks(second, "segment", "series")
    series.auto_segment.setChecked(False)
    open_folder(series, folder)
    assert series.index == 2
    series.prev_btn.click()
    assert series.index == 1 and np.array_equal(second.layers["series labels"].data, earlier)
    stroke(second.layers["series labels"], (150, 150), 3)  # an edit of the earlier session's mask
    series.autosave()
    assert np.array_equal(read_image(s.mask_path(1)), earlier) and "not auto-saved" in series.status.text()
    asked = []
    monkeypatch.setattr(series, "_confirm", lambda q: asked.append(q) or False)
    series.prev_btn.click()  # Previous asks the question Save, next asks; No keeps the file and the image
    assert len(asked) == 1 and "was saved before" in asked[0] and series.index == 1
    series.next_btn.click()
    assert len(asked) == 2 and series.index == 1
    second.close()  # closing asks too
    assert len(asked) == 3 and np.array_equal(read_image(s.mask_path(1)), earlier)
    assert not (s.out_dir / ".previous").exists()


def test_previous_goes_back_the_way_the_annotator_walked(qtbot, make_napari_viewer, tiny_unet, folder, monkeypatch):
    """In an order that jumps (the most uncertain first: here the last images by name), Previous
    returns to the image shown before, not to the one before by name; Next then walks forward
    the same way; a reopened series remembers the walk."""
    from napari_vlsm.plugin import series_widget

    class Score:
        def __init__(self, v):
            self.v = v

        def value(self, kind):
            return self.v

    def by_name(backend, paths, prompt, todo, describe=False):  # later names less sure
        for k, path in enumerate(paths):
            yield k, None, Score(float(k)) if todo[k] else None

    monkeypatch.setattr(series_widget, "score_files", by_name)
    viewer = make_napari_viewer()
    seg, series = open_docks(viewer, "segment", "series", model=tiny_unet, prompt="polyp", order="uncertain")
    series.to_training.setChecked(False)
    series.auto_segment.setChecked(False)
    open_folder(series, folder)
    qtbot.waitUntil(lambda: series.scoring is None, timeout=60000)
    walk = [series.index]
    for _ in range(2):
        series.next_btn.click()
        qtbot.waitUntil(lambda: series.scoring is None, timeout=60000)
        walk.append(series.index)
    assert walk == [0, 4, 3]
    series.prev_btn.click()
    assert series.index == 4
    series.prev_btn.click()
    assert series.index == 0
    series.next_btn.click()
    assert series.index == 4  # forward again along the walk
    viewer.close()
    again = make_napari_viewer()
    (series,) = open_docks(again, "series")
    series.auto_segment.setChecked(False)
    open_folder(series, folder)
    assert series.index == 3  # where the walk ended, the first image not done by name being 1
    series.prev_btn.click()
    assert series.index == 4


@pytest.mark.parametrize("order", [("series", "finetune", "segment"), ("finetune", "series", "segment"),
                                   ("segment", "series", "finetune")])
def test_docks_opened_in_any_order_join_as_tabs_with_short_titles(make_napari_viewer, qtbot, order):
    """Opened from the Plugins menu in any order the three docks share one column as tabs
    titled in full, Save, next is on screen, and the model chooser is whole."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    viewer.open_sample("napari-vlsm", "kvasir_polyp")
    opened = dict(zip(order, (viewer.window.add_plugin_dock_widget("napari-vlsm", DOCKS[n]) for n in order)))
    docks = [dock for dock, _ in opened.values()]
    qtbot.waitUntil(lambda: len(window.tabifiedDockWidgets(docks[0])) == 2, timeout=5000)
    qtbot.wait(100)  # the newest tab comes to the front after joining
    assert set(window.tabifiedDockWidgets(docks[0])) == set(docks[1:])
    titles = {dock.windowTitle() for dock in docks}
    assert titles == {"Segment", "Finetune", "Series"}
    bar = next(b for b in window.findChildren(QTabBar) if {b.tabText(i) for i in range(b.count())} == titles)
    for i in range(bar.count()):  # no title cut short
        assert bar.tabRect(i).width() >= bar.fontMetrics().horizontalAdvance(bar.tabText(i)), bar.tabText(i)
    series_dock, series = opened["series"]
    series_dock.raise_()
    qtbot.waitUntil(lambda: series.isVisible() and not series.next_btn.visibleRegion().isEmpty(), timeout=5000)
    button = series.next_btn
    assert button.visibleRegion().boundingRect().width() == button.width()
    seg_dock, seg = opened["segment"]
    seg_dock.raise_()
    qtbot.waitUntil(lambda: seg.isVisible() and not seg.model_combo.visibleRegion().isEmpty(), timeout=5000)
    for widget in (seg.model_combo, seg.browse_btn, seg.segment_btn):
        assert widget.visibleRegion().boundingRect().width() == widget.width()


# ---------- no stale or contradictory status ----------

def test_back_to_the_previous_model_says_which_model_is_in_use(qtbot, make_napari_viewer, tiny_unet, folder,
                                                               tmp_path):
    viewer = make_napari_viewer()
    seg, fine, series = open_docks(viewer, "segment", "finetune", "series", model=tiny_unet, prompt="polyp",
                                   training_folder=tmp_path / "training_set", order="name")
    base = seg.model_spec
    fine.epochs.setValue(1)
    series.train_every.setValue(1)
    series.auto_segment.setChecked(False)
    open_folder(series, folder)
    stroke(viewer.layers["series labels"], (60, 60))
    series.next_btn.click()
    assert "Training on the corrections in the background" in series.training_line.text()
    series.fill_btn.click()  # a quick edit says its own line, and leaves the training line alone
    assert "Training on the corrections in the background" in series.training_line.text()
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    new = fine.state.pending_model
    assert "used from the series' next image" in fine.status.text() and "next image" in series.training_line.text()
    series.train_every.setValue(0)  # no second run
    series.next_btn.click()  # the new model comes in
    assert seg.model_spec == new and "is in use" in fine.status.text()
    fine.back_btn.click()
    assert seg.model_spec != new
    in_use = seg.model_spec
    assert "next image" not in fine.status.text() and f"In use: {in_use}" in fine.status.text()
    assert in_use in series.progress.text()


def test_the_series_says_to_open_the_segmentation_dock_only_until_it_is_open(qtbot, make_napari_viewer, tiny_unet,
                                                                              folder):
    viewer = make_napari_viewer()
    (series,) = open_docks(viewer, "series")
    series.state.set_prompts(["polyp"])  # typed earlier in a dock since closed
    series.state.use_model(str(tiny_unet))
    open_folder(series, folder)
    assert "Text-prompt segmentation" in series.status.text()
    (seg,) = open_docks(viewer, "segment")
    wait_segmented(qtbot, seg, series)
    assert "Text-prompt segmentation" not in series.status.text()


def test_no_estimate_from_a_single_untouched_image(qtbot, make_napari_viewer, tiny_unet, folder):
    seg, series = open_docks(make_napari_viewer(), "segment", "series", model=tiny_unet, prompt="polyp",
                             order="name")
    series.to_training.setChecked(False)
    open_folder(series, folder)
    wait_segmented(qtbot, seg, series)
    series.next_btn.click()  # the proposal accepted as it is: agreement 1.00
    assert "Estimated Dice" not in series.progress.text() and "(1 so far)" in series.progress.text()


def test_an_auto_length_run_counts_steps_and_its_plot_names_only_what_it_draws(qtbot, make_napari_viewer, tiny_unet,
                                                                               tmp_path, polyp_image):
    from napari_vlsm.core.data.training_sets import write_benchmark_example
    from napari_vlsm.core.training.settings import ROUND_STEPS

    seg, fine = open_docks(make_napari_viewer(), "segment", "finetune", model=tiny_unet,
                           training_folder=tmp_path / "set")
    mask = np.zeros(polyp_image.shape[:2], bool)
    mask[60:120, 60:120] = True
    write_benchmark_example(fine.folder, "a", polyp_image, mask, "polyp")
    assert fine.epochs.text() == f"auto ({ROUND_STEPS} steps)"
    seen = []
    job = fine.start()
    job.yielded.connect(lambda ev: seen.append(fine.status.text()) if ev.kind == "epoch" else None)
    qtbot.waitUntil(lambda: len(seen) >= 2, timeout=60000)
    fine.stop()
    qtbot.waitUntil(lambda: fine.worker is None, timeout=60000)
    assert seen[1].startswith(f"Step 2/{ROUND_STEPS}:"), seen[1]
    assert "estimating the time left" in seen[0] and "s left" in seen[1].replace("time left", "")
    legend = fine.plot.legend()  # no validation in a run of one correction: no val Dice in the legend
    assert len(legend) == 1 and legend[0].startswith("loss")


def test_a_fill_that_changes_nothing_says_so(qtbot, make_napari_viewer, tiny_clipseg, polyp_image):
    viewer = make_napari_viewer()
    (seg,) = open_docks(viewer, "segment", model=tiny_clipseg, prompt="polyp")
    viewer.add_image(polyp_image, name="frame")
    seg.threshold.setValue(1)  # a low threshold: the model finds something
    seg.segment_btn.click()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    labels = viewer.layers[-1]
    assert labels.data.any() and "Wrote 1 plane(s)" in seg.status.text()
    seg.mode_combo.setCurrentIndex(seg.mode_combo.findData("fill"))
    seg.target_combo.setCurrentText(labels.name)
    seg.image_combo.setCurrentText("frame")
    seg.segment_btn.click()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    assert "Wrote" not in seg.status.text() and f"Nothing changed in '{labels.name}'" in seg.status.text()


def test_each_series_image_is_fit_to_the_view(make_napari_viewer, tiny_unet, folder):
    viewer = make_napari_viewer()
    (series,) = open_docks(viewer, "series")
    series.auto_segment.setChecked(False)
    open_folder(series, folder)
    fitted = viewer.camera.zoom
    viewer.camera.zoom = fitted * 4
    viewer.camera.center = (0, 10, 10)
    series.next_btn.click()
    assert viewer.camera.zoom == pytest.approx(fitted)
