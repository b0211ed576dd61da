"""ONNX export and the onnxruntime backend against the torch path, and the fast paths."""

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from napari_vlsm.cli import app
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.images.metrics import dice
from napari_vlsm.core.models.onnx_backend import OnnxBackend
from napari_vlsm.core.inference.predictor import Predictor

PROMPTS = ["polyp", "one small pink circle polyp, located in right of the image"]


@pytest.fixture(scope="module", params=["tiny_clipseg", "tiny_unet", "tiny_efficientnet_unet"])
def exported(request, tmp_path_factory):
    src = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("onnx") / request.param
    res = CliRunner().invoke(app, ["export-onnx", str(src), str(out)])
    assert res.exit_code == 0, res.output
    return src, out


def test_graphs_have_dynamic_batch_and_length(exported):
    _, out = exported
    for name, axes in (("image_encoder.onnx", {"pixel_values": [0]}),
                       ("prompt_decoder.onnx", {"input_ids": [0, 1], "attention_mask": [0, 1], "feature_0": [0]})):
        graph = onnx.load(str(out / name)).graph
        dims = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
        for inp, ax in axes.items():
            assert all(dims[inp][a].dim_param for a in ax), (name, inp)


def test_onnxruntime_matches_torch(exported, polyp_image):
    src, out = exported
    backend = load_model(out)
    assert isinstance(backend, OnnxBackend) and backend.name.startswith("ONNX")
    ours, ref = Predictor(backend), Predictor(load_model(src, "cpu", "fp32"))
    for p in (ours, ref):
        p.set_image(polyp_image)
    np.testing.assert_allclose(ours.predict(PROMPTS).probs, ref.predict(PROMPTS).probs, atol=2e-4)
    # batches of 1..3 images through the same graphs
    for n in (1, 3):
        got = ours.predict_batch([polyp_image] * n, ["polyp"])
        assert len(got) == n and got[-1].probs.shape == (1, 256, 256)


def test_gpu_request_without_cuda_provider_falls_back_with_message(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu with CUDA")
    with pytest.warns(UserWarning, match="onnxruntime-gpu"):
        backend = OnnxBackend(exported[1], torch.device("cuda"))
    assert backend.device.type == "cpu" and "CPU" in backend.notice


def test_export_refuses_an_onnx_model(exported):
    res = CliRunner().invoke(app, ["export-onnx", str(exported[1]), str(exported[1] / "again")])
    assert res.exit_code == 2 and "already an ONNX export" in res.output


def test_bf16_path_agrees_with_fp32(tiny_unet, polyp_image):
    """The reduced-precision path (bf16 on CPU here, bf16/fp16 on GPU) against fp32."""
    preds = {}
    for dtype in ("fp32", "bf16"):
        p = Predictor(load_model(tiny_unet, "cpu", dtype))
        p.set_image(polyp_image)
        preds[dtype] = p.predict("polyp").probs[0]
    assert np.abs(preds["fp32"] - preds["bf16"]).max() < 0.05
    assert dice(preds["fp32"] >= 0.5, preds["bf16"] >= 0.5) > 0.95


def test_export_keeps_flip_averaging(tmp_path, polyp_image):
    from napari_vlsm.core.models.random_models import build_random_film_unet

    from .conftest import TINY_UNET

    src = build_random_film_unet(tmp_path / "mirrored", flip_average=True, **TINY_UNET)
    res = CliRunner().invoke(app, ["export-onnx", str(src), str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    ours, ref = Predictor(load_model(tmp_path / "onnx")), Predictor(load_model(src, "cpu", "fp32"))
    assert ours.flip_average and ref.flip_average
    for p in (ours, ref):
        p.set_image(polyp_image)
    np.testing.assert_allclose(ours.predict(PROMPTS).probs, ref.predict(PROMPTS).probs, atol=2e-4)


def test_export_of_the_default_prints_no_exporter_noise(tmp_path, recwarn):
    from napari_vlsm.core.models.onnx_export import export

    export(load_model("default", device="cpu"), tmp_path / "onnx")
    assert not [w for w in recwarn if "Constant folding" in str(w.message)]
