"""Fault battery (issue 39), API: the library refuses arguments that cannot mean anything,
with a ValueError naming the argument, and the CLI with exit 2."""

import math

import numpy as np
import pytest

from napari_vlsm.core.inference.evaluate import evaluate
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.models.loading import load_model
from tests.conftest import cli



@pytest.fixture(scope="module")
def predictor(tiny_unet):
    return Predictor(load_model(tiny_unet, device="cpu"))


@pytest.mark.parametrize("threshold", [math.nan, 5, -1, "high", None])
def test_a_threshold_outside_0_1_is_refused(predictor, polyp_image, threshold):
    predictor.set_image(polyp_image)
    with pytest.raises(ValueError, match="it must be a probability between 0 and 1"):
        predictor.predict("polyp", threshold=threshold)
    with pytest.raises(ValueError, match="it must be a probability between 0 and 1"):
        predictor.predict_batch([polyp_image], "polyp", threshold=threshold)


def test_thresholds_at_the_ends_are_fine(predictor, polyp_image):
    predictor.set_image(polyp_image)
    assert predictor.predict("polyp", threshold=0).masks.all()
    assert predictor.predict("polyp", threshold=1.0).threshold == 1.0


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_the_cli_refuses_a_nan_threshold_too(tiny_unet, tmp_path, command, kvasir):
    args = ([command, kvasir / "images" / "cju0qkwl35piu0993l0dewei2.jpg", "-p", "polyp", "-o", tmp_path / "o"]
            if command == "segment" else [command, kvasir])
    res = cli(*args, "-m", tiny_unet, "--threshold", "nan")
    assert res.exit_code == 2 and "--threshold" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_a_negative_limit_is_refused(tiny_unet, small_benchmark, tmp_path):
    res = cli("evaluate", small_benchmark, "-m", tiny_unet, "--limit", "-1", "--csv", tmp_path / "s.csv")
    assert res.exit_code == 2 and "--limit" in res.output and not (tmp_path / "s.csv").exists()
    with pytest.raises(ValueError, match="limit is how many images to score"):
        next(evaluate(Predictor(load_model(tiny_unet, device="cpu")), small_benchmark, limit=-1))
    res = cli("evaluate", small_benchmark, "-m", tiny_unet, "--limit", "2", "--csv", tmp_path / "s.csv")
    assert res.exit_code == 0 and len((tmp_path / "s.csv").read_text().splitlines()) == 3
