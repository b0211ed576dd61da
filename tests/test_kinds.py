"""The order by kind of image (core/inference/kinds.py): grouping, typicality and the choice of
the next images, on planted groups and on real images through real tiny models and the docks."""

import csv
import json

import numpy as np
import pytest
import torch

from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.inference.kinds import MIN_GROUP, by_kind, typicality, with_random_checks
from napari_vlsm.core.inference.ordering import order_images
from napari_vlsm.core.inference.predictor import Predictor, pooled_features
from napari_vlsm.core.inference.series import PROGRESS, Series, estimate_of
from napari_vlsm.core.models.loading import load_model

from .conftest import open_docks


def planted(sizes, seed=0, spread=0.05):
    """Points in well-separated groups of the given sizes (group k around 10 * e_k), and the
    index of the point nearest each centre."""
    rng = np.random.default_rng(seed)
    points, group, centre = [], [], []
    for k, n in enumerate(sizes):
        c = np.zeros(len(sizes))
        c[k] = 10.0
        p = c + rng.normal(0, spread, (n, len(sizes)))
        centre.append(len(points) + int(np.argmin(np.linalg.norm(p - c, axis=1))))
        points += list(p)
        group += [k] * n
    return np.array(points), np.array(group), centre


def test_pooled_features_average_each_level_and_give_it_unit_length():
    maps = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = np.ones((2, 5, 7), np.float32) * np.arange(1, 8)
    got = pooled_features([maps, tokens])
    assert got.shape == (2, 3 + 7)
    want = maps.mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(got[:, :3], want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got[:, 3:], axis=1), 1.0, rtol=1e-6)


def test_typicality_is_highest_where_points_crowd():
    points = np.array([[0.0], [0.1], [0.2], [0.3], [5.0]])
    t = typicality(points, neighbours=2)
    assert np.argmax(t) in (1, 2) and np.argmin(t) == 4


def test_the_first_images_cover_each_group_largest_first_by_a_typical_image():
    points, group, centre = planted([30, 20, 10])
    chosen = by_kind(points, np.zeros(len(points), bool), 3)
    assert [group[i] for i in chosen] == [0, 1, 2]
    for i, g in zip(chosen, range(3)):  # from the crowded middle of its group, not its edge
        members = np.flatnonzero(group == g)
        to_centre = np.linalg.norm(points[members] - points[centre[g]], axis=1)
        assert np.linalg.norm(points[i] - points[centre[g]]) <= np.quantile(to_centre, 0.5)


def test_a_group_already_corrected_waits():
    points, group, _ = planted([30, 20, 10])
    done = np.zeros(len(points), bool)
    done[:2] = True  # two of the largest group are corrected
    assert [group[i] for i in by_kind(points, done, 1)] == [1]


def test_outliers_come_after_the_kinds_of_image():
    points, _, _ = planted([20, 20])
    points = np.concatenate([points, [[-50.0, -50.0]]])  # one image unlike any other
    chosen = by_kind(points, np.zeros(len(points), bool), 3)
    assert len(points) - 1 not in chosen and len(set(chosen)) == 3
    assert MIN_GROUP > 1


def test_with_scores_the_least_sure_image_of_each_group_comes():
    points, group, _ = planted([30, 20, 10])
    scores = np.zeros(len(points))
    scores[[5, 6, 7, 40, 55]] = [0.9, 0.95, 0.85, 0.8, 0.7]  # three near copies the model is least sure of
    chosen = by_kind(points, np.zeros(len(points), bool), 3, scores=scores)
    assert chosen == [6, 40, 55]  # one of them, then the other kinds; most uncertain first takes all three


def test_every_image_comes_once_and_no_more_than_there_are():
    points, _, _ = planted([6, 6])
    done = np.zeros(len(points), bool)
    done[3] = True
    chosen = by_kind(points, done, 50)
    assert sorted(chosen) == [i for i in range(12) if i != 3]
    assert by_kind(points, np.ones(len(points), bool), 5) == []
    copies = np.ones((10, 4))  # a folder of one image copied: one kind, every copy still comes
    assert sorted(by_kind(copies, np.zeros(10, bool), 10)) == list(range(10))


@pytest.mark.parametrize("model", ["tiny_unet", "tiny_clipseg"])
def test_the_predictor_describes_real_images_by_its_image_encoder(model, request, kvasir):
    pred = Predictor(load_model(request.getfixturevalue(model), "cpu", "fp32"))
    images = [read_image(p) for p in sorted((kvasir / "images").iterdir())[:3]]
    together = pred.embed(images)
    alone = pred.embed(images[1:2])
    assert together.shape[0] == 3 and together.shape[1] > 0 and np.isfinite(together).all()
    np.testing.assert_allclose(alone[0], together[1], atol=1e-5)
    assert not np.allclose(together[0], together[2])


