import json
import random

import numpy as np
import pytest

from napari_vlsm.core.images.metrics import dice, iou, mean_scores
from napari_vlsm.core.data.prompts import build_prompt, load_annotations, pick_prompt, prompt_type_of


def test_dice_and_iou_on_hand_made_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True          # 8 pixels
    b[1:3] = True         # 8 pixels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(4 / 12)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0


def test_empty_mask_conventions():
    empty, full = np.zeros((3, 3)), np.ones((3, 3))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0


def test_mean_scores_and_shape_check():
    a = np.ones((2, 2))
    assert mean_scores([(a, a), (a, 1 - a)]) == {"dice": 0.5, "iou": 0.5, "n": 2}
    with pytest.raises(ValueError, match="shape"):
        dice(np.ones((2, 2)), np.ones((3, 3)))


def test_build_prompt_matches_benchmark_templates(kvasir):
    entry = load_annotations(kvasir / "anns" / "val.json")[0]
    p = entry["prompts"]  # "one medium white oval polyp" and friends
    number, size, colour, shape = p["p5"].split()[:4]
    location = p["p6"].split("located in ")[1].replace(" of the image", "")
    desc = p["p7"][0].split(" which is ")[1]
    assert build_prompt("polyp") == p["p1"]
    assert build_prompt("polyp", shape=shape) == p["p2"]
    assert build_prompt("polyp", shape, colour, size, number) == p["p5"]
    assert build_prompt("polyp", shape, colour, size, number, location) == p["p6"]
    assert build_prompt("polyp", description=desc) == p["p7"][0]
    assert build_prompt("polyp", shape, colour, size, number, description=desc) == p["p8"][0]
    assert build_prompt("polyp", shape, colour, size, number, location, desc) == p["p9"][0]
    assert prompt_type_of(number, size, colour, shape, location, desc) == "p9"
    assert prompt_type_of(shape=shape) == "p2"


def test_pick_prompt_is_seeded(kvasir):
    entry = load_annotations(kvasir / "anns" / "train.json")[3]
    a = [pick_prompt(entry, "p8", random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1 and a[0] in entry["prompts"]["p8"]
    assert pick_prompt(entry, "p1") == "polyp"
    with pytest.raises(ValueError, match="p0-p9"):
        pick_prompt(entry, "p12")


def test_bad_annotation_file(tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="benchmark's format"):
        load_annotations(bad)
