import csv
import json
import shutil

import numpy as np
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.images.imageio import read_image

from .conftest import SAMPLE_DATA

runner = CliRunner()


def test_segment_folder_with_two_prompts_and_a_broken_file(tmp_path, tiny_clipseg, kvasir):
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted(SAMPLE_DATA.glob("*.jpg"))[:2]:
        shutil.copy(p, images / p.name)
    import tifffile

    tifffile.imwrite(images / "ct16.tif", (np.random.default_rng(0).random((70, 90)) * 4000).astype(np.uint16))
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    res = runner.invoke(app, ["segment", str(images), str(kvasir / "images" / "cju0qkwl35piu0993l0dewei2.jpg"),
                              "-p", "polyp", "-p", "mucosa", "--model", str(tiny_clipseg), "--out", str(out)])
    assert res.exit_code == 1, res.output  # one file failed, the rest were written
    assert "broken.png" in res.output
    masks = sorted(p.name for p in out.glob("*.png"))
    assert len(masks) == 4 and "broken.png" not in masks
    m = read_image(out / "ct16.png")
    assert m.shape == (70, 90) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1, 2}
    sidecar = json.loads((out / "labels.json").read_text())
    assert sidecar["labels"] == {"1": "polyp", "2": "mucosa"}
    rows = list(csv.DictReader(open(out / "segment_report.csv")))
    assert {r["status"] for r in rows} == {"ok", "failed"}

    # --resume skips what exists (with the prompts the masks were made for); TIFF output on request
    res = runner.invoke(app, ["segment", str(images), "-p", "polyp", "-p", "mucosa", "--model", str(tiny_clipseg),
                              "--out", str(out), "--resume"])
    assert "3 skipped" in res.output
    res = runner.invoke(app, ["segment", str(images / "ct16.tif"), "-p", "polyp", "--model", str(tiny_clipseg),
                              "--out", str(tmp_path / "tif"), "--format", "tif"])
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "tif" / "ct16.tif").shape == (70, 90)


def test_segment_errors_are_messages_not_tracebacks(tmp_path, tiny_clipseg):
    res = runner.invoke(app, ["segment", str(SAMPLE_DATA), "-p", " ", "--model", str(tiny_clipseg), "-o", str(tmp_path)])
    assert res.exit_code == 2 and "prompt is empty" in res.output
    res = runner.invoke(app, ["segment", str(SAMPLE_DATA), "-p", "polyp", "--model", "CIDAS/nope", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "models pull CIDAS/nope" in res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not an exception
    res = runner.invoke(app, ["evaluate", str(SAMPLE_DATA), "--prompt-type", "p0"])
    assert res.exit_code == 2 and "p1 to p9" in res.output


def test_segment_names_prompt_words_the_default_was_never_trained_on(tmp_path):
    frame = sorted(SAMPLE_DATA.glob("kvasir_seg_*.jpg"))[0]
    res = runner.invoke(app, ["segment", str(frame), "-p", "polyp in the nose", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "never trained on the word 'nose'" in res.output and "1 segmented" in res.output
    res = runner.invoke(app, ["segment", str(frame), "-p", "polyp", "-o", str(tmp_path / "again")])
    assert res.exit_code == 0 and "never trained" not in res.output


def test_evaluate_real_validation_images(tmp_path, tiny_unet, kvasir):
    csv_path = tmp_path / "scores.csv"
    res = runner.invoke(app, ["evaluate", str(kvasir), "--model", str(tiny_unet), "--prompt-type", "p6",
                              "--limit", "3", "--csv", str(csv_path)])
    assert res.exit_code == 0, res.output
    assert "mean Dice" in res.output
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 3 and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert all("located in" in r["prompt"] for r in rows)


def test_evaluate_shows_the_scores_when_the_csv_cannot_be_written(tmp_path, tiny_unet, kvasir):
    (tmp_path / "a_file").write_text("")
    res = runner.invoke(app, ["evaluate", str(kvasir), "--model", str(tiny_unet), "--limit", "2",
                              "--csv", str(tmp_path / "a_file" / "scores.csv")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "mean Dice" in res.output and "Could not write the scores" in res.output and "--csv" in res.output


def test_models_lists_default_and_given_folders(tiny_clipseg):
    res = runner.invoke(app, ["models", "--folder", str(tiny_clipseg.parent)])
    assert res.exit_code == 0, res.output
    assert "default" in res.output and "CLIPSeg" in res.output


def test_masks_of_images_sharing_a_name_do_not_overwrite(tmp_path, tiny_unet):
    from PIL import Image

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / sub / "frame.png")
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / "a" / "frame.jpg")
    res = runner.invoke(app, ["segment", str(tmp_path / "a"), str(tmp_path / "b"), "-p", "polyp",
                              "--model", str(tiny_unet), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


def test_a_folder_of_links_is_read_through_and_never_written_through(tmp_path, tiny_unet):
    from napari_vlsm.core.inference.series import Series

    store, links, out = tmp_path / "store", tmp_path / "links", tmp_path / "out"
    store.mkdir()
    links.mkdir()
    out.mkdir()
    for p in sorted(SAMPLE_DATA.glob("*.jpg"))[:2]:
        shutil.copy(p, store / p.name)
        (links / p.name).symlink_to(store / p.name)  # a data set kept as a folder of links
    first = sorted(SAMPLE_DATA.glob("*.jpg"))[0]
    decoy = tmp_path / "decoy.png"
    decoy.write_bytes(b"not to be touched")
    (out / f"{first.stem}.png").symlink_to(decoy)  # a link where a mask goes
    res = runner.invoke(app, ["segment", str(links), "-p", "polyp", "-o", str(out), "-m", str(tiny_unet)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in store.iterdir())
    assert decoy.read_bytes() == b"not to be touched" and not (out / f"{first.stem}.png").is_symlink()
    assert len(Series(links)) == 2  # the image series opens it too


def test_finetune_and_evaluate_each_name_what_their_dice_measures(tmp_path, tiny_unet, small_benchmark):
    res = runner.invoke(app, ["finetune", str(small_benchmark), "--model", str(tiny_unet), "--out",
                              str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "val Dice is training's own check" in text and "'evaluate' scores full-size masks" in text
    res = runner.invoke(app, ["evaluate", str(small_benchmark), "--model", str(tmp_path / "run" / "best"),
                              "--csv", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert "each image asked with its own p1 prompt" in " ".join(res.output.split())


def test_finetune_options_take_their_defaults_from_the_recipe():
    import dataclasses

    import typer

    from napari_vlsm.core.training.settings import TrainSettings

    command = typer.main.get_command(app).commands["finetune"]
    recipe = {f.name: getattr(TrainSettings(), f.name) for f in dataclasses.fields(TrainSettings)}
    options = {("mode" if p.name == "train_mode" else p.name): p.default for p in command.params}
    shared = set(recipe) & set(options) - {"repeat", "synonyms"}  # given as FOLDER=N pairs and a JSON file
    assert {"mode", "batch_size", "patience", "negative_fraction", "schedule", "adapters", "seed"} <= shared
    assert {k: options[k] for k in shared} == {k: recipe[k] for k in shared}
