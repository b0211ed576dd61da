"""Clicks and a box in napari (issue 42): real points in the dock's Points layer and a real
rectangle in its Shapes layer refine the selected label at once, in a worker, as the
Predictor answers the same clicks; in the segmentation dock and in the image series."""

import numpy as np
import pytest
import torch
from napari._qt.qt_viewer import QtViewer
from napari.layers import Labels
from qtpy.QtCore import Qt

from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.models.film_unet import FilmUNetForSegmentation
from napari_vlsm.core.models.loading import load_model, strict_from_pretrained
from napari_vlsm.core.models.random_models import TINY_FILM_UNET, build_random_film_unet

from .conftest import copy_images, open_docks

OBJECT, OTHER = 1, 7


def give_clicks_weight(folder, image) -> None:
    """A random FiLM-UNet's guidance branch starts at zero (it answers as if nothing was
    clicked) and its answer is near 0.5 everywhere: random guidance weights make a click
    change the answer, and a steeper head centred on ``image``'s median makes masks of it."""
    module = strict_from_pretrained(FilmUNetForSegmentation, folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.guide.parameters():
            torch.nn.init.normal_(p, std=3.0)
        module.save_pretrained(folder)
        pred = Predictor(load_model(str(folder)))
        pred.set_image(image)
        median = float(np.median(pred.predict("polyp").probs[0]))
        module.head.bias -= float(np.log(median / (1 - median)))
        module.head.weight *= 50
        module.head.bias *= 50
    module.save_pretrained(folder)


@pytest.fixture(scope="module")
def clicky_unet(tmp_path_factory):
    """A tiny random FiLM-UNet that takes clicks (TINY_FILM_UNET has guidance maps)."""
    from napari_vlsm.core.images.imageio import read_image

    from .conftest import SAMPLE_DATA

    folder = build_random_film_unet(tmp_path_factory.mktemp("models") / "clicky_unet", **TINY_FILM_UNET)
    give_clicks_weight(folder, read_image(sorted(SAMPLE_DATA.glob("kvasir_seg_*.jpg"))[0]))
    return folder


@pytest.fixture
def text_only_unet(tmp_path):
    return build_random_film_unet(tmp_path / "text_only_unet", **{**TINY_FILM_UNET, "guidance": 0})


@pytest.fixture
def dock(make_napari_viewer, clicky_unet):
    (seg,) = open_docks(make_napari_viewer(), "segment", model=clicky_unet)
    return seg


def the_predictor(model, image) -> Predictor:
    pred = Predictor(load_model(str(model)))
    pred.set_image(image)
    return pred


def refined(before, mask, value=OBJECT):
    """The labels a refinement should leave: the object's pixels outside the mask cleared,
    the mask's empty pixels set, every other label as it was."""
    out = before.copy()
    out[(before == value) & ~mask] = 0
    out[(before == 0) & mask] = value
    return out


def wait_answered(qtbot, seg):
    """Until the dock has answered the clicks: nothing waiting, nothing running, a result."""
    qtbot.waitUntil(lambda: not seg._click_timer.isActive() and seg.clicking is None and seg._pending_click is None
                    and seg.status.text().startswith(("Refined", "No clicks", "The model")), timeout=30000)


def frame_with_labels(seg, polyp_image):
    """An image and a Labels layer holding the object (label 1, 'polyp', drawn by hand) and
    another object (label 7) the clicks must never touch; the dock writes into it."""
    viewer = seg.viewer
    viewer.add_image(polyp_image, name="frame")
    before = np.zeros(polyp_image.shape[:2], np.uint8)
    before[100:160, 90:170] = OBJECT
    before[20:90, 20:90] = OTHER
    labels = viewer.add_labels(before.copy(), name="mine")
    labels.metadata["vlsm_labels"] = {OBJECT: "polyp"}
    labels.selected_label = OBJECT
    seg.mode_combo.setCurrentIndex(seg.mode_combo.findData("replace"))
    seg.target_combo.setCurrentText("mine")
    return labels, before


def click(qtbot, seg, points, *rows_cols):
    seg.status.setText("")
    for rc in rows_cols:
        points.add([list(rc)])
    wait_answered(qtbot, seg)


def test_a_click_refines_the_selected_label_as_one_undo_step(qtbot, dock, polyp_image, clicky_unet):
    labels, before = frame_with_labels(dock, polyp_image)
    dock.clicks_btn.click()
    points = dock.viewer.layers["clicks"]
    assert dock.viewer.layers.selection.active.name == "clicks" and points.mode == "add"
    click(qtbot, dock, points, (130, 200))
    pred = the_predictor(clicky_unet, polyp_image)
    mask = pred.predict("polyp", clicks=[(130, 200, True)], previous=before == OBJECT).masks[0]
    expected = refined(before, mask)
    assert (expected != before).sum() > 100 and mask[before == OTHER].any()  # the click changes much, 7 included
    np.testing.assert_array_equal(labels.data, expected)
    assert (labels.data[before == OTHER] == OTHER).all()  # the other object is untouched
    assert dock.status.text().startswith("Refined label 1 ('polyp')")
    labels.undo()  # one step back: the labels as they were
    np.testing.assert_array_equal(labels.data, before)


def test_negative_clicks_from_the_key_and_the_button(qtbot, dock, polyp_image, clicky_unet):
    labels, before = frame_with_labels(dock, polyp_image)
    dock.clicks_btn.click()
    points = dock.viewer.layers["clicks"]
    click(qtbot, dock, points, (130, 200))
    pred = the_predictor(clicky_unet, polyp_image)
    first = pred.predict("polyp", clicks=[(130, 200, True)], previous=before == OBJECT).probs[0]
    after_first = labels.data.copy()

    canvas = dock.window().findChild(QtViewer).canvas.native
    dock.viewer.layers.selection.active = points
    qtbot.keyClick(canvas, "t")  # micro-sam's key: the next click is negative
    assert not points.feature_defaults["positive"][0]
    assert "negative" in dock.sign_btn.text() and not dock.next_positive
    click(qtbot, dock, points, (60, 200))
    assert list(points.features["positive"]) == [True, False]
    assert tuple(points.face_color[0][:3]) != tuple(points.face_color[1][:3])  # green and red
    negative = pred.predict("polyp", clicks=[(130, 200, True), (60, 200, False)], previous=first).masks[0]
    positive = pred.predict("polyp", clicks=[(130, 200, True), (60, 200, True)], previous=first).masks[0]
    assert (negative != positive).sum() > 50  # the sign matters
    np.testing.assert_array_equal(labels.data, refined(after_first, negative))

    dock.sign_btn.click()  # the button toggles back
    assert points.feature_defaults["positive"][0] and "positive" in dock.sign_btn.text()
    qtbot.keyClick(canvas, "t")
    dock.sign_btn.click()
    assert points.feature_defaults["positive"][0]

    written = labels.data.copy()
    qtbot.keyClick(canvas, "C", modifier=Qt.KeyboardModifier.ShiftModifier)  # micro-sam's clear
    assert len(points.data) == 0
    points.add([[30, 30]])
    dock.clear_clicks_btn.click()
    assert len(points.data) == 0
    qtbot.wait(100)
    np.testing.assert_array_equal(labels.data, written)  # clearing the clicks leaves their labels


def test_a_box_from_the_shapes_layer_refines_the_object(qtbot, dock, polyp_image, clicky_unet):
    labels, before = frame_with_labels(dock, polyp_image)
    dock.box_btn.click()
    shapes = dock.viewer.layers["box"]
    assert dock.viewer.layers.selection.active.name == "box" and shapes.mode == "add_rectangle"
    dock.status.setText("")
    shapes.add_rectangles(np.array([[40, 60], [200, 230]]))
    wait_answered(qtbot, dock)
    pred = the_predictor(clicky_unet, polyp_image)
    box = (40.5, 60.5, 200.5, 230.5)  # the rectangle's pixels, from their edges
    mask = pred.predict("polyp", box=box, previous=before == OBJECT).masks[0]
    other = pred.predict("polyp", box=(10.5, 10.5, 60.5, 60.5), previous=before == OBJECT).masks[0]
    assert (mask != other).sum() > 50 and (refined(before, mask) != before).sum() > 50  # where the box is matters
    np.testing.assert_array_equal(labels.data, refined(before, mask))
    assert "with a box" in dock.status.text()


def test_strokes_since_the_last_result_are_kept(qtbot, dock, polyp_image, clicky_unet):
    labels, before = frame_with_labels(dock, polyp_image)
    dock.clicks_btn.click()
    points = dock.viewer.layers["clicks"]
    click(qtbot, dock, points, (130, 200))
    strokes = ((70, 170), OBJECT), ((10, 110), 0)  # the annotator adds a bit the model does not see, erases one
    footprint = Labels(np.zeros_like(before))  # it sees
    for layer in (labels, footprint):
        layer.brush_size = 5
        for centre, value in strokes:
            layer.paint(centre, value if layer is labels else 1)
    touched, painted = footprint.data != 0, labels.data.copy()
    click(qtbot, dock, points, (150, 60))
    pred = the_predictor(clicky_unet, polyp_image)
    mask = pred.predict("polyp", clicks=[(130, 200, True), (150, 60, True)], previous=painted == OBJECT).masks[0]
    assert not mask[70, 170] and mask[10, 110]  # without the strokes kept, both would be lost
    assert labels.data[70, 170] == OBJECT and labels.data[10, 110] == 0
    np.testing.assert_array_equal(labels.data, np.where(touched, painted, refined(painted, mask)))
    assert "Kept" in dock.status.text()


def test_a_click_on_a_stack_refines_the_plane_shown_into_a_new_layer(qtbot, dock, polyp_image, clicky_unet):
    viewer = dock.viewer
    stack = np.stack([polyp_image[..., 0], polyp_image[..., 1], polyp_image[..., 2]])
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    assert dock.mode == "new"  # no result yet: the clicks make a Labels layer of their own
    dock.clicks_btn.click()
    points = viewer.layers["clicks"]
    assert points.ndim == 3
    click(qtbot, dock, points, (0, 60, 60))  # on another plane: not this one's
    assert dock.status.text().startswith("No clicks")
    click(qtbot, dock, points, (1, 120, 130))
    labels = viewer.layers["stack · clicks"]
    pred = the_predictor(clicky_unet, stack[1])
    mask = pred.predict("", clicks=[(120, 130, True)]).masks[0]  # the thing clicked, nothing before
    assert mask.any()
    np.testing.assert_array_equal(labels.data[1], mask.astype(labels.data.dtype))
    assert not labels.data[0].any() and not labels.data[2].any()
    assert viewer.layers.selection.active.name == "clicks"  # the next click goes on the points
    labels.undo()
    assert not labels.data.any()


def test_the_latest_click_wins(qtbot, dock, polyp_image, clicky_unet, monkeypatch):
    import time

    labels, before = frame_with_labels(dock, polyp_image)
    calls = []
    refine = dock.session.refine

    def slow(*args):
        calls.append(args[5])  # the clicks
        time.sleep(0.5)
        return refine(*args)

    monkeypatch.setattr(dock.session, "refine", slow)
    dock.clicks_btn.click()
    points = dock.viewer.layers["clicks"]
    dock.status.setText("")
    points.add([[130, 200]])
    qtbot.waitUntil(lambda: dock.clicking is not None)
    points.add([[60, 200]])
    qtbot.waitUntil(lambda: dock._pending_click is not None)
    points.add([[150, 60]])
    qtbot.waitUntil(lambda: len(dock._pending_click["clicks"]) == 3)
    wait_answered(qtbot, dock)
    assert [len(c) for c in calls] == [1, 3]  # the middle request was replaced while it waited
    pred = the_predictor(clicky_unet, polyp_image)
    mask = pred.predict("polyp", clicks=[(130, 200, True), (60, 200, True), (150, 60, True)],
                        previous=before == OBJECT).masks[0]
    np.testing.assert_array_equal(labels.data, refined(before, mask))  # the first answer was dropped
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)


