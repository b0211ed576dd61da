"""Every registered model family passes the same checks: a new family is one module plus one
registry line (core/models/families.py), and this file covers it with no new test code."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.training import train as T
from napari_vlsm.core.models.families import families, family_named
from napari_vlsm.core.file_names import CONFIG
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.models.model_card import CARD_FILE
from napari_vlsm.core.inference.predictor import Predictor

from .conftest import small_copy

NAMES = [f.name for f in families()]
PROMPTS = ["polyp", "breast tumor"]


@pytest.fixture(scope="module", params=NAMES)
def family_folder(request, tmp_path_factory):
    family = family_named(request.param)
    return family, family.build_random(tmp_path_factory.mktemp("families") / family.model_type)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, kvasir):
    return small_copy(kvasir, tmp_path_factory.mktemp("data") / "kvasir_small", 4, 2)


def probs(backend, image, prompts=PROMPTS):
    predictor = Predictor(backend)
    predictor.set_image(image)
    return predictor.predict(prompts).probs


def test_it_is_a_model_folder_of_its_own_type(family_folder):
    family, folder = family_folder
    assert json.loads((folder / CONFIG).read_text())["model_type"] == family.model_type
    assert any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin"))
    backend = load_model(folder, "cpu", "fp32")
    assert backend.name == family.name


def test_it_saves_and_reloads_through_from_pretrained(family_folder, polyp_image, tmp_path):
    _, folder = family_folder
    backend = load_model(folder, "cpu", "fp32")
    backend.save(tmp_path / "again")
    again = load_model(tmp_path / "again", "cpu", "fp32")
    first, second = backend.module.state_dict(), again.module.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    out = probs(again, polyp_image)
    assert out.shape == (2, *polyp_image.shape[:2]) and np.isfinite(out).all()
    np.testing.assert_array_equal(probs(backend, polyp_image), out)


def test_a_new_prompt_on_a_cached_image_runs_no_image_encoder(family_folder, polyp_image, monkeypatch):
    backend = load_model(family_folder[1], "cpu", "fp32")
    predictor = Predictor(backend)
    predictor.set_image(polyp_image)
    calls = []
    encode = backend.encode_image
    monkeypatch.setattr(backend, "encode_image", lambda *a, **k: calls.append(1) or encode(*a, **k))
    first = predictor.predict("polyp").probs
    again = predictor.predict(["breast tumor", "polyp"]).probs
    assert calls == []
    # a batch of two prompts takes other matmul kernels than one: float32 rounding, no more
    np.testing.assert_allclose(again[1], first[0], atol=1e-4)


def weights_changed(before: dict, after: dict, prefixes) -> tuple[bool, bool]:
    """(did any image-encoder weight change, did any other weight change)."""
    moved = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    return any(k.startswith(prefixes) for k in moved), any(not k.startswith(prefixes) for k in moved)


@pytest.mark.parametrize("mode", ["decoder", "full", "lora"])
def test_one_finetuning_step_in_every_mode_the_family_has(family_folder, tiny_set, tmp_path, mode):
    family, folder = family_folder
    settings = T.TrainSettings(mode=mode, epochs=1, batch_size=4, lr=1e-2, seed=0, augment=False)
    run = T.finetune(str(folder), [tiny_set], tmp_path / "run", settings, device="cpu")
    if mode not in family.train_modes:
        with pytest.raises(T.TrainingError, match=f"modes are {', '.join(family.train_modes)}"):
            list(run)
        return
    assert list(run)[-1].kind == "done"
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert set(before) == set(after)  # LoRA merged back: a plain checkpoint of the family
    prefixes = tuple(load_model(folder, "cpu").image_encoder_prefixes)
    encoder_moved, rest_moved = weights_changed(before, after, prefixes)
    assert rest_moved and encoder_moved == (mode != "decoder")
    assert load_model(tmp_path / "run" / "last", "cpu").name == family.name


def test_finetuning_a_folder_that_carries_a_card(family_folder, tiny_set, tmp_path):
    """A card says what the model knows; a class new to it goes to an adapter where the family
    has them, else to the shared recipe (a converted BiomedCLIPSeg used to end in a traceback)."""
    family, folder = family_folder
    carded = shutil.copytree(folder, tmp_path / "carded")
    (carded / CARD_FILE).write_text(json.dumps({"title": "test", "suggestions": ["breast tumor"],
                                                "knows": [{"modality": "ultrasound", "classes": "tumours"}]}))
    settings = T.TrainSettings(epochs=1, batch_size=4, seed=0, augment=False)
    events = list(T.finetune(str(carded), [tiny_set], tmp_path / "run", settings, device="cpu"))
    assert events[-1].kind == "done"
    meta = json.loads((tmp_path / "run" / "last" / "training.json").read_text())
    assert (meta["adapter"] == 1) == family.adapters
    card = json.loads((tmp_path / "run" / "last" / CARD_FILE).read_text())
    assert "breast tumor" in card["suggestions"]
    assert load_model(tmp_path / "run" / "last", "cpu").name == family.name


def test_onnx_export_matches_torch(family_folder, polyp_image, tmp_path):
    _, folder = family_folder
    res = CliRunner().invoke(app, ["export-onnx", str(folder), str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    exported = load_model(tmp_path / "onnx")
    assert exported.name.startswith("ONNX")
    np.testing.assert_allclose(probs(exported, polyp_image), probs(load_model(folder, "cpu", "fp32"), polyp_image),
                               atol=2e-4)


def test_the_plugin_segments_with_it_opened_the_menu_way(qtbot, make_napari_viewer, family_folder, polyp_image):
    family, folder = family_folder
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-vlsm", "Text-prompt segmentation")
    w.add_model(str(folder))
    viewer.add_image(polyp_image, name="frame")
    w.prompt_edit.setPlainText("polyp")
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    (labels,) = [ly for ly in viewer.layers if ly._type_string == "labels"]
    assert labels.data.shape == polyp_image.shape[:2]
    assert labels.metadata["vlsm_model"] == str(folder)
    assert w.session.backend.name == family.name


def test_the_cli_lists_the_registry_and_its_fresh_starts(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    res = CliRunner().invoke(app, ["models", "families"], terminal_width=200)
    assert res.exit_code == 0
    assert {"FiLM-UNet", "CLIPSeg", "CRIS"} <= {f.name for f in families()}
    for family in families():
        assert family.name in res.output and (family.new_spec or "-") in res.output
    res = CliRunner().invoke(app, ["finetune", str(tiny_set), "--model", "new:nothing", "--out", str(tmp_path / "r")],
                             terminal_width=200)
    fresh = [f.new_spec for f in families() if f.new_spec]
    assert res.exit_code != 0 and all(spec in res.output for spec in fresh), res.output
