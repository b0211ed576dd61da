"""The image series, opened from the Plugins menu with the other two docks: segment, edit,
Next, close and resume, nothing saved is lost; quick mask edits."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_vlsm.core.images import mask_edits
from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.inference.series import Series
from napari_vlsm.core.data.training_sets import read_index

from .conftest import DOCKS, copy_images, open_docks


@pytest.fixture
def folder(tmp_path, kvasir):
    return copy_images(kvasir, tmp_path / "new_images", 5)


@pytest.fixture
def docks(make_napari_viewer, tiny_unet, tmp_path):
    viewer = make_napari_viewer()
    seg, fine, series = open_docks(viewer, "segment", "finetune", "series", model=tiny_unet, prompt="polyp",
                                   training_folder=tmp_path / "training_set",
                                   order="name")  # these walk by name; see test_uncertainty
    return viewer, seg, fine, series


def wait(qtbot, seg):
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)


def test_annotate_five_images_close_and_resume(qtbot, docks, folder, monkeypatch):
    viewer, seg, fine, series = docks
    series.open(folder)
    wait(qtbot, seg)
    labels = viewer.layers["series labels"]
    assert labels.metadata["vlsm_model"] == seg.model_spec  # segmented with the current prompt
    for i in range(3):
        labels.data = np.zeros_like(labels.data)
        labels.data[10 + i:60, 20:90] = 1  # the annotator's correction
        labels.metadata["vlsm_labels"] = {1: "polyp"}
        assert series.next()
        wait(qtbot, seg)
    s = Series(folder)
    assert s.n_done == 3 and "3 / 5 done" in series.progress.text()
    for i in range(3):
        mask = read_image(s.masks[s.images[i]])
        assert mask.shape == (256, 256) and mask[10 + i:60, 20:90].all() and mask.sum() == (50 - i) * 70
    assert json.loads((s.out_dir / "labels.json").read_text())["labels"] == {"1": "polyp"}
    assert len(read_index(fine.folder)) == 3  # each saved pair joined the Finetune training set

    # edits to image 4 are auto-saved without marking it done
    labels.data[100:120, 100:120] = 1
    series.autosave()
    assert read_image(s.masks[s.images[3]])[110, 110] == 1 and Series(folder).n_done == 3

    # close and reopen: resumes at the first image not done, with its auto-saved edits
    series.series.close()
    _, again = viewer.window.add_plugin_dock_widget("napari-vlsm", "Image series", tabify=True)
    again.auto_segment.setChecked(False)
    again.open(folder)
    assert again.index == 3 and viewer.layers["series labels"].data[110, 110] == 1

    # going back shows the saved mask; replacing it asks, and the old one is kept
    again.previous()
    shown = viewer.layers["series labels"]
    assert np.array_equal(shown.data, read_image(s.masks[s.images[2]]))
    shown.data = np.zeros_like(shown.data)
    asked = []
    monkeypatch.setattr(again, "_confirm", lambda q: asked.append(q) or False)
    assert not again.next() and asked and read_image(s.masks[s.images[2]]).any()
    monkeypatch.setattr(again, "_confirm", lambda q: True)
    assert again.next()
    assert not read_image(s.masks[s.images[2]]).any()
    assert read_image(s.out_dir / ".previous" / s.masks[s.images[2]].name).any()


def test_same_names_and_formats_as_the_command_line(folder):
    s = Series(folder)
    assert [m.name for m in s.masks.values()] == [p.stem + ".png" for p in s.images]
    assert s.out_dir == folder / "vlsm_masks"


def test_a_masks_folder_that_holds_the_images_is_refused(folder):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match="would replace the images"):
        Series(folder, out_dir=folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_quick_mask_edits():
    labels = np.zeros((40, 40), np.uint8)
    labels[2:10, 2:10] = 1
    labels[20:30, 20:30] = 1
    labels[24:26, 24:26] = 0  # a hole
    labels[35, 35] = 1        # a speck
    labels[2:5, 30:35] = 2
    kept = mask_edits.keep_piece(labels, (5, 5))
    assert kept[25, 21] == 0 and kept[5, 5] == 1 and kept[3, 31] == 2
    removed = mask_edits.remove_piece(labels, (5, 5))
    assert removed[5, 5] == 0 and removed[21, 21] == 1
    assert mask_edits.fill_holes(labels, 1)[25, 25] == 1
    assert mask_edits.remove_specks(labels, 1, 5)[35, 35] == 0
    with pytest.raises(ValueError, match="no label under"):
        mask_edits.keep_piece(labels, (15, 15))


def test_a_click_edit_in_the_widget_is_one_undo_step(docks, folder):
    viewer, seg, fine, series = docks
    series.auto_segment.setChecked(False)
    series.open(folder)
    layer = viewer.layers["series labels"]
    layer.data[2:10, 2:10] = 1
    layer.data[20:30, 20:30] = 1
    series.apply_at(mask_edits.remove_piece, (5, 5))
    assert layer.data[5, 5] == 0 and layer.data[25, 25] == 1
    layer.undo()
    assert layer.data[5, 5] == 1


def test_training_every_n_images_swaps_the_model_in_between_images(qtbot, docks, folder):
    viewer, seg, fine, series = docks
    series.train_every.setValue(2)
    fine.epochs.setValue(2)
    series.open(folder)
    wait(qtbot, seg)
    base = seg.model_spec
    for _ in range(2):
        viewer.layers["series labels"].data[30:80, 30:80] = 1
        series.next()
        wait(qtbot, seg)
    state = fine.state
    assert fine.worker is not None or state.pending_model  # training started after the second image
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    assert seg.model_spec == base and state.pending_model  # not in the middle of an image
    series.next()
    wait(qtbot, seg)
    assert seg.model_spec == state.last_trained != base
    assert "model: " + seg.model_spec in series.progress.text()
    # a run started from the Finetune dock afterwards is used at once, not from the next image
    first = seg.model_spec
    fine.start()
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    assert seg.model_spec == state.last_trained != first and not state.pending_model


def test_moving_on_while_segmenting_writes_the_result_to_no_other_image(qtbot, docks, folder, monkeypatch):
    """Next or Previous before the running segmentation ends: its result belongs to the image left
    behind, so it is dropped (never written over the mask shown now), and the image shown gets
    its own segmentation."""
    from napari_vlsm.plugin import label_writing

    viewer, seg, fine, series = docks
    written = []
    write = label_writing.write_result
    monkeypatch.setattr(label_writing, "write_result", lambda *a: written.append(a[2].data) or write(*a))
    series.open(folder)
    assert seg.worker is not None  # image 0 is being segmented
    labels = viewer.layers["series labels"]
    labels.data[10:60, 20:90] = 1  # the annotator does not wait for it
    labels.metadata["vlsm_labels"] = {1: "polyp"}
    assert series.next()
    wait(qtbot, seg)  # image 0's run ends, then image 1's runs
    s = Series(folder)
    assert len(written) == 1 and written[0] is labels.data and series.index == 1
    saved0 = read_image(s.masks[s.images[0]])
    assert saved0[10:60, 20:90].all() and saved0.sum() == 50 * 70

    labels.data[:] = 0
    labels.data[100:150, 100:150] = 1
    assert series.next()
    assert seg.worker is not None  # image 2 is being segmented
    series.previous()  # back to image 1, whose saved mask is shown
    wait(qtbot, seg)
    assert len(written) == 1 and "changed while segmenting" in seg.status.text()
    assert np.array_equal(labels.data, read_image(s.masks[s.images[1]]))
    assert labels.data[100:150, 100:150].all() and labels.data.sum() == 50 * 50


def test_revisiting_an_image_replaces_its_training_examples(qtbot, docks, folder, monkeypatch):
    viewer, seg, fine, series = docks
    monkeypatch.setattr(series, "_confirm", lambda q: True)  # yes, replace the saved mask
    series.auto_segment.setChecked(False)
    series.open(folder)
    labels = viewer.layers["series labels"]
    labels.data[10:60, 20:90] = 1
    labels.data[100:120, 100:120] = 2
    labels.metadata["vlsm_labels"] = {1: "polyp", 2: "instrument"}
    assert series.next()
    assert sorted(e["mask_name"] for e in read_index(fine.folder)) == [
        f"{series.series.images[0].stem}-1.png", f"{series.series.images[0].stem}-2.png"]
    series.previous()
    labels.data[labels.data == 2] = 0  # not an instrument after all
    labels.metadata["vlsm_labels"] = {1: "polyp"}
    assert series.next()
    entries = read_index(fine.folder)
    assert [e["mask_name"] for e in entries] == [f"{series.series.images[0].stem}-1.png"]
    assert sorted(p.name for p in (fine.folder / "masks").iterdir()) == [entries[0]["mask_name"]]
    assert fine.examples.count() == 1


@pytest.mark.parametrize("screen", [(1600, 1000), (1500, 950)])
def test_the_three_docks_fit_a_laptop_screen(make_napari_viewer, qtbot, tmp_path, screen):
    """Opened from the Plugins menu one after the other, the docks share tabs: each gets the
    column's full height, so "Save, next" is on screen without scrolling, and no dock is
    narrower than its controls (its buttons are whole, not cut at the side)."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*screen)
    viewer.open_sample("napari-vlsm", "kvasir_polyp")  # long layer names widen the choosers
    opened = [viewer.window.add_plugin_dock_widget("napari-vlsm", DOCKS[name]) for name in ("segment", "finetune", "series")]
    (seg_dock, seg), (fine_dock, fine), (series_dock, series) = opened
    qtbot.waitUntil(lambda: len(window.tabifiedDockWidgets(seg_dock)) == 2, timeout=5000)
    assert set(window.tabifiedDockWidgets(seg_dock)) == {fine_dock, series_dock}
    qtbot.waitUntil(lambda: series.isVisible() and not series.next_btn.visibleRegion().isEmpty(), timeout=5000)
    assert series_dock.height() > 600  # not squeezed into a third of the column
    window.grab().save(str(tmp_path / "docks.png"))
    button = series.next_btn
    assert not button.visibleRegion().isEmpty() and button.visibleRegion().boundingRect().width() == button.width()
    assert window.minimumSizeHint().width() <= screen[0]  # the docks leave room for the canvas
    seg_dock.raise_()
    qtbot.waitUntil(lambda: seg.isVisible() and not seg.cancel_btn.visibleRegion().isEmpty(), timeout=5000)
    for button in (seg.segment_btn, seg.cancel_btn, seg.browse_btn):
        assert button.visibleRegion().boundingRect().width() == button.width(), button.text()
    from qtpy.QtWidgets import QScrollArea

    for dock, _ in opened:  # every dock's controls as wide as its scroll area shows, at most
        area = dock.findChild(QScrollArea)
        assert area.widget().width() <= area.viewport().width(), dock.windowTitle()


