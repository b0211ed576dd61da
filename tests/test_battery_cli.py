"""Fault battery (issue 39), tracebacks: odd file names, paths with brackets, broken prompts,
options and model folders each give one clear line and exit 2 (or just work), never a
traceback; files written follow the umask."""

import csv
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.training.settings import TrainSettings

runner = CliRunner()


def cli(*args, **kwargs):
    res = runner.invoke(app, [str(a) for a in args], **kwargs)
    assert "Traceback" not in res.output and not isinstance(res.exception, (UnicodeError, AttributeError, KeyError)), \
        res.output
    return res


@pytest.fixture
def frame(tmp_path, polyp_image):
    Image.fromarray(polyp_image).save(tmp_path / "a.png")
    return tmp_path / "a.png"


def test_a_file_name_that_is_not_utf8_is_segmented_reported_and_resumed(tiny_unet, tmp_path, polyp_image):
    folder = tmp_path / "in"
    folder.mkdir()
    odd = folder / os.fsdecode(b"scan\xff.png")  # a name from another system's encoding
    Image.fromarray(polyp_image).save(odd)
    out = tmp_path / "out"
    res = cli("segment", folder, "-p", "polyp", "-m", tiny_unet, "-o", out)
    assert res.exit_code == 0 and "1 segmented" in res.output, res.output
    raw = (out / "segment_report.csv").read_bytes()
    assert b"scan\xff.png" in raw and (out / os.fsdecode(b"scan\xff.png")).exists()
    res = cli("segment", folder, "-p", "polyp", "-m", tiny_unet, "-o", out, "--resume")
    assert res.exit_code == 0 and "1 skipped" in res.output, res.output


def test_paths_with_brackets_are_printed_as_written(tiny_unet, tmp_path, frame):
    out = tmp_path / "res[/x]"
    res = cli("segment", frame, "-p", "polyp", "-m", tiny_unet, "-o", out)
    assert res.exit_code == 0 and f"Masks and labels.json in {out}" in " ".join(res.output.split()), res.output
    assert (out / "a.png").exists()


def test_a_prompt_that_is_not_text_is_a_message(tiny_unet, tmp_path, frame):
    res = cli("segment", frame, "-p", os.fsdecode(b"polyp\xff"), "-m", tiny_unet, "-o", tmp_path / "out")
    assert res.exit_code == 2 and "holds bytes that are not text" in res.output, res.output


@pytest.mark.parametrize("option, words", [
    (["--crop", "-5"], ["--crop"]),
    (["--schedule", "bogus"], ["--schedule is onecycle or plateau, not 'bogus'"]),
])
def test_finetune_options_that_cannot_work_are_refused(tiny_unet, small_benchmark, tmp_path, option, words):
    res = cli("finetune", small_benchmark, "-m", tiny_unet, "-o", tmp_path / "run", "--epochs", "1", *option)
    assert res.exit_code == 2 and all(w in res.output for w in words), res.output
    assert not (tmp_path / "run" / "best").exists()


def test_the_library_refuses_the_same_settings():
    with pytest.raises(ValueError, match="schedule is onecycle or plateau, not 'bogus'"):
        TrainSettings(schedule="bogus")
    with pytest.raises(ValueError, match="crop is the side"):
        TrainSettings(crop=-5)
    assert TrainSettings(crop=0, schedule="plateau").crop == 0


@pytest.mark.parametrize("config", ["{not json", "[1, 2]"])
def test_an_invalid_config_json_is_named(tiny_unet, tmp_path, frame, config):
    model = tmp_path / "model"
    shutil.copytree(tiny_unet, model)
    (model / "config.json").write_text(config)
    res = cli("segment", frame, "-p", "polyp", "-m", model, "-o", tmp_path / "out")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"{model / 'config.json'}" in text and "restore the model's config.json" in text


def test_a_run_folder_given_as_model_says_use_its_best(tiny_unet, tmp_path, frame):
    run = tmp_path / "run"
    shutil.copytree(tiny_unet, run / "best")
    shutil.copytree(tiny_unet, run / "last")
    for args in (["segment", frame, "-p", "polyp", "-o", tmp_path / "out"], ["export-onnx", run, tmp_path / "onnx"]):
        res = cli(*args, *(["-m", run] if args[0] == "segment" else []))
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and f"is a training run, not a model: use {run / 'best'}" in text, text


def test_segment_help_shows_the_extra_to_install():
    res = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "napari-vlsm[distributed]" in res.output


def test_checkpoint_weights_follow_the_umask(tiny_unet, small_benchmark, tmp_path):
    old = os.umask(0o022)
    try:
        res = cli("finetune", small_benchmark, "-m", tiny_unet, "-o", tmp_path / "run", "--epochs", "1")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for sub in ("best", "last"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run" / sub).iterdir() if p.is_file()}
        assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, (sub, modes)