def test_a_text_only_model_disables_the_click_tools(qtbot, dock, polyp_image, text_only_unet):
    labels, before = frame_with_labels(dock, polyp_image)
    assert dock.clicks_group.isEnabled() and "T:" in dock.clicks_btn.toolTip()
    dock.clicks_btn.click()
    points = dock.viewer.layers["clicks"]
    dock.add_model(str(text_only_unet))
    assert not dock.clicks_group.isEnabled()
    for widget in (dock.clicks_group, dock.clicks_btn, dock.box_btn, dock.sign_btn, dock.clear_clicks_btn):
        assert "takes text prompts only" in widget.toolTip()
    click(qtbot, dock, points, (130, 200))  # a click on the layer left from before does nothing
    np.testing.assert_array_equal(labels.data, before)
    assert "takes text prompts only" in dock.status.text()


@pytest.fixture
def series_docks(make_napari_viewer, clicky_unet, tmp_path, kvasir):
    viewer = make_napari_viewer()
    seg, fine, series = open_docks(viewer, "segment", "finetune", "series", model=clicky_unet, prompt="polyp",
                                   training_folder=tmp_path / "training_set", order="name")
    return viewer, seg, series, copy_images(kvasir, tmp_path / "images", 3)


def test_the_series_keeps_each_images_clicks_over_next_and_back(qtbot, series_docks, clicky_unet):
    viewer, seg, series, folder = series_docks
    series.open(folder)
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    labels = viewer.layers["series labels"]
    seg.clicks_btn.click()
    points = viewer.layers["clicks"]
    click(qtbot, seg, points, (100, 100))
    first = labels.data.copy()
    assert series.next()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    assert len(points.data) == 0  # a fresh image: no clicks
    seg.set_next_sign(False)
    click(qtbot, seg, points, (50, 60))
    second = labels.data.copy()

    series.previous()
    assert seg.clicking is None and seg._pending_click is None  # showing its clicks refines nothing
    np.testing.assert_array_equal(points.data, [[100, 100]])
    assert list(points.features["positive"]) == [True]
    np.testing.assert_array_equal(labels.data, first)
    assert series.next()
    np.testing.assert_array_equal(points.data, [[50, 60]])
    assert list(points.features["positive"]) == [False]
    np.testing.assert_array_equal(labels.data, second)

    seg.set_next_sign(True)  # a click added on the image shown refines with its kept clicks
    click(qtbot, seg, points, (150, 150))
    image = np.asarray(viewer.layers["series image"].data)
    pred = the_predictor(clicky_unet, image)
    mask = pred.predict("polyp", clicks=[(50, 60, False), (150, 150, True)], previous=second == 1).masks[0]
    np.testing.assert_array_equal(labels.data, refined(second, mask))


