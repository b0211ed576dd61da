"""onnxruntime behind the backend interface (``onnxruntime`` or ``onnxruntime-gpu``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_vlsm.core.models.backend import MAX_TOKENS, Backend
from napari_vlsm.core.file_names import DECODER_ONNX, ENCODER_ONNX
from napari_vlsm.core.models.onnx_export import META


def providers_for(device: torch.device) -> tuple[list[str], str]:
    """Execution providers for ``device`` and a note when the GPU one is missing."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"], ""
        return ["CPUExecutionProvider"], ("onnxruntime has no CUDA provider here (install the 'gpu' extra, "
                                          "onnxruntime-gpu, instead of onnxruntime); running on the CPU.")
    return ["CPUExecutionProvider"], ""


class OnnxBackend(Backend):
    def __init__(self, folder, device: torch.device, source: str = ""):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("onnxruntime is not installed: pip install 'napari-vlsm[onnx]' "
                              "(or '[gpu]' for onnxruntime-gpu).") from exc
        from napari_vlsm.core.models.processors import load_image_processor, load_tokenizer

        folder = Path(folder)
        self.meta = json.loads((folder / META).read_text())
        providers, self.notice = providers_for(device)
        if self.notice:
            warnings.warn(self.notice, stacklevel=2)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget as torch
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.encoder = ort.InferenceSession(str(folder / ENCODER_ONNX), options, providers=providers)
        self.decoder = ort.InferenceSession(str(folder / DECODER_ONNX), options, providers=providers)
        self.device = torch.device("cuda" if providers[0].startswith("CUDA") else "cpu")
        self.dtype = torch.float32
        self.name = f"ONNX {self.meta['name']}"
        self.source = source
        self.tokenizer = load_tokenizer(folder, own=True)  # the export saved the model's own
        self.input_size = tuple(self.meta["input_size"])
        self.flip_average = bool(self.meta.get("flip_average", False))
        if self.meta["preprocess"] == "image_processor":
            self.image_processor = load_image_processor(folder, self.input_size[0])

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        if self.meta["preprocess"] == "image_processor":
            return self.image_processor(images=list(images), return_tensors="np")["pixel_values"].astype(np.float32)
        from napari_vlsm.core.images.preprocess import resize_normalize

        return resize_normalize(images, self.input_size, self.meta["image_mean"], self.meta["image_std"]).numpy()

    def encode_image(self, pixel_values) -> list[np.ndarray]:
        return self.encoder.run(None, {"pixel_values": np.asarray(pixel_values, np.float32)})

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token ids and mask, padded to the text encoder's context so the predictor can cache
        them per prompt; ``decode`` trims them back to the longest prompt."""
        t = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                           max_length=self.meta.get("context_length", MAX_TOKENS), return_tensors="np")
        return torch.from_numpy(np.stack([t["input_ids"], t["attention_mask"]], axis=1).astype(np.int64))

    def decode(self, features, text) -> torch.Tensor:
        text = np.asarray(text)
        n = text.shape[0]
        length = int(text[:, 1].sum(1).max())
        if features[0].shape[0] == 1 and n > 1:
            features = [np.repeat(f, n, axis=0) for f in features]
        feeds = {"input_ids": text[:, 0, :length], "attention_mask": text[:, 1, :length]}
        feeds.update({name: f for name, f in zip(self.meta["features"], features)})
        return torch.from_numpy(self.decoder.run(["logits"], feeds)[0])
