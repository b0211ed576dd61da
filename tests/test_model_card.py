"""The plugin says what a model knows: its card's description, prompts offered as
suggestions, and a hint when nothing is found."""

import json
import shutil

import numpy as np

from napari_vlsm.core import train as T
from napari_vlsm.core.model_card import CARD_FILE, card_for, read_card

CARD = {"title": "Test model", "knows": [{"modality": "colonoscopy", "classes": "polyps"},
                                         {"modality": "breast ultrasound", "classes": "tumours"}],
        "suggestions": ["polyp", "breast tumor"]}


def with_card(tiny_unet, tmp_path):
    folder = tmp_path / "carded"
    shutil.copytree(tiny_unet, folder)
    (folder / CARD_FILE).write_text(json.dumps(CARD))
    return folder


def test_widget_describes_the_model_and_offers_its_prompts(qtbot, make_napari_viewer, tiny_unet, tmp_path,
                                                          polyp_image):
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-vlsm", "Text-prompt segmentation")
    seg.add_model(str(with_card(tiny_unet, tmp_path)))
    assert "Knows: polyps in colonoscopy; tumours in breast ultrasound" in seg.model_info.text()
    assert [seg.history_combo.itemText(i) for i in range(seg.history_combo.count())] == ["polyp", "breast tumor"]

    viewer.add_image(polyp_image, name="frame")
    seg.threshold.setValue(99)
    seg.prompt_edit.setPlainText("retina vessel")
    seg.run()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    text = seg.status.text()
    assert text.startswith("Nothing above threshold 0.99 (highest probability 0.") and "'retina vessel'" in text
    assert "knows polyps in colonoscopy, tumours in breast ultrasound" in text
    # recent prompts come first, then the suggestions
    assert seg.history_combo.itemText(0) == "retina vessel" and seg.history_combo.count() == 3


def test_the_default_model_has_a_card():
    card = card_for("default")
    modalities = " ".join(k["modality"] for k in card["knows"])
    assert "colonoscopy" in modalities and "ultrasound" in modalities
    assert "polyp" in card["suggestions"]


def test_finetuned_checkpoints_keep_the_card_and_add_the_new_prompts(tiny_unet, small_benchmark, tmp_path):
    base = with_card(tiny_unet, tmp_path)
    list(T.finetune(str(base), [small_benchmark], tmp_path / "run", T.TrainSettings(epochs=1), device="cpu"))
    card = read_card(tmp_path / "run" / "best")
    assert card["knows"] == CARD["knows"] and card["finetuned_on"] == ["polyp"]
    assert card["suggestions"] == ["polyp", "breast tumor"]
    assert np.all([k in card for k in ("title", "knows", "suggestions")])