def test_an_images_clicks_are_kept_in_series_json_and_come_back_in_a_new_session(qtbot, series_docks, clicky_unet,
                                                                                make_napari_viewer):
    import json

    from napari_vlsm.core.inference.series import PROGRESS

    viewer, seg, series, folder = series_docks
    series.open(folder)
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    seg.clicks_btn.click()
    points = viewer.layers["clicks"]
    click(qtbot, seg, points, (100, 100))
    seg.set_next_sign(False)
    click(qtbot, seg, points, (40, 30))
    first = viewer.layers["series labels"].data.copy()
    first_name = series.series.images[0].name
    assert series.next()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=60000)
    kept = json.loads((series.series.out_dir / PROGRESS).read_text())["clicks"]
    assert kept == {first_name: {"points": [[100.0, 100.0], [40.0, 30.0]], "positive": [True, False], "boxes": []}}

    viewer2 = make_napari_viewer()  # the next day: the folder opened again in a new window
    seg2, series2 = open_docks(viewer2, "segment", "series", model=clicky_unet, prompt="polyp", order="name")
    series2.open(folder)
    qtbot.waitUntil(lambda: seg2.worker is None, timeout=60000)
    assert series2.series.images[series2.index].name != first_name  # it resumes at the first image not done
    series2.previous()
    qtbot.waitUntil(lambda: seg2.worker is None, timeout=60000)
    points2 = viewer2.layers["clicks"]
    np.testing.assert_array_equal(points2.data, [[100, 100], [40, 30]])
    assert list(points2.features["positive"]) == [True, False]
    np.testing.assert_array_equal(viewer2.layers["series labels"].data, first)  # its saved mask, not refined again


