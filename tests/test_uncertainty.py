"""Uncertainty scores, the rank command and the image series' most-uncertain-first order, with
real tiny models and real images."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.inference.series import PROGRESS, Series
from napari_vlsm.core.inference.ordering import order_images
from napari_vlsm.core.inference.uncertainty import (
    DEFAULT_SCORE,
    ImageScore,
    estimate_dice,
    expected_error,
    most_uncertain_first,
    phrasings,
    score_image,
)
from napari_vlsm.core.models.loading import load_model

from .conftest import copy_images, open_docks


@pytest.fixture
def folder(tmp_path, kvasir):
    return copy_images(kvasir, tmp_path / "new_images", 6)


def test_each_score_is_what_it_says(tiny_unet, polyp_image):
    """Worked out again here from separate predictor calls: the mirror's mask flipped back, the
    other phrasings' masks, the soft pixels among the candidates."""
    pred = Predictor(load_model(tiny_unet, "cpu", "fp32"), flip_average=False)
    threshold = float(np.median(_probs(pred, polyp_image, "polyp")))  # a random model: a threshold with both sides
    got = score_image(pred, polyp_image, "polyp", threshold)
    probs = _probs(pred, polyp_image, "polyp")
    mirrored = _probs(pred, polyp_image[:, ::-1], "polyp")[:, ::-1]
    mask = probs >= threshold  # at the threshold is in, as the predictor's masks
    assert got.flip == pytest.approx(1 - dice(mask, mirrored >= threshold), abs=1e-6)
    others = [1 - dice(mask, _probs(pred, polyp_image, t) >= threshold) for t in phrasings("polyp")[1:]]
    assert got.prompts == pytest.approx(np.mean(others), abs=1e-6)
    candidates = probs > threshold - 0.25
    assert got.margin == pytest.approx(((np.abs(probs - threshold) < 0.25) & candidates).sum() / candidates.sum())
    assert got.area == pytest.approx(mask.mean()) and 0 < got.flip < 1
    both = (probs + mirrored) / 2
    assert got.expected == pytest.approx(np.minimum(both, 1 - both).sum() / max(mask.sum(), 0.01 * mask.size),
                                         rel=1e-5)


def test_expected_error_calls_a_confident_empty_answer_sure_and_a_faint_undrawn_object_unsure():
    """The case the mask-based scores get backwards (docs/corrections.md: COVID-19 infection,
    empty on two thirds of the images): both answers below are empty masks."""
    confident_empty = np.full((100, 100), 0.001, np.float32)
    faint = confident_empty.copy()
    faint[20:50, 20:50] = 0.4  # something seen, not drawn
    sharp = confident_empty.copy()
    sharp[20:50, 20:50] = 0.99  # drawn and sure
    soft_edged = sharp.copy()
    soft_edged[20:50, 20] = soft_edged[20:50, 49] = 0.55
    empty = np.zeros((100, 100), bool)
    drawn = sharp >= 0.5
    scores = {"confident empty": expected_error(confident_empty, empty), "faint": expected_error(faint, empty),
              "sharp": expected_error(sharp, drawn), "soft edged": expected_error(soft_edged, drawn)}
    assert scores["confident empty"] == pytest.approx(10000 * 0.001 / 100, rel=1e-3)  # over the 1% floor: 100 px
    assert scores["faint"] > 30 * scores["confident empty"]  # the mask-based scores rate these two alike
    assert scores["soft edged"] > 2 * scores["sharp"]
    assert most_uncertain_first({k: ImageScore(0, 0, 0, 0, v) for k, v in scores.items()})[0] == "faint"


def _probs(pred, image, prompt):
    pred.set_image(image)
    return pred.predict([prompt]).probs[0]


def test_ordering_and_the_estimate():
    scores = {"a": ImageScore(0.1, 0.5, 0.2, 0.1, 0.0), "b": ImageScore(0.7, 0.1, 0.1, 0.1, 0.0),
              "c": ImageScore(0.3, 0.9, 0.0, 0.1, 0.0)}
    assert most_uncertain_first(scores, "flip") == ["b", "c", "a"]
    assert most_uncertain_first(scores, "prompts") == ["c", "a", "b"]
    with pytest.raises(ValueError, match="expected, flip, prompts, margin"):
        scores["a"].value("entropy")
    assert estimate_dice([]) is None
    assert estimate_dice([0.0] * 5 + [0.8, 0.6], last=2) == pytest.approx(0.7)


