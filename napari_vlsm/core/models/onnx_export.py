"""Export a model to two ONNX graphs for onnxruntime(-gpu), keeping the cached-feature flow:

* ``image_encoder.onnx``: pixel_values (N, 3, S, S) -> feature_0 ... feature_k
* ``prompt_decoder.onnx``: input_ids, attention_mask (P, L), feature_0 ... feature_k (P, ...)
  -> logits (P, h, w); text encoder and FiLM decoder together

Batch (N, P) and prompt length (L) are dynamic; ``check_dynamic`` reads the written graphs
back and fails if an exporter fixed them. Tokenizer and preprocessing settings are saved
beside the graphs (``vlsm_onnx.json``), so the folder is a complete model for load_model.

The folder is written whole or not at all (a temporary sibling swapped in), and only into a
new or empty folder or over an earlier export: an export beside a model's own files would
replace its tokenizer and be loaded in its place.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from napari_vlsm.core.atomic import atomic_folder, recover_folder
from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.file_names import DECODER_ONNX, ENCODER_ONNX

META = "vlsm_onnx.json"


class _ImageEncoder(nn.Module):
    def __init__(self, backend: TorchBackend):
        super().__init__()
        self.backend = backend
        self.module = backend.module

    def forward(self, pixel_values):
        return tuple(self.backend.encode_image(pixel_values))


class _PromptDecoder(nn.Module):
    def __init__(self, backend: TorchBackend):
        super().__init__()
        self.backend = backend
        self.module = backend.module

    def forward(self, input_ids, attention_mask, *features):
        return self.backend.decode(list(features), self.backend.text_from_tokens(input_ids, attention_mask))


def preprocess_meta(backend: TorchBackend) -> dict:
    from napari_vlsm.core.models.families import family_of_backend

    return family_of_backend(backend).onnx_meta(backend)


def is_export(folder) -> bool:
    """Whether ``folder`` holds an earlier export (its metadata and graphs)."""
    folder = Path(folder)
    return (folder / META).is_file() and (folder / ENCODER_ONNX).is_file()


def target_problem(out_dir) -> str | None:
    """Why ``out_dir`` cannot take an export (None: it can): a file, a model folder (its
    tokenizer would be replaced, and the export loaded in its place) or any folder with files
    other than an earlier export's. A swap that a kill cut short is repaired first."""
    out = Path(out_dir)
    recover_folder(out)
    if out.exists() and not out.is_dir():
        return "is a file"
    if not out.is_dir() or is_export(out):
        return None
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return None
    what = "a model folder" if "config.json" in held else "not empty"
    return (f"is {what} ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) and not an earlier ONNX export: "
            "the export would be mixed with its files, and loading it would run the export")


def export(backend: TorchBackend, out_dir, opset: int = 18) -> list[Path]:
    """Write both graphs, the tokenizer/processor files and the metadata to ``out_dir``: a
    new or empty folder, or an earlier export, which is replaced whole once the new one is
    complete (``target_problem``)."""
    if not isinstance(backend, TorchBackend):
        raise ValueError("Only PyTorch models can be exported; this one is already an ONNX export.")
    out = Path(out_dir)
    problem = target_problem(out)
    if problem:
        raise ValueError(f"out_dir {out} {problem}. Give a new or empty out_dir, or an earlier export.")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_folder(out, lambda tmp: _export_into(backend, tmp, opset))
    return [out / ENCODER_ONNX, out / DECODER_ONNX, out / META]


def _export_into(backend: TorchBackend, out: Path, opset: int) -> None:
    backend.module.float().eval()
    backend.dtype = torch.float32
    h, w = backend.input_size
    pixels = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feats = backend.encode_image(pixels)
    tokens = backend.tokenize(["polyp", "one small pink circle polyp"])
    names = [f"feature_{i}" for i in range(len(feats))]
    enc_path, dec_path = out / ENCODER_ONNX, out / DECODER_ONNX
    feat_axes = {n: {0: "batch"} for n in names}
    with warnings.catch_warnings():  # the tracer's notes on Python-side shape checks are not the user's concern
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # a strided slice stays a Slice
        torch.onnx.export(_ImageEncoder(backend), (pixels,), enc_path, input_names=["pixel_values"],
                          output_names=names, dynamic_axes={"pixel_values": {0: "batch"}, **feat_axes},
                          opset_version=opset, dynamo=False)
        torch.onnx.export(_PromptDecoder(backend), (tokens["input_ids"], tokens["attention_mask"], *feats), dec_path,
                          input_names=["input_ids", "attention_mask", *names], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                        "attention_mask": {0: "batch", 1: "length"},
                                        **feat_axes, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    check_dynamic(enc_path, {"pixel_values": [0]})
    check_dynamic(dec_path, {"input_ids": [0, 1], "attention_mask": [0, 1], **{n: [0] for n in names}})
    backend.tokenizer.save_pretrained(out)
    if hasattr(backend, "image_processor"):
        backend.image_processor.save_pretrained(out)
    meta = {"name": backend.name, "source": backend.source, "input_size": [h, w], "features": names,
            "opset": opset, "context_length": backend.context_length,
            "flip_average": bool(backend.flip_average), **preprocess_meta(backend)}
    (out / META).write_text(json.dumps(meta, indent=1))


def check_dynamic(path: Path, axes: dict[str, list[int]]) -> None:
    """Fail if an input axis that must be dynamic was written with a fixed size."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for inp in graph.input:
        for axis in axes.get(inp.name, []):
            dim = inp.type.tensor_type.shape.dim[axis]
            if not dim.dim_param:
                raise RuntimeError(f"{path.name}: input {inp.name} axis {axis} was exported with the fixed size "
                                   f"{dim.dim_value}; it must be dynamic.")