def test_clicks_on_a_label_whose_words_found_nothing_refine_with_the_empty_prompt(qtbot, dock, polyp_image,
                                                                                  clicky_unet, monkeypatch):
    """On a kind of image the model does not know, its prompt finds nothing, and a model that
    reads an unknown class as absent answers clicks asked with those words with nothing too
    (the leave-out base: Dice 0.000 for text + clicks on all three unseen sets)."""
    labels, before = frame_with_labels(dock, polyp_image)
    asked = []
    real = dock.session.refine
    monkeypatch.setattr(dock.session, "refine", lambda *a: asked.append(a[4]) or real(*a))
    dock.clicks_btn.click()
    points = dock.viewer.layers["clicks"]
    click(qtbot, dock, points, (130, 130))
    assert asked == ["polyp"]  # the label shows its object: its words go with the clicks

    nothing = np.where(before == OBJECT, 0, before)
    labels.data = nothing  # the text found nothing for label 1
    click(qtbot, dock, points, (140, 140))
    assert asked[-1] == ""
    mask = the_predictor(clicky_unet, polyp_image).predict("", clicks=[(130, 130, True), (140, 140, True)]).masks[0]
    np.testing.assert_array_equal(labels.data, refined(nothing, mask))
    assert "no words" in dock.status.text()
