"""Shared fixtures: tiny random models built offline, real images from ../shared/data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_DATA = ROOT / "sample_data"
TINY_UNET = dict(widths=[4, 8, 16], image_size=64, text_dim=16, text_layers=1, text_heads=2)


@pytest.fixture(scope="session")
def tiny_clipseg(tmp_path_factory) -> Path:
    from napari_vlsm.core.random_models import build_random_clipseg

    return build_random_clipseg(tmp_path_factory.mktemp("models") / "tiny_clipseg", "tiny")


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory) -> Path:
    from napari_vlsm.core.random_models import build_random_film_unet

    return build_random_film_unet(tmp_path_factory.mktemp("models") / "tiny_unet", **TINY_UNET)


@pytest.fixture(scope="session")
def kvasir() -> Path:
    path = SHARED_DATA / "kvasir_seg"
    if not path.exists():
        pytest.fail(f"Real test data missing at {path}: the project expects ../shared/data beside it.")
    return path


@pytest.fixture
def small_benchmark(tmp_path, kvasir) -> Path:
    """A benchmark-format folder with 16 real Kvasir training pairs and 4 validation pairs."""
    out = tmp_path / "kvasir_small"
    for split, n in (("train", 16), ("val", 4)):
        entries = json.loads((kvasir / "anns" / f"{split}.json").read_text())[:n]
        (out / "anns").mkdir(parents=True, exist_ok=True)
        (out / "anns" / f"{split}.json").write_text(json.dumps(entries))
        for e in entries:
            for sub, key in (("images", "img_name"), ("masks", "mask_name")):
                (out / sub).mkdir(exist_ok=True)
                shutil.copy(kvasir / sub / e[key], out / sub / e[key])
    return out


@pytest.fixture
def polyp_image() -> np.ndarray:
    from napari_vlsm.core.imageio import read_image

    return read_image(sorted(SAMPLE_DATA.glob("kvasir_seg_*.jpg"))[0])