def test_images_that_share_a_stem_keep_their_own_training_examples(qtbot, docks, tmp_path, kvasir):
    viewer, seg, fine, series = docks
    folder = tmp_path / "same_stem"
    folder.mkdir()
    first, second = sorted((kvasir / "images").iterdir())[:2]
    shutil.copy(first, folder / "a.png")  # read by content, whatever the name says
    shutil.copy(second, folder / "a.jpg")
    series.auto_segment.setChecked(False)
    series.open(folder)
    boxes = [(slice(10, 60), slice(20, 90)), (slice(100, 140), slice(100, 150))]
    for box in boxes:
        labels = viewer.layers["series labels"]
        labels.data[box] = 1
        labels.metadata["vlsm_labels"] = {1: "polyp"}
        assert series.next()
    entries = read_index(fine.folder)
    assert len(entries) == 2, entries  # the second image's pair did not replace the first's
    stored = [read_image(fine.folder / "masks" / e["mask_name"]) > 0 for e in entries]
    assert sorted(int(m[boxes[0]].all()) for m in stored) == [0, 1]
    assert sorted(int(m[boxes[1]].all()) for m in stored) == [0, 1]


# ---------- nothing the annotator does is lost ----------

def stroke(layer, centre, value, size=9):
    """A brush stroke as the annotator paints it (napari's own paint: one undo step)."""
    layer.brush_size = size
    layer.paint(centre, value)


