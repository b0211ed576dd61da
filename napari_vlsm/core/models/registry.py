"""Which models are here: the embedded default, the Hugging Face cache, given folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from napari_vlsm.core.models.families import family_of
from napari_vlsm.core.file_names import CONFIG, ENCODER_ONNX
from napari_vlsm.core.models.loading import DEFAULT_SPEC, FETCH_PATTERNS, converted_dir, converted_root, default_model_dir



@dataclass
class ModelEntry:
    spec: str
    kind: str
    where: str


def _kind(folder: Path) -> str | None:
    if (folder / ENCODER_ONNX).exists():
        return "ONNX"
    try:
        family = family_of(json.loads((folder / CONFIG).read_text()).get("model_type"))
    except (OSError, ValueError):
        return None
    return family.name if family else None


def _default_kind() -> str:
    """The embedded default's family and what its card says it knows."""
    from napari_vlsm.core.models.model_card import read_card

    knows = ", ".join(m["classes"] for m in read_card(default_model_dir()).get("knows", []))
    return f"{_kind(default_model_dir())} (embedded default{': ' + knows if knows else ''})"


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
    found = [ModelEntry(DEFAULT_SPEC, _default_kind(), str(default_model_dir()))]
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

    from napari_vlsm.core.models.biomedclipseg.convert import OPEN_CLIP_CONFIG, PICKLED_WEIGHTS, SAFE_WEIGHTS, TEXT_TOWER_FILES, convert

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

