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
    assert list(backend.module.state_dict()) == list(again.state_dict())  # the same weights, all of them
    for (k, a), (_, b) in zip(backend.module.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_every_loaded_weight_has_memory_of_its_own(tiny_unet, tiny_efficientnet_unet, tmp_path):
    """Weights read from a file can sit at any offset of its buffer; the CPU kernels' last bits
    depend on that alignment, so the same weights saved beside others (a model with an adapter)
    answered about 1e-6 differently. Loaded, each weight is a fresh allocation."""
    for folder in (tiny_unet, tiny_efficientnet_unet):
        module = load_model(folder, "cpu", "fp32").module
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            assert t.data_ptr() % 64 == 0, name
    # a model with an adapter answers the base's prompts exactly as the base does
    base = load_model(tiny_efficientnet_unet, "cpu", "fp32")
    base.module.add_adapter()
    with torch.no_grad():
        base.module.set_routes(["polyp", "lesion"], [0, 0], base.encode_text(["polyp", "lesion"]))
    base.save(tmp_path / "with_adapter")
    a, b = load_model(tiny_efficientnet_unet, "cpu", "fp32"), load_model(tmp_path / "with_adapter", "cpu", "fp32")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.forward(pixels, ["polyp", "lesion"]), b.forward(pixels, ["polyp", "lesion"]))
