"""Resolve a model spec to a ready backend.

A spec is one of:

* ``"default"`` (or ``None``): the small offline polyp model shipped in the package;
* a local folder holding ``config.json`` + safetensors weights (+ tokenizer files), such as
  one written by ``save_pretrained``, by this project's finetune command, or by
  ``napari-vlsm models convert`` from BiomedCLIP's open_clip files;
* a folder written by ``napari-vlsm export-onnx`` (``image_encoder.onnx`` + ``prompt_decoder.onnx``);
* a Hugging Face model id such as ``CIDAS/clipseg-rd64-refined``, read from the HF cache
  (downloaded first if the machine is online and ``HF_HUB_OFFLINE`` is not set).

Weights are read from safetensors only: a folder with only pickled ``.bin``/``.pt``
weights is refused, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path

import torch

from napari_vlsm.core.models.backend import Backend
from napari_vlsm.core.device import pick_device, pick_dtype
from napari_vlsm.core.errors import ModelNotFoundError, UnsafeWeightsError
from napari_vlsm.core.models.families import load_folder
from napari_vlsm.core.file_names import BEST, CONFIG, ENCODER_ONNX

DEFAULT_SPEC = "default"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FETCH_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def quiet_transformers() -> None:
    """No per-file progress bars from transformers while loading or saving."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def default_model_dir() -> Path:
    return Path(str(files("napari_vlsm") / "assets" / "default_film_unet"))


def hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def converted_root() -> Path:
    """Where ``models pull`` puts the open_clip models it converted: beside the Hugging Face cache."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "napari-vlsm"


def converted_dir(model_id: str) -> Path:
    return converted_root() / model_id.replace("/", "--")


def local_folder(spec: str | os.PathLike | None) -> Path | None:
    """The folder on this machine behind a spec (the default, or a folder given), with nothing
    fetched; None for a hub id or a missing path."""
    if spec is None or str(spec) == DEFAULT_SPEC:
        return default_model_dir()
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def model_identity(spec: str | os.PathLike | None) -> str:
    """The model a spec names, for comparing specs and recording them: a local folder as its
    absolute path (so 'm' and './m' are one model), the default and hub ids as given."""
    if spec is None or str(spec) == DEFAULT_SPEC:
        return DEFAULT_SPEC
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else str(spec)


def resolve_folder(spec: str | os.PathLike | None) -> Path:
    """The local folder a spec points at, fetching a hub id into the cache if allowed."""
    if spec is None or str(spec) == DEFAULT_SPEC:
        folder = default_model_dir()
        if not (folder / CONFIG).exists():
            raise ModelNotFoundError(
                f"The embedded default model is missing from {folder}; reinstall napari-vlsm."
            )
        return folder
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise UnsafeWeightsError(_pickle_message(path))
            raise ModelNotFoundError(
                f"{path} is a file; give the model's folder (config.json + model.safetensors)."
            )
        return path
    looks_local = str(spec).startswith((".", "/", "~")) or path.parent.exists() and str(path.parent) != "."
    if str(spec).count("/") == 1 and not looks_local:
        return _from_hub(str(spec))
    raise ModelNotFoundError(f"No model folder at {path} and {spec!r} is not a Hugging Face model id.")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    if (converted_dir(repo_id) / CONFIG).exists():  # an open_clip model that `models pull` converted
        return converted_dir(repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=FETCH_PATTERNS, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (f"Model {repo_id!r} is not in the Hugging Face cache ({hf_cache_dir()}). "
            f"On a machine with internet access run: napari-vlsm models pull {repo_id}")
    if offline:
        raise ModelNotFoundError(hint + " (HF_HUB_OFFLINE is set, so nothing is downloaded here).")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=FETCH_PATTERNS))
    except Exception as exc:  # network errors, unknown repo, gated repo
        raise ModelNotFoundError(f"{hint}. Download failed: {exc}") from exc


def _pickle_message(path: Path) -> str:
    return (f"{path} holds pickled weights ({path.suffix}), which napari-vlsm does not load: unpickling "
            "an untrusted file can run arbitrary code. Convert it to safetensors on a trusted machine "
            "(load it and call save_pretrained), then point napari-vlsm at that folder.")


def check_safetensors(folder: Path) -> None:
    if not (folder / CONFIG).exists() and (folder / BEST / CONFIG).exists():
        raise ModelNotFoundError(_run_message(folder))
    if (folder / "open_clip_config.json").exists() and not (folder / CONFIG).exists():
        raise ModelNotFoundError(f"{folder} holds open_clip files (BiomedCLIP); convert them once into a model folder "
                                 "(core.models.biomedclipseg.convert.convert, or the command napari-vlsm models "
                                 "convert).")
    if any(folder.glob("*.safetensors")):
        return
    pickled = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise UnsafeWeightsError(_pickle_message(pickled[0]))
    raise ModelNotFoundError(f"{folder} holds no model weights (*.safetensors).")


def _run_message(folder: Path) -> str:
    return (f"{folder} is a training run, not a model: use {folder / BEST} (its best checkpoint) or "
            f"{folder / 'last'}.")


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        if (folder / BEST / CONFIG).exists():
            raise ModelNotFoundError(_run_message(folder)) from None
        raise ModelNotFoundError(f"{folder} is not a model folder: it has no config.json.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{folder / CONFIG} is not valid JSON ({exc}); restore the model's config.json.") \
            from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{folder / CONFIG} holds a JSON {type(config).__name__}, not the object of a "
                                 "model's settings; restore the model's config.json.")
    return config


def strict_from_pretrained(cls, folder: Path):
    """``from_pretrained`` that refuses weights which do not fit the config: a missing tensor
    (which transformers would silently initialise at random), a shape that differs, or a
    cut-off file each give one line naming the folder and the problem."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        module, info = cls.from_pretrained(folder, use_safetensors=True, dtype=torch.float32,
                                           output_loading_info=True)
    except Exception as exc:  # safetensors header errors, size mismatches, unreadable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "mismatched_sizes" in first:
            first = "tensor shapes differ from what its config.json describes"
        raise ModelNotFoundError(f"The weights in {folder} cannot be loaded ({first[:200]}). The file may be "
                                 "cut off or belong to another configuration; use a complete model folder.") from None
    finally:
        hf_logging.set_verbosity(level)
    # buffers that are rebuilt anyway may be absent from older checkpoints
    missing = [k for k in info.get("missing_keys") or [] if not k.endswith(("position_ids", "num_batches_tracked"))]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = (f"{len(missing)} tensor(s) missing, e.g. {missing[0]}" if missing else
                f"{len(mismatched)} tensor(s) of another shape, e.g. {mismatched[0][0]}")
        raise ModelNotFoundError(f"The weights in {folder} do not match its config.json: {what}. "
                                 "They would be filled with random numbers; use the complete model folder.")
    _own_memory(module)
    return module


@torch.no_grad()
def _own_memory(module: torch.nn.Module) -> None:
    """Give every weight memory of its own. Loaded tensors may sit at any offset of the file's
    buffer, and the CPU kernels' last bits depend on that alignment: the same weights saved
    among other tensors (a model with an adapter added) would then answer 1e-6 differently."""
    for t in [*module.parameters(), *module.buffers()]:
        t.data = t.data.clone()


def load_model(spec: str | os.PathLike | None = None, device=None, dtype=None) -> Backend:
    """Load the model named by ``spec`` on ``device`` (auto: CUDA, MPS, CPU) in ``dtype``
    (auto: bf16/fp16 on GPU, fp32 on CPU) and return its backend."""
    quiet_transformers()
    folder = resolve_folder(spec)
    dev = pick_device(device)
    if (folder / ENCODER_ONNX).exists():
        from napari_vlsm.core.models.onnx_backend import OnnxBackend

        return OnnxBackend(folder, device=dev, source=str(spec or DEFAULT_SPEC))
    check_safetensors(folder)
    config = read_config(folder)
    return load_folder(folder, config.get("model_type"), dev, pick_dtype(dev, dtype), str(spec or DEFAULT_SPEC))
