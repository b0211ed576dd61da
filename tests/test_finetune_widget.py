"""The Finetune widget: collect corrected masks, train in the background, switch models."""

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.data.training_sets import read_index

from .conftest import open_docks


@pytest.fixture
def widgets(make_napari_viewer, tiny_unet, tmp_path):
    return open_docks(make_napari_viewer(), "segment", "finetune", model=tiny_unet,
                      training_folder=tmp_path / "training_set")


def add_pair(viewer, fine, image, mask, prompt="polyp", name="frame"):
    viewer.add_image(image, name=name)
    labels = viewer.add_labels(mask.astype(np.uint8), name=f"{name} labels")
    fine._refresh_layers()
    fine.image_combo.setCurrentText(name)
    fine.labels_combo.setCurrentText(labels.name)
    fine.label_value.setValue(1)
    fine.prompt_edit.setText(prompt)
    fine.add_current()
    return labels


def test_add_stores_a_copy_and_examples_can_be_pruned(widgets, kvasir, tmp_path):
    seg, fine = widgets
    image = read_image(kvasir / "images" / "cju0qkwl35piu0993l0dewei2.jpg")
    mask = read_image(kvasir / "masks" / "cju0qkwl35piu0993l0dewei2.png") > 127
    labels = add_pair(seg.viewer, fine, image, mask)
    entries = read_index(fine.folder)
    assert len(entries) == 1 and entries[0]["prompts"] == {"p1": "polyp"}
    labels.data[:] = 0  # later edits of the layer must not change the stored example
    stored = read_image(fine.folder / "masks" / entries[0]["mask_name"])
    np.testing.assert_array_equal(stored > 0, mask)
    np.testing.assert_array_equal(read_image(fine.folder / "images" / entries[0]["img_name"]), image)
    assert fine.examples.count() == 1
    fine.examples.item(0).setSelected(True)
    fine.remove_selected()
    assert fine.examples.count() == 0 and read_index(fine.folder) == []
    assert not any((fine.folder / "images").iterdir())


def test_prompt_is_taken_from_the_segmentation_layer(widgets, polyp_image):
    seg, fine = widgets
    seg.viewer.add_image(polyp_image, name="frame")
    labels = seg.viewer.add_labels(np.zeros((256, 256), np.uint8), name="seg")
    labels.metadata["vlsm_labels"] = {1: "one small polyp"}
    fine._refresh_layers()
    fine.labels_combo.setCurrentText("seg")
    fine._suggest_prompt()
    assert fine.prompt_edit.text() == "one small polyp"


def test_train_in_background_then_use_new_model_and_go_back(qtbot, widgets, kvasir):
    seg, fine = widgets
    names = sorted((kvasir / "images").iterdir())[:4]
    for i, img in enumerate(names):
        mask = read_image(kvasir / "masks" / (img.stem + ".png")) > 127
        add_pair(seg.viewer, fine, read_image(img), mask, name=f"f{i}")
    base = seg.model_spec
    fine.mode_combo.setCurrentText("full")
    fine.epochs.setValue(3)
    fine.batch.setValue(2)
    fine.val_share.setValue(0.25)  # below 100 examples the default holds none out
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    assert fine.start() is not None
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    timer.stop()
    assert len(ticks) >= 5
    assert seg.model_spec.endswith("best") and seg.model_spec != base
    assert len(fine.plot.data["loss"]) >= 3 and len(fine.plot.data["val Dice"]) == 3
    fine.use_previous_model()
    assert seg.model_spec == base


def test_stop_keeps_model_in_use_or_last_checkpoint(qtbot, widgets, polyp_image):
    seg, fine = widgets
    mask = np.zeros((256, 256), bool)
    mask[80:160, 80:160] = True
    for i in range(3):
        add_pair(seg.viewer, fine, polyp_image, mask, name=f"f{i}")
    base = seg.model_spec
    fine.epochs.setValue(200)
    fine.batch.setValue(1)
    epochs = []
    job = fine.start()
    job.yielded.connect(lambda ev: epochs.append(ev) if ev.kind == "epoch" else None)
    qtbot.waitUntil(lambda: bool(epochs), timeout=60000)
    fine.stop()
    qtbot.waitUntil(lambda: fine.worker is None, timeout=60000)
    assert "Stopped" in fine.status.text()
    assert seg.model_spec != base and seg.model_spec.endswith("best")  # the last good checkpoint
    from napari_vlsm.core.models.loading import load_model

    load_model(seg.model_spec)


def test_training_errors_are_notifications(qtbot, widgets, monkeypatch):
    seg, fine = widgets
    shown = []
    monkeypatch.setattr("napari_vlsm.plugin.finetune_widget.show_error", shown.append)
    assert fine.start() is None  # empty training set
    assert any("empty" in m for m in shown), shown
    fine.lr.setText("fast")
    fine.start()
    assert any("not a number" in m for m in shown)


def test_closing_napari_during_a_training_run_raises_nothing(qtbot, make_napari_viewer, tiny_unet, tmp_path,
                                                            polyp_image):
    from napari_vlsm.core.data.training_sets import write_benchmark_example

    viewer = make_napari_viewer()
    seg, fine = open_docks(viewer, "segment", "finetune", model=tiny_unet, training_folder=tmp_path / "set")
    mask = np.zeros(polyp_image.shape[:2], bool)
    mask[60:120, 60:120] = True
    write_benchmark_example(fine.folder, "a", polyp_image, mask, "polyp")
    fine.epochs.setValue(50)
    job = fine.start()
    assert job is not None
    qtbot.wait(300)
    viewer.close()  # Qt errors from the run's end reaching deleted widgets would fail this test
    qtbot.waitUntil(lambda: not job.is_running, timeout=120000)
    qtbot.wait(200)
