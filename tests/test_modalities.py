"""Five modalities in one default model (issue 43): folders of several targets on the same images
(chest X-ray lungs and infection), the prompts that choose the target within an image and across
modalities, and what the card says. Real images: the sample data and the val splits of
../shared/data, or the committed fixture."""

import json
import random
from itertools import islice

import numpy as np
import pytest

from napari_vlsm.core.data.concepts import NegativePrompts, absent_concepts
from napari_vlsm.core.data.replay import replay_examples, write_replay_sample
from napari_vlsm.core.data.training_sets import benchmark_examples
from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.models.loading import default_model_dir, load_model
from napari_vlsm.core.models.model_card import read_card

from .conftest import SAMPLE_DATA

LUNGS, INFECTION = "lungs", "COVID-19 lung infection"
# each modality's class prompt and the val folder whose images show it
CLASSES = {"polyp": "kvasir_seg", "Tumor in the breast ultrasound image.": "busi", "skin melanoma": "isic",
           LUNGS: "chest_xray", "fetal head": "fetal_head"}
FOUND = 0.01  # a mask over 1% of the image


@pytest.fixture(scope="module")
def predictor():
    return Predictor(load_model("default", device="cpu"))


def test_a_folder_of_two_targets_per_image_gives_each_row_its_kind(data_sets):
    rows = benchmark_examples(data_sets / "chest_xray", "val")
    kinds = {ex.kind for ex in rows}
    assert kinds == {"chest_xray:lungs", "chest_xray:covid-19 lung infection"}
    assert all(ex.group == "chest_xray" for ex in rows)
    assert {ex.kind for ex in benchmark_examples(data_sets / "isic", "val")} == {"isic"}  # one target: no suffix


def test_a_target_is_never_drawn_as_absent_on_its_own_folders_images(data_sets):
    examples = [ex for s in ("chest_xray", "isic", "busi") for ex in benchmark_examples(data_sets / s, "train")]
    negatives = NegativePrompts(examples, ("p1", "p2", "p3"), [])
    chest_words = {"lungs", "covid-19"}
    rng = random.Random(0)
    for ex in (e for e in examples if e.group == "chest_xray"):
        for _ in range(10):
            drawn = negatives.draw(ex, rng).casefold()
            assert not any(w in drawn for w in chest_words), (ex.kind, drawn)
    infection = next(ex for ex in examples if ex.kind.endswith("infection") and "normal" in ex.name)
    assert "infection" in negatives.own(infection, rng).casefold()  # an empty infection row is asked for the infection
    assert absent_concepts(negatives.concepts, "chest_xray:lungs") == sorted(
        {negatives.concepts["isic"], negatives.concepts["busi"]})
    isic = next(ex for ex in examples if ex.group == "isic")
    drawn = {negatives.draw(isic, rng).casefold() for _ in range(60)}
    assert any("lung" in d for d in drawn) and any("tumor" in d for d in drawn)


def test_the_replay_sample_keeps_each_rows_target(tmp_path, data_sets):
    folder = write_replay_sample([data_sets / "chest_xray"], tmp_path, per_set=6)
    kinds = {ex.kind for ex in replay_examples(folder)}
    assert kinds <= {"chest_xray:lungs", "chest_xray:covid-19 lung infection"} and len(kinds) == 2


def sample(prefix: str, target: str = ""):
    path = next(SAMPLE_DATA.glob(f"{prefix}*.jpg"))
    return read_image(path), read_image(SAMPLE_DATA / "masks" / f"{path.stem}{'_' + target if target else ''}.png") > 127


def test_the_card_names_five_modalities_and_the_replay_holds_every_set():
    card = read_card(default_model_dir())
    modalities = " ".join(k["modality"] for k in card["knows"])
    for word in ("colonoscopy", "breast ultrasound", "dermoscopy", "chest X-ray", "fetal ultrasound"):
        assert word in modalities
    replay = json.loads((default_model_dir() / "replay" / "anns" / "train.json").read_text())
    assert {r["group"] for r in replay} >= {"isic", "chest_xray", "fetal_head"}
    assert load_model("default", device="cpu").takes_clicks


@pytest.mark.parametrize("prefix, target, prompt, bar", [
    # one image each: the fetal sample is a hard one (0.686 for this model, 0.734 for the one
    # before, against 0.954 on all fetal val images: docs/offline_model.md)
    ("isic", "", "skin melanoma", 0.8), ("fetal_head", "", "fetal head", 0.65),
    ("chest_xray", "lungs", LUNGS, 0.85),
    pytest.param("chest_xray", "infection", INFECTION, 0.3, marks=pytest.mark.xfail(
        strict=True, reason="the infection prompt finds nothing yet: val Dice 0 on the COVID images "
                            "(docs/offline_model.md, 'What it still cannot do')"))])
