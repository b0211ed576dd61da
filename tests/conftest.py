"""Shared fixtures: tiny random models built offline, real images from ../shared/data when it
is there, else from the committed fixture tests/data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_vlsm.core.models import efficientnet_lite
from napari_vlsm.core.models.random_models import TINY_FILM_UNET

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURE_DATA = ROOT / "tests" / "data"  # a few real pairs, committed; see tests/data/README.md


def data_root() -> Path:
    """The full sets in ../shared/data when they are there, else the committed fixture.
    NAPARI_VLSM_TEST_DATA=fixture uses the fixture even where ../shared is (as a fresh clone
    sees it; CI runs the suite both ways)."""
    if os.environ.get("NAPARI_VLSM_TEST_DATA") == "fixture":
        return FIXTURE_DATA
    return SHARED_DATA if (SHARED_DATA / "kvasir_seg" / "anns").exists() else FIXTURE_DATA
SAMPLE_DATA = ROOT / "sample_data"
TINY_UNET = TINY_FILM_UNET
# the EfficientNet-Lite0 encoder has one shape; the text side and the input stay tiny
TINY_EFFICIENTNET_UNET = dict(encoder=efficientnet_lite.NAME, widths=efficientnet_lite.CHANNELS, image_size=64,
                              text_dim=16, text_layers=1, text_heads=2, image_mean=efficientnet_lite.IMAGE_MEAN,
                              image_std=efficientnet_lite.IMAGE_STD)


@pytest.fixture(scope="session")
def tiny_clipseg(tmp_path_factory) -> Path:
    from napari_vlsm.core.models.random_models import build_random_clipseg

    return build_random_clipseg(tmp_path_factory.mktemp("models") / "tiny_clipseg", shape="tiny")


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory) -> Path:
    from napari_vlsm.core.models.random_models import build_random_film_unet

    return build_random_film_unet(tmp_path_factory.mktemp("models") / "tiny_unet", **TINY_UNET)


@pytest.fixture(scope="session")
def tiny_efficientnet_unet(tmp_path_factory) -> Path:
    from napari_vlsm.core.models.random_models import build_random_film_unet

    return build_random_film_unet(tmp_path_factory.mktemp("models") / "tiny_efficientnet_unet",
                                  **TINY_EFFICIENTNET_UNET)


@pytest.fixture(scope="session")
def kvasir() -> Path:
    return data_root() / "kvasir_seg"


@pytest.fixture(scope="session")
def data_sets() -> Path:
    """Folder holding kvasir_seg, clinicdb, bkai_polyp, busi and colonoscopy_negatives."""
    return data_root()


def mean_dice(backend, examples, prompt: str) -> float:
    """Mean Dice of ``backend``'s masks for ``prompt`` on the examples, through the Predictor."""
    from napari_vlsm.core.images.metrics import dice
    from napari_vlsm.core.inference.predictor import Predictor

    pred = Predictor(backend)
    scores = []
    for ex in examples:
        image, truth = ex.load()
        pred.set_image(image)
        scores.append(dice(pred.predict(prompt).masks[0], truth))
    return float(np.mean(scores))


def small_copy(src: Path, out: Path, n_train: int, n_val: int) -> Path:
    """A benchmark-format folder with the first pairs of ``src``'s splits, named like ``out``."""
    for split, n in (("train", n_train), ("val", n_val)):
        entries = json.loads((src / "anns" / f"{split}.json").read_text())[:n]
        # a silently shorter copy passes with ../shared and fails on the fixture: say so here
        assert len(entries) == n, f"{src.name}/{split} has {len(entries)} pairs, the test asks for {n}"
        (out / "anns").mkdir(parents=True, exist_ok=True)
        (out / "anns" / f"{split}.json").write_text(json.dumps(entries))
        for e in entries:
            for sub, key in (("images", "img_name"), ("masks", "mask_name")):
                (out / sub).mkdir(exist_ok=True)
                shutil.copy(src / sub / e[key], out / sub / e[key])
    return out


@pytest.fixture
def small_benchmark(tmp_path, kvasir) -> Path:
    """A benchmark-format folder with 16 real Kvasir training pairs and 4 validation pairs."""
    return small_copy(kvasir, tmp_path / "kvasir_small", 16, 4)


@pytest.fixture
def polyp_image() -> np.ndarray:
    from napari_vlsm.core.images.imageio import read_image

    return read_image(sorted(SAMPLE_DATA.glob("kvasir_seg_*.jpg"))[0])


@pytest.fixture
def torch_load_calls(monkeypatch) -> list:
    """The weights_only argument of every torch.load call from here on (the one pickle read)."""
    import torch

    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def copy_images(src: Path, out: Path, n: int) -> Path:
    """The first ``n`` images of a data set's images/ copied into a new folder ``out``."""
    out.mkdir(parents=True)
    for p in sorted((src / "images").iterdir())[:n]:
        shutil.copy(p, out / p.name)
    return out


class CodeInPickle:
    """Unpickled, it creates ``marker`` (it runs ``open``): a weights file that holds code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def cli(*args):
    """Run the command line with ``args``; whatever it answers, never a traceback."""
    from typer.testing import CliRunner

    from napari_vlsm.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


@pytest.fixture
def images(tmp_path, polyp_image):
    """A folder of three copies of a real polyp frame (a.jpg, b.png, c.png)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.png", "c.png"):
        Image.fromarray(polyp_image).save(folder / name)
    return folder


DOCKS = {"segment": "Text-prompt segmentation", "finetune": "Finetune", "series": "Image series"}  # napari.yaml


def open_docks(viewer, *names, model=None, prompt=None, training_folder=None, order=None, tabify=False):
    """The plugin's docks ``names`` (keys of DOCKS) opened as the Plugins menu opens them
    (napari's add_plugin_dock_widget: each dock gets its own proxy of the viewer), in that
    order, then set up through their own controls: the model added and chosen, the prompt
    typed, the training set's folder, the series' order. Returns the dock widgets."""
    docks = {}
    for name in names:
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-vlsm", DOCKS[name], tabify=tabify)
    seg, fine, series = docks.get("segment"), docks.get("finetune"), docks.get("series")
    if model is not None:
        seg.add_model(str(model))
    if prompt is not None:
        seg.prompt_edit.setPlainText(prompt)
    if training_folder is not None:
        fine.folder_edit.setText(str(training_folder))
        fine.folder_edit.editingFinished.emit()
    if order is not None:
        series.order_combo.setCurrentIndex(series.order_combo.findData(order))
    return [docks[name] for name in names]
