"""The EfficientNet-Lite0 image encoder: its ImageNet weights' layout loads, TensorFlow's
padding, and a FiLM-UNet built on it saves, reloads, predicts at the input's size and
takes adapters."""

import numpy as np
import pytest
import torch

from napari_vlsm.core.models import efficientnet_lite as E
from napari_vlsm.core.models.film_unet import FilmUNetConfig, FilmUNetForSegmentation
from napari_vlsm.core.models.loading import load_model
from napari_vlsm.core.inference.predictor import Predictor

from .conftest import TINY_EFFICIENTNET_UNET


def test_weights_in_the_packages_layout_load_and_others_are_refused(tmp_path):
    torch.manual_seed(1)
    source = E.EfficientNetLite0Encoder()
    state = dict(source.state_dict())
    state["_conv_head.weight"] = torch.zeros(1280, 320, 1, 1)  # the classifier's parts, not the encoder's
    state["_fc.weight"] = torch.zeros(1000, 1280)
    torch.save(state, tmp_path / "efficientnet-lite0.pth")
    torch.manual_seed(2)
    encoder = E.EfficientNetLite0Encoder()
    loaded = E.load_imagenet_weights(encoder, tmp_path / "efficientnet-lite0.pth")
    assert "_fc.weight" not in loaded and len(loaded) == len(source.state_dict()) == len(encoder.state_dict())
    for (name, a), b in zip(source.state_dict().items(), encoder.state_dict().values()):
        assert torch.equal(a, b), name
    del state["_blocks.3._depthwise_conv.weight"]
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not EfficientNet-Lite0"):
        E.load_imagenet_weights(encoder, tmp_path / "other.pth")


def test_stride_two_pads_one_more_at_the_bottom_right_as_tensorflow_does():
    conv = E.SameConv(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, 8, 8)
    y = conv(x)[0, 0]
    assert y.shape == (4, 4)
    # windows start at 0, 2, 4, 6: the first row and column see no padding, the last ones do
    assert y[0, 0] == 9 and y[-1, -1] == 4 and y[0, -1] == 6


def test_levels_have_the_channels_and_strides_the_decoder_expects():
    feats = E.EfficientNetLite0Encoder().eval()(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(E.CHANNELS)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


def test_film_unet_on_it_reloads_and_predicts_at_the_image_size(tiny_efficientnet_unet, polyp_image):
    backend = load_model(tiny_efficientnet_unet, "cpu", "fp32")
    assert backend.module.config.encoder == E.NAME
    p = Predictor(backend)
    p.set_image(polyp_image)
    probs = p.predict(["polyp", "breast tumor"]).probs
    assert probs.shape == (2, *polyp_image.shape[:2]) and np.isfinite(probs).all()
    fresh = FilmUNetForSegmentation.from_pretrained(tiny_efficientnet_unet).eval()
    x = torch.rand(1, 3, 64, 64)
    ids = torch.tensor([[49406, 2, 49407]])
    with torch.no_grad():
        out = fresh(x, ids)
        assert out.shape == (1, 64, 64)
        assert torch.allclose(out, backend.module.eval()(x, ids), atol=1e-5)
        k = fresh.add_adapter()  # a new class's own copy of the image path, the encoder included
        assert torch.equal(fresh.adapters[k - 1].encoder._conv_stem.weight, fresh.encoder._conv_stem.weight)


def test_widths_that_do_not_match_the_encoder_are_refused():
    with pytest.raises(ValueError, match="widths"):
        FilmUNetForSegmentation(FilmUNetConfig(**{**TINY_EFFICIENTNET_UNET, "widths": [8, 16, 32, 64, 256]}))


def test_the_packages_imagenet_weights_fit_the_encoder():
    encoder = E.EfficientNetLite0Encoder()
    before = encoder._blocks[15]._project_conv.weight.clone()
    loaded = E.load_imagenet_weights(encoder, E.imagenet_weights_file())
    assert len(loaded) == len(encoder.state_dict())
    assert not torch.equal(before, encoder._blocks[15]._project_conv.weight)
    # trained batch norms: running statistics gathered on ImageNet, not the fresh 0 / 1
    assert not torch.allclose(encoder._bn0.running_var, torch.ones(32))


def test_a_round_of_the_shared_network_on_the_pretrained_encoder_uses_a_gentler_rate(
        tiny_efficientnet_unet, tiny_unet, small_benchmark, tmp_path):
    from napari_vlsm.core.training.checkpoint import read_metadata
    from napari_vlsm.core.training.train import TrainSettings, finetune

    settings = TrainSettings(epochs=1, batch_size=4)
    runs = {}
    for name, model in (("pretrained", tiny_efficientnet_unet), ("unet", tiny_unet)):
        list(finetune(str(model), [small_benchmark], tmp_path / name, settings, device="cpu"))
        runs[name] = read_metadata(tmp_path / name / "best")["settings"]["lr"]
    assert runs == {"pretrained": 3e-4, "unet": 1e-3}
    # an adapter (a class new to the model) cannot make the base forget: it keeps the faster rate,
    # and its first round a faster one still
    backend = load_model(tiny_efficientnet_unet, "cpu", "fp32")
    assert TrainSettings().learning_rate(backend, adapter=True) == 1e-3
    assert TrainSettings().learning_rate(backend, adapter=True, new_adapter=True) == 2e-3