def test_finds_each_new_modalitys_target_in_its_sample(predictor, prefix, target, prompt, bar):
    image, truth = sample(prefix, target)
    predictor.set_image(image)
    assert dice(predictor.predict(prompt).masks[0], truth) > bar


def test_lungs_and_infection_give_different_masks_on_one_xray(predictor):
    image, lungs = sample("chest_xray", "lungs")
    predictor.set_image(image)
    masks = predictor.predict([LUNGS, INFECTION]).masks
    assert dice(masks[0], lungs) > 0.85
    assert masks[1].sum() < 0.6 * masks[0].sum()  # the infection is a part of the lungs, not all of them


def test_the_infection_prompt_on_xrays_without_infection_gives_nothing(predictor, data_sets):
    rows = [ex for ex in benchmark_examples(data_sets / "chest_xray", "val")
            if ex.kind.endswith("infection") and not ex.name.startswith("covid")]
    hits = []
    for ex in islice(rows, 20):
        predictor.set_image(ex.load()[0])
        hits.append(predictor.predict(INFECTION).masks[0].mean() > FOUND)
    assert np.mean(hits) <= 0.25, hits


def cross_rates(predictor, data_sets) -> dict:
    """(class prompt, folder) -> share of 4 val images of that folder (where that class is absent)
    on which the prompt draws a mask over 1% of the image."""
    images = {folder: [ex.load()[0] for ex in islice(
        (e for e in benchmark_examples(data_sets / folder, "val") if e.kind in (folder, f"{folder}:lungs")), 4)]
        for folder in CLASSES.values()}
    drawn = {}
    for folder, ims in images.items():
        others = [p for p, f in CLASSES.items() if f != folder]
        for im in ims:
            predictor.set_image(im)
            for prompt, found in zip(others, predictor.predict(others).masks.mean(axis=(1, 2)) > FOUND):
                drawn.setdefault((prompt, folder), []).append(bool(found))
    return {k: float(np.mean(v)) for k, v in drawn.items()}


def test_no_class_draws_on_another_modalitys_images(predictor, data_sets):
    """Each modality's class prompt on val images of every other modality: (almost) nothing."""
    rate = cross_rates(predictor, data_sets)
    assert np.mean(list(rate.values())) <= 0.05 and max(rate.values()) <= 0.5, rate


def test_the_first_two_modalities_prompts_stay_on_their_images(predictor, data_sets):
    """What the previous default could do holds: the polyp prompt draws on no other modality."""
    rate = cross_rates(predictor, data_sets)
    assert max(v for (p, _), v in rate.items() if p == "polyp") <= 0.25, rate


def test_a_generic_negative_that_names_a_folders_target_is_not_asked_of_its_images(data_sets):
    """The first five-modality run drew 'fetal head' and 'covid-19 infection' from the generic
    negatives on fetal and X-ray images against empty masks: its lungs val Dice was 0.0."""
    examples = [ex for s in ("chest_xray", "fetal_head") for ex in benchmark_examples(data_sets / s, "train")]
    generic = ["fetal head", "lung nodule", "covid-19 infection", "car", "brain tumor"]
    negatives = NegativePrompts(examples, ("p1",), generic)
    rng = random.Random(0)
    fetal = next(ex for ex in examples if ex.group == "fetal_head")
    xray = next(ex for ex in examples if ex.group == "chest_xray")
    on_fetal = {negatives.draw(fetal, rng) for _ in range(80)}
    on_xray = {negatives.draw(xray, rng) for _ in range(80)}
    assert "fetal head" not in on_fetal and {"car", "lung nodule"} <= on_fetal
    assert not on_xray & {"lung nodule", "covid-19 infection"} and "fetal head" in on_xray


def test_repeat_may_name_one_target_of_a_folder(data_sets):
    from napari_vlsm.core.errors import TrainingError
    from napari_vlsm.core.training.train import oversample

    rows = benchmark_examples(data_sets / "chest_xray", "train")
    more = oversample(rows, {"chest_xray:covid-19 lung infection": 2})
    infection = [ex for ex in rows if ex.kind.endswith("infection")]
    assert len(more) == len(rows) + len(infection)
    assert len(oversample(rows, {"chest_xray": 2})) == 2 * len(rows)
    with pytest.raises(TrainingError, match="FOLDER:TARGET"):
        oversample(rows, {"chest_xray:heart": 2})