def test_rank_writes_the_most_uncertain_first_and_puts_corrected_images_last(tiny_unet, folder, tmp_path):
    images = sorted(folder.iterdir())
    series = Series(folder)
    truth = np.zeros((256, 256), np.uint8)
    truth[50:100, 50:100] = 1
    series.save(0, truth, {1: "polyp"}, done=True, proposal=truth)  # a proposal that needed no correction
    series.save(1, truth, {1: "polyp"}, done=True, proposal=np.zeros_like(truth))  # one that missed it
    progress = json.loads((series.out_dir / PROGRESS).read_text())
    assert progress["agreements"] == [[images[0].name, 1.0], [images[1].name, 0.0]]
    out = tmp_path / "ranked.csv"
    res = CliRunner().invoke(app, ["rank", str(folder), "-p", "polyp", "--model", str(tiny_unet), "-o", str(out),
                                   "--threshold", "0.3", "--order", "uncertain"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == [str(k) for k in range(1, 7)]
    todo = [r for r in rows if r["done"] == "False"]
    assert len(todo) == 4 and rows[-2:] == [r for r in rows if r["done"] == "True"]
    assert [float(r["score"]) for r in todo] == sorted((float(r["score"]) for r in todo), reverse=True)
    assert all(r["score"] == r[DEFAULT_SCORE] for r in rows)
    assert {r["chosen"] for r in todo} == {"uncertainty"}
    assert "Estimated Dice on the images not yet corrected: 0.50" in res.output
    # the default: the first --batch by kind (the series' order), then by uncertainty, done last
    res = CliRunner().invoke(app, ["rank", str(folder), "-p", "polyp", "--model", str(tiny_unet), "-o", str(out),
                                   "--threshold", "0.3", "--batch", "2"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["chosen"] for r in rows] == ["kind"] * 2 + ["uncertainty"] * 2 + ["done"] * 2
    pred = Predictor(load_model(tiny_unet, "cpu", "fp32"))
    described = pred.embed([read_image(p) for p in images])
    by_score = {r["image"]: float(r["score"]) for r in rows}
    expected = order_images("kinds", [i < 2 for i in range(6)], [by_score[str(p)] for p in images], described, n=2)
    assert expected.drawn == []  # one in four: none among two
    assert [r["image"] for r in rows] == [str(images[i]) for i in expected.rows]
    assert "least sure image of each kind of image for the first 2" in res.output
    res = CliRunner().invoke(app, ["rank", str(folder), "-p", "polyp", "--score", "entropy", "-o", str(out)])
    assert res.exit_code != 0 and "--score is one of" in res.output and "Traceback" not in res.output


def test_the_series_goes_to_the_most_uncertain_image_and_rescores_for_a_new_model(
        qtbot, make_napari_viewer, tiny_unet, tiny_efficientnet_unet, folder, tmp_path):
    viewer = make_napari_viewer()
    seg, fine, series = open_docks(viewer, "segment", "finetune", "series", model=tiny_unet, prompt="polyp",
                                   training_folder=tmp_path / "training_set", order="uncertain")
    series.open(folder)
    qtbot.waitUntil(lambda: series.scoring is None and seg.worker is None, timeout=60000)
    assert set(series.scores) == set(range(6))
    expected = score_image(Predictor(load_model(tiny_unet, "cpu", "fp32"), flip_average=False),
                           read_image(sorted(folder.iterdir())[3]), "polyp")
    assert series.scores[3] == pytest.approx(expected.value(DEFAULT_SCORE), abs=1e-6)
    assert "uncertainty" in series.progress.text()
    want = max((i for i in range(6) if i != series.index), key=lambda i: (series.scores[i], -i))
    assert series.next_index() == want
    labels = viewer.layers["series labels"]
    labels.data[0:20, 0:20] = 1  # a correction of the model's proposal
    assert series.next() and series.index == want
    agreement = json.loads((series.series.out_dir / PROGRESS).read_text())["agreements"]
    assert len(agreement) == 1 and 0 <= agreement[0][1] < 1
    # one image's agreement says little: no estimate yet
    assert "Estimated Dice" not in series.progress.text() and "(1 so far)" in series.progress.text()
    for _ in range(2):
        qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
        labels.data[0:20, 0:20] = 1
        assert series.next()
    assert "Estimated Dice on the images not done" in series.progress.text()
    assert "tends to read low" in series.progress.text()  # the corrected images were the hardest
    # a new model (as after "Train every N") is scored again when the next image comes
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    seg.add_model(str(tiny_efficientnet_unet))
    series.show(series.index)
    assert series._scored_with == (str(tiny_efficientnet_unet), "polyp", "uncertain")
    qtbot.waitUntil(lambda: series.scoring is None and len(series.scores) == 3, timeout=60000)
    series.order_combo.setCurrentIndex(series.order_combo.findData("name"))
    assert series.next_index() == (series.index + 1 if series.index < 5 else None)  # name order: the next, or the end
    assert "Estimated Dice" in series.progress.text() and "read low" not in series.progress.text()
