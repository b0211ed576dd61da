"""Fault battery (issue 39), training: a diverged model is never kept as best/, and options
that cannot work are refused with one line."""

import json
import shutil

import numpy as np
import pytest
import torch

from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.training import train as T
from tests.conftest import cli



def _max_weight(folder) -> float:
    from safetensors.torch import load_file

    return max(float(v.abs().max()) for v in load_file(folder / "model.safetensors").values() if v.is_floating_point())


@pytest.mark.parametrize("validation", ["val", "none"])
def test_a_diverged_model_is_never_saved_as_best(tiny_unet, small_benchmark, tmp_path, validation):
    # one step an epoch: the first epoch's loss is finite, its weights ~1e29 answer NaN
    out = tmp_path / "run"
    res = cli("finetune", small_benchmark, "-m", tiny_unet, "-o", out, "--lr", "1e30", "--epochs", "2",
              "--batch-size", "16", "--val-split", validation)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "it was not saved and training stopped" in text and "lower learning rate" in text
    assert not (out / "best").exists() and not (out / "last").exists()


def test_a_diverged_round_leaves_the_good_best_as_it_was(tiny_unet, small_benchmark, tmp_path):
    out = tmp_path / "run"
    assert cli("finetune", small_benchmark, "-m", tiny_unet, "-o", out, "--epochs", "1").exit_code == 0
    before = (out / "best" / "model.safetensors").read_bytes()
    with pytest.raises(T.TrainingError, match="intact at"):
        list(T.finetune(str(tiny_unet), [small_benchmark], out, T.TrainSettings(epochs=3, lr=1e30, batch_size=16),
                        resume=True, device="cpu"))
    assert (out / "best" / "model.safetensors").read_bytes() == before
    assert _max_weight(out / "last") < 1e3  # no diverged weights in last/ either


def test_unsound_names_what_is_wrong(tiny_unet):
    from napari_vlsm.core.training.checkpoint import unsound

    backend = load_model(tiny_unet, "cpu", "fp32")
    assert unsound(backend) is None and unsound(backend, 0.5) is None
    assert "validation" in unsound(backend, float("nan"))
    modes = [m.training for m in backend.module.modules()]
    with torch.no_grad():
        for p in backend.module.parameters():
            p.mul_(1e20)
    assert unsound(backend) is not None and [m.training for m in backend.module.modules()] == modes
    with torch.no_grad():
        next(backend.module.parameters())[...] = float("nan")
    assert "NaN or infinite" in unsound(backend)


def test_resume_with_another_model_is_refused(tiny_unet, tiny_clipseg, small_benchmark, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert cli("finetune", small_benchmark, "-m", tiny_unet, "-o", out, "--epochs", "1").exit_code == 0
    before = (out / "last" / "model.safetensors").read_bytes()
    res = cli("finetune", small_benchmark, "-m", tiny_clipseg, "-o", out, "--epochs", "2", "--resume")
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"trained from the model {tiny_unet}" in text and "would be ignored" in text
    assert (out / "last" / "model.safetensors").read_bytes() == before
    # the run's own model however written, its checkpoints, or none at all go on
    monkeypatch.chdir(tiny_unet.parent)
    res = cli("finetune", small_benchmark, "-m", f"./{tiny_unet.name}", "-o", out, "--epochs", "2", "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "last" / "training.json").read_text())["base_model"] == str(tiny_unet)
    for model in (["-m", out / "last"], []):
        res = cli("finetune", small_benchmark, *model, "-o", out, "--epochs", "3", "--resume")
        assert res.exit_code == 0, res.output
    res = cli("finetune", small_benchmark, "-m", "default", "-o", out, "--epochs", "4", "--resume")
    assert res.exit_code == 2 and "would be ignored" in res.output  # the base is kept across resumes
