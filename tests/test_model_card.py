"""The plugin says what a model knows: its card's description, prompts offered as
suggestions, and a hint when nothing is found."""

import json
import shutil
import subprocess
import sys

import numpy as np

from napari_vlsm.core.training import train as T
from napari_vlsm.core.models.loading import default_model_dir
from napari_vlsm.core.models.model_card import CARD_FILE, VOCABULARY, card_for, read_card, unknown_words, unknown_words_note

from .conftest import ROOT as REPO
from .conftest import SHARED_DATA

CARD = {"title": "Test model", "knows": [{"modality": "colonoscopy", "classes": "polyps"},
                                         {"modality": "breast ultrasound", "classes": "tumours"}],
        "suggestions": ["polyp", "breast tumor"]}


def with_card(tiny_unet, tmp_path, card=None):
    folder = tmp_path / "carded"
    shutil.copytree(tiny_unet, folder)
    (folder / CARD_FILE).write_text(json.dumps(card or CARD))
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


def test_words_the_default_model_was_never_trained_on_are_named():
    card = card_for("default")
    assert unknown_words(card, ["polyp in the nose"]) == ["nose"]
    assert unknown_words(card, ["polyps", "breast tumour", "Tumor in the breast ultrasound image.",
                                "lesion in the breast", "one small pink round polyp"]) == []
    assert unknown_words(card, ["Adenoma in the colon", "foot ulcer"]) == ["adenoma", "foot", "ulcer"]
    assert "never trained on the word 'nose'" in unknown_words_note(card, ["polyp in the nose"])
    assert unknown_words_note(card, ["polyp"]) == ""
    assert unknown_words(CARD, ["polyp in the nose"]) == []  # a card without a vocabulary says nothing


def test_the_default_cards_vocabulary_is_what_its_training_drew_from(data_sets, tmp_path):
    sets = [data_sets / n for n in ("kvasir_seg", "clinicdb", "bkai_polyp", "busi", "colonoscopy_negatives", "isic",
                                    "chest_xray", "fetal_head")]
    subprocess.run([sys.executable, str(REPO / "scripts" / "default_model_card.py"), str(tmp_path), *map(str, sets)],
                   check=True, cwd=REPO)
    made, installed = read_card(tmp_path), read_card(default_model_dir())
    assert {"polyp", "tumor", "breast", "ultrasound", "lung", "skin", "melanoma", "fetal", "head", "covid-19"} <= set(
        made[VOCABULARY])
    if data_sets == SHARED_DATA:  # the full training sets: the installed card, exactly
        assert made == installed
    else:  # the committed few pairs: a part of it
        assert set(made[VOCABULARY]) <= set(installed[VOCABULARY])


def test_finetuning_adds_the_words_it_trained_on_to_the_vocabulary(tiny_unet, small_benchmark, tmp_path):
    base = with_card(tiny_unet, tmp_path, {**CARD, VOCABULARY: ["breast", "tumor"]})
    list(T.finetune(str(base), [small_benchmark], tmp_path / "run", T.TrainSettings(epochs=1), device="cpu"))
    words = read_card(tmp_path / "run" / "last")[VOCABULARY]
    assert {"breast", "tumor", "polyp"} <= set(words) and words == sorted(set(words))
    assert unknown_words(read_card(tmp_path / "run" / "last"), ["polyp in the nose"]) == ["nose"]


def test_status_line_names_a_word_the_default_never_saw(qtbot, make_napari_viewer, polyp_image):
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-vlsm", "Text-prompt segmentation")
    viewer.add_image(polyp_image, name="frame")
    seg.prompt_edit.setPlainText("polyp in the nose")
    seg.run()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    text = seg.status.text()
    assert text.startswith("Wrote 1 plane(s)") and "never trained on the word 'nose'" in text, text
    seg.prompt_edit.setPlainText("polyp")
    seg.run()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    assert "never trained" not in seg.status.text()
