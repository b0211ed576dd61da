"""The embedded offline model: present, small, and it finds polyps in real frames."""

import numpy as np
import pytest

from napari_vlsm.core.imageio import read_image
from napari_vlsm.core.loading import default_model_dir, load_model
from napari_vlsm.core.metrics import dice
from napari_vlsm.core.predictor import Predictor

from .conftest import SAMPLE_DATA


@pytest.fixture(scope="module")
def predictor():
    return Predictor(load_model("default", device="cpu"))


def frames():
    for path in sorted(SAMPLE_DATA.glob("*.jpg")):
        yield read_image(path), read_image(SAMPLE_DATA / "masks" / f"{path.stem}.png") > 127


def test_default_is_the_small_offline_model():
    folder = default_model_dir()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 25 * 2**20
    assert (folder / "model.safetensors").exists() and (folder / "training.json").exists()
    assert load_model(None).name == "FiLM-UNet"


def test_finds_polyps_in_real_frames(predictor):
    scores = []
    for image, truth in frames():
        predictor.set_image(image)
        scores.append(dice(predictor.predict("polyp").masks[0], truth))
    # Measured: three frames at Dice 0.92-0.95, clinicdb_529 at 0.58, and the small brown polyp
    # in the top right of kvasir_seg_cju89z6... missed (Dice over all 161 val frames:
    # docs/offline_model.md).
    assert sum(d > 0.9 for d in scores) >= 3 and np.mean(scores) > 0.6, scores


def test_absent_things_give_almost_empty_masks(predictor):
    for image, _ in frames():
        predictor.set_image(image)
        masks = predictor.predict(["skin lesion", "breast tumor", "foot ulcer", "lung opacity"]).masks
        assert masks.mean() < 0.02


def test_demo_without_viewer_writes_the_mask(tmp_path):
    from napari_vlsm.demo import segment_headless

    path = segment_headless("default", tmp_path)
    mask = read_image(path)
    assert mask.shape == (256, 256) and mask.max() == 1  # 0/1 like `segment`
