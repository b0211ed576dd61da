"""Which models are here: the embedded default, the Hugging Face cache, given folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .file_names import CONFIG, ENCODER_ONNX
from .loading import DEFAULT_SPEC, FETCH_PATTERNS, default_model_dir

SUPPORTED = {"clipseg": "CLIPSeg", "vlsm_film_unet": "FiLM-UNet"}


@dataclass
class ModelEntry:
    spec: str
    kind: str
    where: str


def _kind(folder: Path) -> str | None:
    if (folder / ENCODER_ONNX).exists():
        return "ONNX"
    try:
        return SUPPORTED.get(json.loads((folder / CONFIG).read_text()).get("model_type"))
    except (OSError, ValueError):
        return None


def cached_models() -> list[ModelEntry]:
    """Supported models in the Hugging Face cache (nothing is downloaded)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            kind = _kind(Path(rev.snapshot_path))
            if kind:
                found.append(ModelEntry(repo.repo_id, kind, str(rev.snapshot_path)))
                break
    return found


def find_models(folders=()) -> list[ModelEntry]:
    found = [ModelEntry(DEFAULT_SPEC, "FiLM-UNet (embedded default: polyps, breast tumours)", str(default_model_dir()))]
    found += cached_models()
    for f in map(Path, folders):
        candidates = [f] + ([p for p in sorted(f.iterdir()) if p.is_dir()] if f.is_dir() else [])
        found += [ModelEntry(str(c), _kind(c), str(c)) for c in candidates if _kind(c)]
    return found


def pull(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, allow_patterns=FETCH_PATTERNS))


def new_film_unet(device="auto", **config):
    """A freshly initialised FiLM-UNet with the CLIP tokenizer, for training from scratch."""
    import torch

    from .device import pick_device
    from .film_unet import FilmUNetBackend, FilmUNetConfig, FilmUNetForSegmentation
    from .processors import load_tokenizer

    module = FilmUNetForSegmentation(FilmUNetConfig(**config))
    return FilmUNetBackend(module, load_tokenizer(), pick_device(device), torch.float32,
                           "new:film-unet")