def test_undo_stays_within_the_image_shown(docks, folder):
    viewer, seg, fine, series = docks
    series.auto_segment.setChecked(False)
    series.open(folder)
    labels = viewer.layers["series labels"]
    stroke(labels, (40, 40), 1)
    labels.metadata["vlsm_labels"] = {1: "polyp"}
    assert series.next()
    assert not labels.data.any()  # image 2 has no mask yet
    for _ in range(3):
        labels.undo()
    for _ in range(3):
        labels.redo()
    assert not labels.data.any()  # image 1's stroke did not come back on image 2
    stroke(labels, (100, 100), 1)
    labels.undo()
    assert not labels.data.any()  # undo of image 2's own stroke still works
    labels.redo()
    assert labels.data[100, 100] == 1


def test_strokes_painted_while_segmenting_are_kept(qtbot, docks, folder):
    viewer, seg, fine, series = docks
    series.open(folder)
    assert seg.worker is not None  # the automatic segmentation of image 1 runs
    labels = viewer.layers["series labels"]
    stroke(labels, (40, 40), 5)  # the annotator does not wait for it
    painted = labels.data == 5
    wait(qtbot, seg)
    assert labels.metadata["vlsm_model"] == seg.model_spec  # the result was written ...
    assert (labels.data[painted] == 5).all()  # ... around the stroke
    assert f"Kept {int(painted.sum())} pixel(s) you edited" in seg.status.text()


