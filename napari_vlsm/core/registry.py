"""Which models are here: the embedded default, the Hugging Face cache, given folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .file_names import CONFIG, ENCODER_ONNX
from .loading import DEFAULT_SPEC, FETCH_PATTERNS, converted_dir, converted_root, default_model_dir

SUPPORTED = {"clipseg": "CLIPSeg", "vlsm_film_unet": "FiLM-UNet", "vlsm_biomedclipseg": "BiomedCLIPSeg"}


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
    pulled = converted_root()
    if pulled.is_dir():  # open_clip models converted by pull, listed under their hub id
        found += [ModelEntry(p.name.replace("--", "/"), _kind(p), str(p)) for p in sorted(pulled.iterdir()) if _kind(p)]
    for f in map(Path, folders):
        candidates = [f] + ([p for p in sorted(f.iterdir()) if p.is_dir()] if f.is_dir() else [])
        found += [ModelEntry(str(c), _kind(c), str(c)) for c in candidates if _kind(c)]
    return found


def pull(model_id: str, out=None) -> Path:
    """Download a model. An open_clip model (BiomedCLIP) is fetched with its text tower's
    repository and converted once to a BiomedCLIPSeg folder (``out``, default
    ``converted_dir(model_id)``), the only step that reads its pickled weights."""
    from huggingface_hub import snapshot_download

    from .open_clip_convert import OPEN_CLIP_CONFIG, PICKLED_WEIGHTS, SAFE_WEIGHTS, TEXT_TOWER_FILES, convert

    path = Path(snapshot_download(model_id, allow_patterns=FETCH_PATTERNS + [OPEN_CLIP_CONFIG]))
    if not (path / OPEN_CLIP_CONFIG).exists():
        return path
    cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text())
    text_repo = cfg.get("model_cfg", cfg).get("text_cfg", {}).get("hf_model_name")
    if not text_repo:
        raise ValueError(f"{model_id} is an open_clip model without a Hugging Face text tower; only "
                         "BiomedCLIP-style models are supported.")
    out = Path(out) if out is not None else converted_dir(model_id)
    if (out / CONFIG).exists():
        return out
    weights = SAFE_WEIGHTS if (path / SAFE_WEIGHTS).exists() else PICKLED_WEIGHTS
    path = Path(snapshot_download(model_id, allow_patterns=FETCH_PATTERNS + [OPEN_CLIP_CONFIG, weights]))
    text = Path(snapshot_download(text_repo, allow_patterns=TEXT_TOWER_FILES))
    return convert(path, out, text_dir=text)




def new_biomedclipseg(encoders, device="auto", seed: int = 0):
    """BiomedCLIP's encoders with a new (random) CLIPSeg decoder, for finetuning: ``encoders``
    is an open_clip folder (converted in memory) or a BiomedCLIPSeg model folder (its decoder
    is replaced)."""
    from .errors import ModelNotFoundError
    from .open_clip_convert import build_from_open_clip, is_open_clip_folder

    if encoders is None:
        raise ModelNotFoundError("new:biomedclipseg needs --encoders FOLDER: BiomedCLIP's open_clip files "
                                 "(napari-vlsm models pull microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
                                 "on an online machine) or a BiomedCLIPSeg model folder.")
    folder = Path(encoders)
    if is_open_clip_folder(folder):
        return build_from_open_clip(folder, seed=seed, device=device)
    import torch

    from .biomedclipseg import new_decoder
    from .loading import load_model

    backend = load_model(str(folder), device=device, dtype="fp32")
    if backend.name != "BiomedCLIPSeg":
        raise ModelNotFoundError(f"{folder} holds a {backend.name} model; --encoders takes BiomedCLIP's "
                                 "open_clip files or a BiomedCLIPSeg folder.")
    torch.manual_seed(seed)
    backend.module.decoder = new_decoder(backend.module.config.sub_configs_built()[2]).to(backend.device)
    backend.source = "new:biomedclipseg"
    return backend


def new_film_unet(device="auto", **config):
    """A freshly initialised FiLM-UNet with the CLIP tokenizer, for training from scratch."""
    import torch

    from .device import pick_device
    from .film_unet import FilmUNetBackend, FilmUNetConfig, FilmUNetForSegmentation
    from .processors import load_tokenizer

    module = FilmUNetForSegmentation(FilmUNetConfig(**config))
    return FilmUNetBackend(module, load_tokenizer(), pick_device(device), torch.float32,
                           "new:film-unet")
