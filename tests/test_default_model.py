"""The embedded default model: small, offline, and its prompts choose. Real images: the
sample frames, and val images of ../shared/data (or the committed fixture)."""

import json

import numpy as np
import pytest

from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.models.loading import default_model_dir, load_model
from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.data.training_sets import benchmark_examples

from .conftest import SAMPLE_DATA

TUMOUR = "Tumor in the breast ultrasound image."
FOUND = 0.01  # a mask over 1% of the image


@pytest.fixture(scope="module")
def predictor():
    return Predictor(load_model("default", device="cpu"))


def frames(prefix):
    for path in sorted(SAMPLE_DATA.glob(f"{prefix}*.jpg")):
        yield read_image(path), read_image(SAMPLE_DATA / "masks" / f"{path.stem}.png") > 127


def masks_for(predictor, image, prompts):
    predictor.set_image(image)
    return predictor.predict(prompts).masks


def test_default_is_the_small_offline_model_with_its_card_and_replay_sample():
    folder = default_model_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 40 * 2**20
    for name in ("model.safetensors", "training.json", "vlsm_card.json", "replay/anns/train.json"):
        assert (folder / name).exists(), name
    replay = json.loads((folder / "replay" / "anns" / "train.json").read_text())
    assert {r["group"] for r in replay} == {"kvasir_seg", "clinicdb", "bkai_polyp", "busi", "colonoscopy_negatives",
                                            "isic", "chest_xray", "fetal_head"}
    assert load_model(None).name == "FiLM-UNet"


def test_training_json_records_each_data_set_per_epoch():
    history = json.loads((default_model_dir() / "training.json").read_text())["history"]
    assert history and all(set(h["val_dice_by_set"]) >= {"busi"} for h in history)


def test_finds_polyps_and_the_tumour_in_real_images(predictor):
    polyp = [dice(masks_for(predictor, im, "polyp")[0], truth) for im, truth in frames("kvasir_seg")]
    polyp += [dice(masks_for(predictor, im, "polyp")[0], truth) for im, truth in frames("clinicdb")]
    assert np.mean(polyp) > 0.6, polyp
    (image, truth), = frames("busi")
    for prompt in (TUMOUR, "breast tumor", "lesion in the breast"):  # the last two are short forms (synonyms.json)
        assert dice(masks_for(predictor, image, prompt)[0], truth) > 0.5, prompt


def test_prompts_choose_what_to_segment(predictor, data_sets):
    """A prompt for something that is not in the image finds nothing there."""
    (busi_image, _), = frames("busi")
    assert masks_for(predictor, busi_image, "polyp")[0].mean() < FOUND
    polyps = list(frames("kvasir_seg"))
    assert polyps
    for image, _ in polyps:
        assert masks_for(predictor, image, [TUMOUR, "breast tumor"]).mean(axis=(1, 2)).max() < FOUND
    free = benchmark_examples(data_sets / "colonoscopy_negatives", "val")[:20]
    hits = [masks_for(predictor, ex.load()[0], "polyp")[0].mean() > FOUND for ex in free]
    assert np.mean(hits) <= 0.25, hits


def test_demo_without_viewer_writes_the_mask(tmp_path):
    from napari_vlsm.demo import segment_headless

    path = segment_headless("default", tmp_path)
    mask = read_image(path)
    assert mask.shape == (256, 256) and mask.max() == 1  # 0/1 like `segment`


def test_normal_breast_images_asked_for_the_tumour_give_nothing(predictor, data_sets):
    """As a person asks: every image gets the tumour prompt, normal ones included (their own
    p1 is "No tumor ..."): most normal images give nothing. The model before the own-class rule
    masked 7 of the 13 normal val images, the one after it 3, the 28-epoch one 5, the installed one 2
    (docs/offline_model.md)."""
    normal = [ex for ex in benchmark_examples(data_sets / "busi", "val") if "normal" in ex.name]
    assert normal
    hits = [masks_for(predictor, ex.load()[0], [TUMOUR, "breast tumor"]).mean(axis=(1, 2)).max() > FOUND
            for ex in normal]
    assert np.mean(hits) < 0.5, hits
