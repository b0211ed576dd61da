"""The widget's session without Qt: feature caching per plane, CUDA out-of-memory fallback."""

import numpy as np
import torch

from napari_vlsm.plugin.session import SegmentSession


class FakeLayer:
    """Just what the session reads from a napari Image layer."""

    def __init__(self, data, rgb):
        self.data, self.rgb = data, rgb
        self.ndim = data.ndim - (1 if rgb else 0)


def test_features_are_reused_for_the_same_plane_only(tiny_unet, polyp_image):
    session = SegmentSession()
    layer = FakeLayer(np.stack([polyp_image, polyp_image[::-1]]), rgb=True)
    calls = []
    gen = session.segment(str(tiny_unet), "cpu", layer, [(0,)], ["polyp"])
    list(gen)
    session.predictor.backend.module.encoder[0].register_forward_hook(lambda *a: calls.append(1))
    for prompts in (["polyp"], ["mucosa"], ["polyp", "mucosa"]):
        list(session.segment(str(tiny_unet), "cpu", layer, [(0,)], prompts))
    assert calls == []
    list(session.segment(str(tiny_unet), "cpu", layer, [(1,)], ["polyp"]))
    assert calls == [1]


def test_cuda_out_of_memory_retries_on_cpu(tiny_unet, polyp_image, monkeypatch):
    session = SegmentSession()
    layer = FakeLayer(polyp_image, rgb=True)
    real = SegmentSession._predict_plane
    state = {"raised": False}

    def flaky(self, *args):
        if not state["raised"]:
            state["raised"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args)

    monkeypatch.setattr(SegmentSession, "_predict_plane", flaky)
    gen = session.segment(str(tiny_unet), "auto", layer, [()], ["polyp"])
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        result = stop.value
    assert result.probs[()].shape == (1, 256, 256)
    assert any("out of memory" in m and "CPU" in m for m in result.messages)
    assert session.device == "cpu" and session.backend.device.type == "cpu"
