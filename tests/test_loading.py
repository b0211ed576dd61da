import shutil

import pytest
import torch

from napari_vlsm.core.device import pick_device, pick_dtype
from napari_vlsm.core.errors import ModelNotFoundError, UnsafeWeightsError
from napari_vlsm.core.models.loading import load_model


def test_local_folder_loads_on_cpu_in_fp32(tiny_clipseg, tiny_unet):
    for folder, name in ((tiny_clipseg, "CLIPSeg"), (tiny_unet, "FiLM-UNet")):
        backend = load_model(folder, device="cpu")
        assert backend.name == name
        assert backend.device == torch.device("cpu") and backend.dtype == torch.float32
        assert next(backend.module.parameters()).dtype == torch.float32
        assert backend.source == str(folder)
    assert load_model(tiny_unet).device == pick_device()


def test_device_and_precision_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_pickled_weights_are_refused(tmp_path, tiny_clipseg):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_clipseg, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="arbitrary code"):
        load_model(folder)
    with pytest.raises(UnsafeWeightsError, match="safetensors"):
        load_model(folder / "pytorch_model.bin")


def test_uncached_hub_id_offline_names_id_cache_and_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_model("CIDAS/clipseg-rd64-refined")
    msg = str(err.value)
    assert "CIDAS/clipseg-rd64-refined" in msg
    assert "napari-vlsm models pull CIDAS/clipseg-rd64-refined" in msg
    assert "cache" in msg


def test_missing_and_foreign_folders(tmp_path):
    with pytest.raises(ModelNotFoundError, match="No model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="'bert'"):
        load_model(tmp_path)


def test_saved_folder_reloads_through_from_pretrained(tiny_unet, tmp_path):
    from transformers import AutoModel

    backend = load_model(tiny_unet)
    backend.save(tmp_path / "copy")
    again = AutoModel.from_pretrained(tmp_path / "copy")
    for (k, a), (_, b) in zip(backend.module.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
