"""Faults and bad input: one clear line and the right exit code, nothing lost, nothing
written outside --out, and a Predictor that never answers for the wrong image."""

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.training import train as T
from napari_vlsm.core.training.checkpoint import new_run_folder
from napari_vlsm.core.errors import ModelNotFoundError, TrainingError, VLSMError
from napari_vlsm.core.inference.folder_labeling import OutputLock
from napari_vlsm.core.images.imageio import list_images, read_image
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.inference.predictor import Predictor
from napari_vlsm.core.images.preprocess import shrink_for_model
from tests.conftest import cli



# ---------- nothing lost ----------

def test_finetune_never_replaces_an_existing_run_without_resume(tiny_unet, small_benchmark, tmp_path):
    out = tmp_path / "run"
    assert cli("finetune", small_benchmark, "-m", tiny_unet, "-o", out, "--epochs", "1").exit_code == 0
    before = (out / "best" / "model.safetensors").read_bytes()
    res = cli("finetune", small_benchmark, "-m", tiny_unet, "-o", out, "--epochs", "1")
    assert res.exit_code == 2 and "already holds a training run" in res.output and "--resume" in res.output
    assert (out / "best" / "model.safetensors").read_bytes() == before


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261202-101010")
    folders = [new_run_folder(tmp_path / "models") for _ in range(3)]
    assert [f.name for f in folders] == ["finetune-20261202-101010", "finetune-20261202-101010-2",
                                         "finetune-20261202-101010-3"]
    assert all(f.is_dir() and not any(f.iterdir()) for f in folders)


def test_an_interrupted_checkpoint_swap_is_repaired_on_resume(tiny_unet, small_benchmark, tmp_path):
    out = tmp_path / "run"
    list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=1), device="cpu"))
    os.replace(out / "best", out / ".best-old-4242")  # killed between the two renames
    shutil.copytree(out / "last", out / ".last-tmp-abc")  # killed during a save
    events = list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=2), resume=True))
    assert (out / "best" / "config.json").exists() and events[-1].checkpoint == str(out / "best")
    assert not list(out.glob(".*-old-*")) and not list(out.glob(".*-tmp-*"))
    shutil.rmtree(out / "last")
    with pytest.raises(TrainingError, match="no last/ checkpoint"):
        list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=3), resume=True))


def test_a_rename_that_fails_during_the_checkpoint_swap_loses_no_checkpoint(tiny_unet, small_benchmark, tmp_path,
                                                                         monkeypatch):
    out, scores = tmp_path / "run", iter([0.2, 0.5])

    def scripted(*args, **kwargs):
        dice = next(scores)
        return T.Validation(dice, {small_benchmark.name: dice}, None)

    monkeypatch.setattr(T, "validate", scripted)
    list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=1), device="cpu"))
    before = (out / "best" / "model.safetensors").read_bytes()
    real_replace, failed = os.replace, []

    def failing(src, dst, *args, **kwargs):
        if not failed and Path(dst) == out / "best" and "-tmp-" in Path(src).name:
            failed.append(src)
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):  # epoch 2 improves, and its best/ swap fails
        list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=2), resume=True))
    assert failed
    monkeypatch.setattr(os, "replace", real_replace)
    events = list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=2), resume=True))
    assert "already complete" in events[-1].message  # last/ was written before the failure
    meta = json.loads((out / "best" / "training.json").read_text())
    assert meta["epochs_done"] == 1 and meta["best_val_dice"] == 0.2
    assert (out / "best" / "model.safetensors").read_bytes() == before
    assert not list(out.glob(".*-old-*")) and not list(out.glob(".*-tmp-*"))
    load_model(out / "best", "cpu", "fp32")


def test_disk_full_during_segment_keeps_a_whole_report_and_says_what_was_done(tiny_unet, images, tmp_path,
                                                                               monkeypatch):
    import napari_vlsm.core.inference.folder_labeling as batch

    real, calls = batch.write_mask, []

    def full_after_one(path, labels):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(path, labels)

    monkeypatch.setattr(batch, "write_mask", full_after_one)
    out = tmp_path / "out"
    res = cli("segment", images, "-p", "polyp", "-o", out, "-m", tiny_unet)
    assert res.exit_code == 1 and "1 segmented, 0 skipped (mask existed), 2 failed of 3" in res.output
    rows = (out / "segment_report.csv").read_text().splitlines()
    assert len(rows) == 4 and "No space left on device" in rows[2]
    # the report itself cannot be written: the summary still comes, with a one-line error
    monkeypatch.setattr(batch, "atomic_write_text", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
    res = cli("segment", images, "-p", "polyp", "-o", tmp_path / "out2", "-m", tiny_unet)
    assert res.exit_code == 2 and "Stopped:" in res.output and "--resume" in res.output


def test_resume_with_other_prompts_is_refused_and_labels_json_kept(tiny_unet, images, tmp_path):
    out = tmp_path / "out"
    assert cli("segment", images, "-p", "polyp", "-o", out, "-m", tiny_unet).exit_code == 0
    before = (out / "labels.json").read_text()
    res = cli("segment", images, "-p", "polyp", "-p", "instrument", "-o", out, "-m", tiny_unet, "--resume")
    assert res.exit_code == 2 and "--resume; for the new prompts, write to a new --out" in " ".join(res.output.split())
    assert (out / "labels.json").read_text() == before


def test_resume_goes_by_the_report_not_by_file_names(tiny_unet, images, tmp_path, polyp_image):
    Image.fromarray(polyp_image).save(images / "a.bmp")  # same stem as a.jpg
    out = tmp_path / "out"
    assert cli("segment", images, "-p", "polyp", "-o", out, "-m", tiny_unet).exit_code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "a_jpg.png", "b.png", "c.png"]
    (out / "b.png").write_bytes(b"")  # a crash left an empty mask
    res = cli("segment", images, "-p", "polyp", "-o", out, "-m", tiny_unet, "--resume")
    assert "1 segmented, 3 skipped" in res.output
    assert read_image(out / "b.png").shape == polyp_image.shape[:2]


