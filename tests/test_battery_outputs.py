"""Fault battery (issue 39), outputs: what a run writes never replaces its inputs, never goes
outside --out, and says how it was made."""

import json

import numpy as np
import pytest

from napari_vlsm.core.images.imageio import read_image
from napari_vlsm.core.inference.folder_labeling import plan_masks
from tests.conftest import cli



def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("case", ["folder", "file", "link"])
def test_an_out_folder_that_holds_an_input_is_refused_and_nothing_is_written(tiny_unet, images, tmp_path, case):
    before = _contents(images)
    if case == "folder":  # segment X -o X
        args = [images, "-o", images]
    elif case == "file":  # segment out/scan.png -o out
        args = [images / "b.png", "-o", images]
    else:  # a folder of links to the images, --out where the images are
        links = tmp_path / "links"
        links.mkdir()
        (links / "b.png").symlink_to(images / "b.png")
        args = [links, "-o", images]
    res = cli("segment", *args, "-p", "polyp", "-m", tiny_unet)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    first = "a.jpg and 2 more" if case == "folder" else "b.png"
    assert "holds the input image" in text and first in text and "Choose another folder for --out" in text
    assert _contents(images) == before  # no mask, no labels.json, no image replaced
    assert read_image(images / "b.png").ndim == 3


def test_the_library_refuses_to_plan_masks_over_the_images(images):
    with pytest.raises(ValueError, match="out_dir .* holds the image .*a.jpg and 2 more"):
        plan_masks(images, sorted(images.iterdir()), "png", False)


def test_an_out_folder_beside_or_below_the_inputs_is_fine(tiny_unet, images, tmp_path):
    res = cli("segment", images, "-p", "polyp", "-m", tiny_unet, "-o", images / "masks")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (images / "masks").glob("*.png")) == ["a.png", "b.png", "c.png"]
    assert read_image(images / "b.png").ndim == 3


def _masks_and_labels(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".json")}


@pytest.mark.parametrize("change, words", [
    (["-p", "instrument"], ['-p "polyp" --resume', "for the new prompts"]),
    (["-p", "polyp", "--threshold", "0.3"], ["--threshold 0.5 --resume", "for the new threshold"]),
    (["-p", "polyp", "-m", "default"], ["made by the model", "for the new model"]),
])
@pytest.mark.parametrize("resume", [False, True])
def test_an_earlier_run_made_otherwise_is_refused_resumed_or_not(tiny_unet, images, tmp_path, change, words,
                                                                 resume):
    out = tmp_path / "out"
    assert cli("segment", images, "-p", "polyp", "-m", tiny_unet, "-o", out).exit_code == 0
    before = _masks_and_labels(out)
    args = ["segment", images, "-o", out, *change] + (["--resume"] if resume else [])
    res = cli(*args, *([] if "-m" in change else ["-m", tiny_unet]))
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and all(w in text for w in words), text
    assert _masks_and_labels(out) == before


def test_the_same_run_goes_on_however_the_model_folder_is_written(tiny_unet, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert cli("segment", images, "-p", "polyp", "-m", tiny_unet, "-o", out).exit_code == 0
    assert json.loads((out / "labels.json").read_text())["model"] == str(tiny_unet.resolve())
    monkeypatch.chdir(tiny_unet.parent)
    res = cli("segment", images, "-p", "polyp", "-m", f"./{tiny_unet.name}", "-o", out, "--resume")
    assert res.exit_code == 0 and "3 skipped" in res.output, res.output
    res = cli("segment", images, "-p", "polyp", "-m", tiny_unet.name, "-o", out)  # redone, as made before
    assert res.exit_code == 0 and "3 segmented" in res.output, res.output