def open_series(make_napari_viewer, qtbot, model, folder):
    """The segmentation and series docks as napari opens them, ``model`` and "polyp", the
    folder open in the default order (checked to be by kind), its order worked out."""
    viewer = make_napari_viewer()
    seg, series = open_docks(viewer, "segment", "series", model=model, prompt="polyp")
    series.to_training.setChecked(False)
    assert series.order_combo.currentData() == "kinds"  # the default
    series.open(folder)
    qtbot.waitUntil(lambda: series.scoring is None and seg.worker is None, timeout=60000)
    return viewer, seg, series


def test_the_series_goes_to_the_least_sure_image_of_a_kind_not_yet_corrected(
        qtbot, make_napari_viewer, monkeypatch, tiny_unet, kvasir, tmp_path):
    """Through the docks as napari opens them: every image described by the model's encoder,
    the images not done scored, the next three chosen by kind (the least sure of each), Next
    follows them; the default order."""
    from napari_vlsm.core.inference.uncertainty import DEFAULT_SCORE, score_image
    from napari_vlsm.plugin import series_widget

    from .conftest import copy_images

    monkeypatch.setattr(series_widget, "KIND_BATCH", 3)  # 3 a time: a few groups among 12 images
    folder = copy_images(kvasir, tmp_path / "new_images", 12)
    _, _, series = open_series(make_napari_viewer, qtbot, tiny_unet, folder)
    assert set(series.described) == set(range(12))  # done or not, every image is described
    images = sorted(folder.iterdir())
    np.testing.assert_allclose(series.described[5], Predictor(load_model(tiny_unet, "cpu", "fp32")).embed(
        [read_image(images[5])])[0], atol=1e-5)
    emb = np.stack([series.described[i] for i in range(12)])
    shown = np.arange(12) == series.index  # the image shown counts as corrected
    assert set(series.scores) == set(range(12))
    expected = score_image(Predictor(load_model(tiny_unet, "cpu", "fp32"), flip_average=False),
                           read_image(images[7]), "polyp")
    assert series.scores[7] == pytest.approx(expected.value(DEFAULT_SCORE), abs=1e-6)
    assert series.queue == by_kind(emb, shown, 3, scores=[series.scores[i] for i in range(12)])
    assert "more chosen to cover the kinds of image" in series.progress.text()
    first, second = series.queue[:2]
    assert series.next() and series.index == first
    assert series.next() and series.index == second
    series.order_combo.setCurrentIndex(series.order_combo.findData("name"))
    assert series.next_index() == (series.index + 1 if series.index < 11 else None)


def test_kinds_first_then_the_least_sure_and_the_done_last():
    points, group, _ = planted([10, 10])
    scores = np.linspace(0, 1, 20)
    done = np.zeros(20, bool)
    done[[0, 19]] = True
    got = order_images("kinds", done, scores, points, n=2)
    order, drawn = got.rows, got.drawn
    assert got.chosen == 2
    assert sorted(group[order[:2]]) == [0, 1] and order[:2] == by_kind(points, done, 2, scores=scores)
    assert drawn == []
    rest = order[2:-2]
    assert [scores[i] for i in rest] == sorted((scores[i] for i in rest), reverse=True)
    assert sorted(order[-2:]) == [0, 19] and sorted(order) == list(range(20))
    least_sure = list(range(18, 0, -1)) + [19, 0]  # least sure first, done last
    assert order_images("kinds", done, scores, points, n=0).rows == least_sure
    assert order_images("uncertain", done, scores).rows == least_sure
    # eight by kind: the 4th and the 8th drawn at random among the others not done
    got = order_images("kinds", done, scores, points, n=8)
    order, drawn = got.rows, got.drawn
    kinds = by_kind(points, done, 8, scores=scores)
    assert drawn == [order[3], order[7]] and not set(drawn) & (set(kinds) | {0, 19})
    assert [order[k] for k in (0, 1, 2, 4, 5, 6)] == [kinds[k] for k in (0, 1, 2, 4, 5, 6)]
    assert sorted(order) == list(range(20)) and sorted(order[-2:]) == [0, 19]