def test_symlinks_in_out_are_replaced_not_followed(tiny_unet, images, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("keep me")
    for name in ("labels.json", "segment_report.csv"):
        (out / name).symlink_to(outside)
    assert cli("segment", images, "-p", "polyp", "-o", out, "-m", tiny_unet).exit_code == 0
    assert outside.read_text() == "keep me"
    assert not (out / "labels.json").is_symlink() and json.loads((out / "labels.json").read_text())["labels"]


def test_files_respect_the_umask(tiny_unet, images, tmp_path):
    old = os.umask(0o022)
    try:
        res = cli("segment", images, "-p", "polyp", "-o", tmp_path / "out", "-m", tiny_unet)
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    written = sorted((tmp_path / "out").iterdir())
    # every file the run writes is there (a mask per image, labels.json, the report), so each mode is checked
    assert [p.name for p in written] == ["a.png", "b.png", "c.png", "labels.json", "segment_report.csv"]
    for p in written:
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_a_second_run_into_the_same_folder_is_told(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(RuntimeError, match="Another napari-vlsm run is writing"):
            with OutputLock(tmp_path):
                pass


# ---------- wrong with no word ----------

def test_a_failed_set_image_leaves_no_image(tiny_unet, polyp_image):
    pred = Predictor(load_model(tiny_unet, device="cpu"))
    pred.set_image(polyp_image)
    bad = polyp_image.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pred.set_image(bad)
    assert not pred.has_image
    with pytest.raises(RuntimeError, match="No image is set"):
        pred.predict("polyp")
    with pytest.raises(ValueError, match="single value"):
        pred.set_image(np.array(3))
    pred.set_image(polyp_image)
    with pytest.raises(ValueError, match="string or a list of strings"):
        pred.predict(None)


def test_a_prompt_longer_than_the_text_encoder_reads_is_said(tiny_unet, polyp_image):
    pred = Predictor(load_model(tiny_unet, device="cpu"))
    pred.set_image(polyp_image)
    with pytest.warns(UserWarning, match="the text encoder reads the first 77"):
        pred.predict("polyp " * 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred.predict("one small pink polyp")


def test_weights_that_do_not_fit_the_config_are_refused(tiny_unet, tmp_path, polyp_image):
    weights = load_file(tiny_unet / "model.safetensors")
    for name, change in (("missing", lambda d: d.pop("head.weight")),
                         ("shape", lambda d: d.update({"head.weight": torch.zeros(3)}))):
        folder = tmp_path / name
        shutil.copytree(tiny_unet, folder)
        d = dict(weights)
        change(d)
        save_file(d, folder / "model.safetensors")
        with pytest.raises(ModelNotFoundError, match="do not match|shapes differ"):
            load_model(folder)
    cut = tmp_path / "cut"
    shutil.copytree(tiny_unet, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    Image.fromarray(polyp_image).save(tmp_path / "frame.png")
    res = cli("segment", tmp_path / "frame.png", "-p", "polyp", "-o", tmp_path / "o", "-m", cut)
    assert res.exit_code == 2 and "cannot be loaded" in res.output and len(res.output.strip().splitlines()) <= 3


def test_nan_weights_give_an_error_not_a_full_mask(tiny_unet, tmp_path, polyp_image):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_unet, folder)
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in load_file(tiny_unet / "model.safetensors").items()}
    save_file(weights, folder / "model.safetensors")
    pred = Predictor(load_model(folder, device="cpu"))
    pred.set_image(polyp_image)
    with pytest.raises(VLSMError, match="NaN or infinite"):
        pred.predict("polyp")


def test_training_on_masks_that_are_all_empty_warns(tiny_unet, polyp_image, tmp_path):
    from napari_vlsm.core.data.training_sets import Example

    ex = Example(polyp_image, np.zeros(polyp_image.shape[:2], np.uint8), {"p1": "polyp"})
    with pytest.warns(UserWarning, match="Every training mask is empty"):
        events = list(T.train(load_model(tiny_unet), [ex], [], tmp_path / "run", T.TrainSettings(epochs=1)))
    assert "every training mask is empty" in events[-1].message


def test_links_and_sub_folders_of_an_input_folder_are_reported(tmp_path, polyp_image):
    folder, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    Image.fromarray(polyp_image).save(folder / "a.png")
    Image.fromarray(polyp_image).save(elsewhere / "secret.png")
    (folder / "outside.png").symlink_to(elsewhere / "secret.png")
    (folder / "inside.png").symlink_to(folder / "a.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "nested").mkdir()
    notes = []
    found = list_images([folder], notes)
    assert [p.name for p in found] == ["a.png", "inside.png", "outside.png"]  # links are read through
    text = "\n".join(notes)
    assert "loop.png: a broken or looping link" in text and "outside" not in text
    assert "1 sub-folder(s) not searched (nested)" in text


# ---------- a message, not a traceback ----------

@pytest.mark.parametrize("setup, args, message", [
    ("file_parent", ["segment", "{img}", "-p", "polyp", "-o", "{file}/sub"], "Cannot write"),
    ("file_parent", ["segment", "{img}", "-p", "polyp", "-o", "{file}"], "Cannot write"),
    ("none", ["segment", "{img}", "-p", "polyp", "-o", "{tmp}/o", "-m", "{model}", "--device", "cuda"],
     "CUDA is not available"),
    ("file_parent", ["export-onnx", "{model}", "{file}/onnx"], "Cannot write"),
    ("empty_ann", ["evaluate", "{tmp}/ds", "-m", "{model}"], "lists no images"),
    ("file_parent", ["finetune", "{tmp}", "-o", "{file}", "-m", "{model}"], "is a file"),
])
def test_bad_arguments_give_one_line(tiny_unet, tmp_path, polyp_image, setup, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    img = tmp_path / "img.png"
    Image.fromarray(polyp_image).save(img)
    (tmp_path / "file").write_text("a file, not a folder")
    if setup == "empty_ann":
        (tmp_path / "ds" / "anns").mkdir(parents=True)
        (tmp_path / "ds" / "anns" / "val.json").write_text("[]")
    subst = {"{img}": str(img), "{file}": str(tmp_path / "file"), "{tmp}": str(tmp_path), "{model}": str(tiny_unet)}
    for k, v in subst.items():
        args = [a.replace(k, v) for a in args]
    res = cli(*args)
    assert res.exit_code == 2 and message in res.output, res.output


# ---------- memory ----------

def test_huge_images_are_reduced_before_any_full_size_copy(tiny_unet):
    big = np.zeros((3000, 2500, 3), np.uint8)
    big[1000:2000, 800:1600] = 255
    small = shrink_for_model(big, 64)
    assert small.shape == (3000 // 19, 2500 // 19, 3) and small.dtype == np.uint8  # factor 2500 // (2 * 64)
    sixteen = (np.arange(3000 * 2500, dtype=np.uint32).reshape(3000, 2500) % 65535).astype(np.uint16)
    assert shrink_for_model(sixteen, 64).dtype == np.uint16
    pred = Predictor(load_model(tiny_unet, device="cpu"))
    pred.set_image(big)
    assert pred.predict("polyp").masks.shape == (1, 3000, 2500)


# ---------- inputs checked before anything is loaded ----------

def test_a_mistyped_input_fails_before_the_model_loads(tmp_path):
    res = CliRunner().invoke(app, ["segment", str(tmp_path / "imgaes"), "-p", "polyp", "-o", str(tmp_path / "o"),
                                   "-m", str(tmp_path / "no_model_here")])
    assert res.exit_code == 2 and "No such file or folder" in res.output and "imgaes" in res.output
    assert "Cannot load model" not in res.output and not (tmp_path / "o").exists()


def test_a_resume_with_other_prompts_is_refused_first_with_advice_that_works(tiny_unet, tmp_path, polyp_image):
    Image.fromarray(polyp_image).save(tmp_path / "a.png")
    out = tmp_path / "o"
    args = ["segment", str(tmp_path / "a.png"), "-o", str(out)]
    assert CliRunner().invoke(app, args + ["-p", "polyp", "-m", str(tiny_unet)]).exit_code == 0
    res = CliRunner().invoke(app, args + ["-p", "tumour", "--resume", "-m", str(tmp_path / "no_model_here")])
    assert res.exit_code == 2 and "Cannot load model" not in res.output
    assert '-p "polyp" --resume' in " ".join(res.output.split())
    again = CliRunner().invoke(app, args + ["-p", "polyp", "--resume", "-m", str(tiny_unet)])
    assert again.exit_code == 0 and "1 skipped" in again.output


def test_a_stack_is_called_a_stack_not_256_channels():
    from napari_vlsm.core.images.preprocess import validate_image

    with pytest.raises(ValueError, match=r"4 planes of 256x256 \(a stack, or channels first\)"):
        validate_image(np.zeros((4, 256, 256), np.uint8))


@pytest.mark.parametrize("command, words", [
    (["finetune"], ["[extra prompts]"]),
    (["segment"], ["ONNX", "report"]),
    (["evaluate"], ["anns/<split>.json", "cuda:1"]),
])
def test_help_says_what_the_options_do(command, words):
    res = CliRunner().invoke(app, command + ["--help"], env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and all(w in text for w in words), text
    assert "training uses" not in text