@pytest.mark.parametrize("close", ["viewer.close()", "the window's close button"])
def test_closing_napari_saves_the_edits_of_the_image_shown(docks, folder, close):
    viewer, seg, fine, series = docks
    series.auto_segment.setChecked(False)
    series.open(folder)
    stroke(viewer.layers["series labels"], (60, 60), 1)
    path = series.series.mask_path(0)
    assert not path.exists()
    viewer.close() if close == "viewer.close()" else viewer.window._qt_window.close()
    assert read_image(path)[60, 60] == 1
    assert Series(folder).n_done == 0  # saved, not marked done


def test_an_image_emptied_by_the_annotator_is_a_negative_for_its_prompt(docks, folder):
    viewer, seg, fine, series = docks
    series.auto_segment.setChecked(False)
    series.open(folder)
    labels = viewer.layers["series labels"]
    labels.metadata["vlsm_labels"] = {1: "polyp", 2: "instrument"}
    stroke(labels, (40, 40), 1)  # a polyp; no instrument in this image
    assert series.next()
    labels.metadata["vlsm_labels"] = {1: "polyp"}  # a false positive, erased: nothing here
    assert series.next()
    stems = [p.stem for p in series.series.images[:2]]
    entries = {e["mask_name"]: e for e in read_index(fine.folder)}
    assert sorted(entries) == sorted([f"{stems[0]}-1.png", f"{stems[0]}-2.png", f"{stems[1]}-1.png"])
    assert entries[f"{stems[0]}-2.png"]["prompts"]["p1"] == "instrument"
    assert entries[f"{stems[1]}-1.png"]["prompts"]["p1"] == "polyp"
    assert not read_image(fine.folder / "masks" / f"{stems[1]}-1.png").any()
    assert read_image(fine.folder / "masks" / f"{stems[0]}-1.png").any()


def test_replacing_what_this_session_saved_asks_nothing(docks, folder, monkeypatch):
    viewer, seg, fine, series = docks
    asked = []
    monkeypatch.setattr(series, "_confirm", lambda q: asked.append(q) or True)
    series.auto_segment.setChecked(False)
    series.open(folder)
    labels = viewer.layers["series labels"]
    assert series.next()
    stroke(labels, (40, 40), 1)
    series.previous()  # image 2's edits are saved quietly
    assert series.next() and series.index == 1
    stroke(labels, (120, 120), 1)
    assert series.next() and series.index == 2
    assert asked == []  # the file held what this session wrote: nothing of anyone else's is replaced
    saved = read_image(series.series.mask_path(1))
    assert saved[40, 40] == 1 and saved[120, 120] == 1
    assert not (series.series.out_dir / ".previous").exists()


def test_back_to_the_previous_model_sticks_and_trainings_build_on_each_other(qtbot, docks, folder):
    viewer, seg, fine, series = docks
    series.train_every.setValue(1)
    fine.epochs.setValue(1)
    series.auto_segment.setChecked(False)
    series.open(folder)
    base = seg.model_spec
    labels = viewer.layers["series labels"]
    labels.metadata["vlsm_labels"] = {1: "polyp"}

    def annotate_and_next():
        stroke(labels, (60, 60), 1, size=30)
        assert series.next()

    annotate_and_next()  # training 1 starts from the model in use
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    first = fine.state.pending_model
    assert first and seg.model_spec == base  # waits for the next image
    annotate_and_next()  # training 2 starts from the first's model, now in use
    assert seg.model_spec == first
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    second = fine.state.pending_model
    assert json.loads((Path(second) / "training.json").read_text())["base_model"] == first
    fine.use_previous_model()
    assert seg.model_spec == base and not fine.state.pending_model
    annotate_and_next()
    assert seg.model_spec == base  # Back won over the model that was waiting
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)  # the third run, from base