def test_one_place_in_four_goes_to_an_image_drawn_at_random():
    chosen = list(range(8))
    todo = list(range(100))
    out, drawn = with_random_checks(chosen, todo, seed=3)
    assert len(out) == 8 and len(drawn) == 2 and [out[3], out[7]] == drawn
    assert [out[k] for k in (0, 1, 2, 4, 5, 6)] == [0, 1, 2, 4, 5, 6]
    assert all(d in todo and d not in chosen for d in drawn) and len(set(out)) == 8
    # uniform over the images not chosen: every one of them comes up over many draws
    seen = {d for seed in range(400) for d in with_random_checks(chosen, todo, seed=seed)[1]}
    assert seen == set(range(8, 100))
    assert with_random_checks([0, 1, 2, 3], [0, 1, 2, 3], seed=0) == ([0, 1, 2, 3], [])  # none left to draw


def test_the_stop_estimate_is_read_on_the_images_drawn_at_random():
    agreements = [["a.png", 0.2], ["b.png", 0.9], ["c.png", 0.1], ["d.png", 0.7]]
    assert estimate_of({"agreements": agreements}) == (pytest.approx(0.475), 0)
    assert estimate_of({"agreements": agreements, "checks": ["b.png", "d.png", "z.png"]}) == (pytest.approx(0.8), 2)
    assert estimate_of({}) == (None, 0)


def test_the_series_checks_the_model_on_images_drawn_at_random(
        qtbot, make_napari_viewer, monkeypatch, tiny_unet, kvasir, tmp_path):
    """Through the docks: of the 8 chosen, the 4th and the 8th are drawn at random among the
    others; Next to a drawn image marks it, its save records it in series.json, and the
    estimate is read on it alone; rank reads it the same way."""
    from typer.testing import CliRunner

    from napari_vlsm.cli import app
    from napari_vlsm.plugin import series_widget

    from .conftest import copy_images

    monkeypatch.setattr(series_widget, "KIND_BATCH", 8)
    folder = copy_images(kvasir, tmp_path / "new_images", 12)
    viewer, seg, series = open_series(make_napari_viewer, qtbot, tiny_unet, folder)
    emb = np.stack([series.described[i] for i in range(12)])
    shown = np.arange(12) == series.index
    by_kinds = by_kind(emb, shown, 8, scores=[series.scores[i] for i in range(12)])
    assert len(series.queue) == 8 and series.queue[:3] == by_kinds[:3] and series.queue[4:7] == by_kinds[4:7]
    assert series.drawn == {series.queue[3], series.queue[7]} and not series.drawn & set(by_kinds)
    assert "8 more chosen to cover the kinds of image, 2 of them at random" in series.progress.text()
    labels = viewer.layers["series labels"]
    for _ in range(4):  # the first three by kind, then the first drawn at random
        qtbot.waitUntil(lambda: seg.worker is None and series.proposal is not None, timeout=60000)
        labels.data[0:20, 0:20] = 1  # a correction of the model's proposal
        labels.refresh()
        assert series.next()
    drawn = series.series.images[series.index].name
    assert series.index == series.queue[0] and series.index in series.drawn
    assert "drawn at random, to check the model" in series.progress.text()
    qtbot.waitUntil(lambda: seg.worker is None and series.proposal is not None, timeout=60000)
    labels.data[:] = 0
    labels.data[10:60, 10:60] = 1
    labels.refresh()
    assert series.next()
    progress = json.loads((series.series.out_dir / PROGRESS).read_text())
    assert progress["checks"] == [drawn] and drawn in progress["done"]
    agreement = dict(progress["agreements"])[drawn]
    assert series.series.estimate() == (pytest.approx(agreement), 1)
    assert Series(folder).estimate() == (pytest.approx(agreement), 1)  # reopened, the same
    # one image says little: the dock waits for three drawn at random before it estimates
    assert "estimated once 3 images drawn at random are corrected (1 so far)" in series.progress.text()
    res = CliRunner().invoke(app, ["rank", str(folder), "-p", "polyp", "--model", str(tiny_unet),
                                   "-o", str(tmp_path / "ranked.csv")])
    assert res.exit_code == 0, res.output
    assert f"{agreement:.2f}" in res.output and "last 1 correction of images drawn at random" in res.output
    res = CliRunner().invoke(app, ["rank", str(folder), "-p", "polyp", "--model", str(tiny_unet), "--batch", "4",
                                   "-o", str(tmp_path / "ranked.csv")])
    rows = list(csv.DictReader((tmp_path / "ranked.csv").open()))
    assert [r["chosen"] for r in rows] == ["kind"] * 3 + ["random"] + ["uncertainty"] * 3 + ["done"] * 5
