"""The correction loop as a person meets it: both widgets opened the way the Plugins menu
opens them (each with its own viewer proxy), Segment, Add, Train, Segment."""

import json
from pathlib import Path

import numpy as np
import pytest

from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.data.training_sets import read_index

from .conftest import open_docks


@pytest.fixture
def menu_widgets(make_napari_viewer, tiny_unet, tmp_path):
    viewer = make_napari_viewer()
    seg, fine = open_docks(viewer, "segment", "finetune", model=tiny_unet, training_folder=tmp_path / "training_set")
    assert seg.viewer is not fine.viewer  # napari hands each dock its own proxy
    return viewer, seg, fine


def segment(qtbot, seg, prompt="polyp"):
    seg.prompt_edit.setPlainText(prompt)
    worker = seg.run()
    assert worker is not None
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    return seg.viewer.layers[-1]


def test_segment_add_train_segment_uses_the_new_model(qtbot, menu_widgets, polyp_image):
    viewer, seg, fine = menu_widgets
    viewer.add_image(polyp_image, name="frame")
    viewer.add_labels(np.zeros((256, 256), np.uint8), name="hidden truth")  # first Labels layer: not the one
    base = seg.model_spec

    labels = segment(qtbot, seg)
    assert labels.metadata["vlsm_model"] == base
    assert labels.metadata["vlsm_prompts"] == ["polyp"] and labels.metadata["vlsm_threshold"] == 0.5
    labels.data[:] = 0
    labels.data[60:180, 70:200] = 1  # the annotator's correction

    # Finetune followed the result just written: Add needs no other control
    assert fine.labels_combo.currentText() == labels.name
    assert fine.image_combo.currentText() == "frame" and fine.prompt_edit.text() == "polyp"
    fine.add_current()
    entries = read_index(fine.folder)
    assert [e["prompts"]["p1"] for e in entries] == ["polyp"]
    stored = read_image(fine.folder / "masks" / entries[0]["mask_name"]) > 0
    assert stored[60:180, 70:200].all() and stored.sum() == 120 * 130

    fine.start()
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    first = seg.model_spec
    assert first != base and Path(first).name == "best" and (Path(first) / "config.json").exists()
    assert fine.back_btn.isEnabled()
    assert "Trained on 1 image" in fine.status.text()

    labels2 = segment(qtbot, seg)
    assert labels2.metadata["vlsm_model"] == first  # the new checkpoint made this mask

    # the next round starts from the active model, and Back returns to the one before it
    fine.add_current()
    fine.start()
    qtbot.waitUntil(lambda: fine.worker is None, timeout=120000)
    second = seg.model_spec
    assert json.loads((Path(second) / "training.json").read_text())["base_model"] == first
    fine.use_previous_model()
    assert seg.model_spec == first


def test_a_mask_from_disk_with_value_255_is_understood(menu_widgets, polyp_image):
    viewer, seg, fine = menu_widgets
    viewer.add_image(polyp_image, name="frame")
    mask = np.zeros((256, 256), np.uint8)
    mask[100:150, 100:150] = 255
    labels = viewer.add_labels(mask, name="from disk")
    viewer.layers.selection.active = labels
    assert fine.labels_combo.currentText() == "from disk"
    fine.prompt_edit.setText("polyp")
    fine.add_current()
    entry = read_index(fine.folder)[0]
    assert (read_image(fine.folder / "masks" / entry["mask_name"]) > 0).sum() == 50 * 50
    assert fine.label_value.value() == 255


def test_storing_an_absent_label_asks_first(menu_widgets, polyp_image, monkeypatch):
    viewer, seg, fine = menu_widgets
    viewer.add_image(polyp_image, name="frame")
    mask = np.zeros((256, 256), np.uint8)
    mask[:20, :20], mask[200:, 200:] = 1, 2
    viewer.layers.selection.active = viewer.add_labels(mask, name="two labels")
    fine.label_value.setValue(3)
    fine.prompt_edit.setText("polyp")
    questions = []
    monkeypatch.setattr(fine, "_confirm", lambda q: questions.append(q) or False)
    fine.add_current()
    assert len(questions) == 1 and "Label 3 is absent" in questions[0]
    assert read_index(fine.folder) == []
    monkeypatch.setattr(fine, "_confirm", lambda q: True)
    fine.add_current()
    entry = read_index(fine.folder)[0]
    assert not read_image(fine.folder / "masks" / entry["mask_name"]).any()  # an empty (negative) example


def test_widget_and_command_line_share_one_recipe(menu_widgets):
    from typer.main import get_command

    from napari_vlsm.cli import app
    from napari_vlsm.core.training.train import TrainSettings

    _, _, fine = menu_widgets
    widget = fine.settings()
    cli = {p.name: p.default for p in get_command(app).commands["finetune"].params}
    defaults = TrainSettings()
    assert widget == defaults
    assert (cli["train_mode"], cli["epochs"], cli["batch_size"], cli["val_fraction"], cli["schedule"],
            cli["replay_fraction"]) == (defaults.mode, defaults.epochs, defaults.batch_size, defaults.val_fraction,
                                        defaults.schedule, defaults.replay_fraction)
