"""Turn BiomedCLIP's open_clip files into a BiomedCLIPSeg model folder, once, in safetensors.

The hub publishes ``open_clip_config.json`` and ``open_clip_pytorch_model.bin``, a pickle.
This module is the one place napari-vlsm reads a pickle: ``torch.load(weights_only=True)``
rebuilds tensors and plain containers and refuses any other object, so the file cannot run
code. What it writes is safetensors; the model then loads like any other folder.

The text tower's architecture (a BERT ``config.json``) and its WordPiece vocabulary live in
another hub repository, named in the config (``text_cfg.hf_model_name``): the converter finds
them in a folder given, beside the open_clip files, or in the Hugging Face cache.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from napari_vlsm.core.errors import ModelNotFoundError

OPEN_CLIP_CONFIG = "open_clip_config.json"
PICKLED_WEIGHTS = "open_clip_pytorch_model.bin"
SAFE_WEIGHTS = "open_clip_model.safetensors"
TEXT_TOWER_FILES = ["config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]
VIT_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16}  # timm's vit_<size>_patch<P>_<S>
UNTRAINED_CARD = {"title": "BiomedCLIP encoders with a new CLIPSeg decoder (untrained: finetune it first)",
                  "knows": [], "suggestions": []}


def is_open_clip_folder(folder) -> bool:
    return (Path(folder) / OPEN_CLIP_CONFIG).exists()


def read_open_clip(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """The open_clip config and state dict of ``folder`` (safetensors when there, else the pickle,
    read with ``weights_only=True``)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"Cannot read {folder / OPEN_CLIP_CONFIG}: {exc}") from None
    if (folder / SAFE_WEIGHTS).exists():
        from safetensors.torch import load_file

        state = load_file(str(folder / SAFE_WEIGHTS))
    elif (folder / PICKLED_WEIGHTS).exists():
        try:
            state = torch.load(folder / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as exc:  # a non-tensor object in the pickle, or a cut-off file
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelNotFoundError(f"{folder / PICKLED_WEIGHTS} is not a plain weights file ({why}); "
                                     "it was not loaded.") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise ModelNotFoundError(f"{folder} has {OPEN_CLIP_CONFIG} but no weights ({SAFE_WEIGHTS} or "
                                 f"{PICKLED_WEIGHTS}).")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelNotFoundError(f"The weights of {folder} are not a dictionary of tensors; it was not converted.")
    return config, {k.removeprefix("module."): v for k, v in state.items()}


def text_tower_dir(folder: Path, text_cfg: dict, text_dir=None) -> Path:
    """Where the text tower's config.json and vocabulary are: ``text_dir``, the open_clip
    folder itself, or the Hugging Face cache of ``hf_model_name`` (nothing is downloaded)."""
    if text_dir is not None:
        candidates = [Path(text_dir)]
    else:
        candidates = [folder]
        name = text_cfg.get("hf_model_name", "")
        try:
            from huggingface_hub import snapshot_download

            candidates.append(Path(snapshot_download(name, allow_patterns=TEXT_TOWER_FILES, local_files_only=True)))
        except Exception:
            pass
    for c in candidates:
        if (c / "config.json").exists() and ((c / "vocab.txt").exists() or (c / "tokenizer.json").exists()):
            kind = json.loads((c / "config.json").read_text()).get("model_type")
            if kind != "bert":
                raise ModelNotFoundError(f"{c} holds a {kind!r} model, not BiomedCLIP's BERT text tower "
                                         f"({text_cfg.get('hf_model_name', '?')}).")
            return c
    raise ModelNotFoundError(
        f"The text tower of {folder} ({text_cfg.get('hf_model_name', '?')}: its config.json and vocab.txt) is "
        "not here. Give its folder as text_dir=, or on an online machine run: napari-vlsm models pull "
        "<the open_clip model id>, which fetches both.")


def vision_config(vision_cfg: dict, state: dict) -> dict:
    """A ViTConfig (as a dict) for the timm trunk, its sizes read from the weights."""
    name = vision_cfg.get("timm_model_name", "")
    m = re.match(r"vit_(tiny|small|base|large)_patch(\d+)_(\d+)", name)
    if not m or "visual.trunk.pos_embed" not in state:
        raise ModelNotFoundError(f"The image tower {name!r} is not a timm ViT (vit_<size>_patch<P>_<S>); "
                                 "napari-vlsm converts BiomedCLIP-style models only.")
    width = state["visual.trunk.pos_embed"].shape[-1]
    depth = len({k.split(".")[3] for k in state if k.startswith("visual.trunk.blocks.")})
    return dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=VIT_HEADS[m.group(1)],
                intermediate_size=state["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0],
                image_size=vision_cfg.get("image_size", int(m.group(3))),
                patch_size=state["visual.trunk.patch_embed.proj.weight"].shape[-1],
                layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")


_BLOCK_NAMES = ((".norm1.", ".layernorm_before."), (".norm2.", ".layernorm_after."),
                (".attn.proj.", ".attention.o_proj."))
_TRUNK_NAMES = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}


def vision_weights(state: dict) -> dict[str, torch.Tensor]:
    """timm ViT trunk -> transformers ViTModel (the fused qkv split into q, k, v). The pooled
    path (fc_norm, classifier, the visual projection) serves image-text matching only and is
    left out."""
    out = {}
    for key, value in state.items():
        if not key.startswith("visual.trunk.") or key.startswith(("visual.trunk.head.", "visual.trunk.fc_norm.")):
            continue
        key = key.removeprefix("visual.trunk.")
        if not key.startswith("blocks."):
            out[_TRUNK_NAMES.get(key, key)] = value
            continue
        key = "layers." + key.removeprefix("blocks.")
        if ".attn.qkv." in key:
            block, kind = key.split(".attn.qkv.")
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{block}.attention.{part}.{kind}"] = chunk.clone()
            continue
        for old, new in _BLOCK_NAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def text_weights(state: dict) -> tuple[dict, dict]:
    """(BertModel, projection) weights; BERT's own pooler is not used by the CLS pooling."""
    bert = {k.removeprefix("text.transformer."): v for k, v in state.items()
            if k.startswith("text.transformer.") and ".pooler." not in k and not k.endswith("position_ids")}
    proj = {k.removeprefix("text.proj."): v for k, v in state.items() if k.startswith("text.proj.")}
    return bert, proj


def build_from_open_clip(folder, text_dir=None, seed: int = 0, device="cpu"):
    """A BiomedCLIPSeg backend: the open_clip encoders of ``folder`` and a new CLIPSeg rd64
    decoder (random, ``seed``), in fp32, ready to finetune or save."""
    from transformers import AutoTokenizer, BertConfig

    from napari_vlsm.core.models.biomedclipseg.model import (
        BiomedClipSegBackend,
        BiomedClipSegConfig,
        BiomedClipSegForImageSegmentation,
        biomedclip_image_processor,
    )
    from napari_vlsm.core.device import pick_device

    folder = Path(folder)
    cfg, state = read_open_clip(folder)
    model_cfg = cfg.get("model_cfg", cfg)
    text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    pooler, proj_type = text_cfg.get("hf_pooler_type"), text_cfg.get("hf_proj_type")
    if pooler != "cls_last_hidden_state_pooler" or proj_type != "mlp":
        raise ModelNotFoundError(f"{folder}: text pooling {pooler!r} with a {proj_type!r} projection is not "
                                 "BiomedCLIP's (CLS state, mlp); napari-vlsm converts BiomedCLIP-style models only.")
    text = text_tower_dir(folder, text_cfg, text_dir)
    pre = cfg.get("preprocess_cfg", {})
    vision = vision_config(vision_cfg, state)
    config = BiomedClipSegConfig(vision_config=vision, text_config=_bert_config(BertConfig.from_pretrained(text)),
                                 projection_dim=model_cfg.get("embed_dim", 512),
                                 context_length=text_cfg.get("context_length", 256),
                                 **{k: pre[v] for k, v in (("image_mean", "mean"), ("image_std", "std")) if v in pre})
    torch.manual_seed(seed)
    module = BiomedClipSegForImageSegmentation(config)
    bert, proj = text_weights(state)
    for part, weights in ((module.vision, vision_weights(state)), (module.text, bert), (module.text_projection, proj)):
        _load_strict(part, weights, folder)
    tokenizer = AutoTokenizer.from_pretrained(text, model_max_length=config.context_length)
    processor = biomedclip_image_processor(vision["image_size"], config.image_mean, config.image_std)
    return BiomedClipSegBackend(module, tokenizer, processor, pick_device(device), torch.float32, str(folder))


def _bert_config(config) -> dict:
    keep = config.to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        keep.pop(k, None)
    return keep


def _load_strict(part: torch.nn.Module, weights: dict, folder: Path) -> None:
    try:
        missing, unexpected = part.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes differ: e.g. a text tower of another size
        first = str(exc).strip().splitlines()[-1].strip()[:200]
        raise ModelNotFoundError(f"The weights in {folder} do not fit its configuration or text tower ({first}). "
                                 "Check that text_dir= is the model named in open_clip_config.json.") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        what = f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
        raise ModelNotFoundError(f"The weights in {folder} do not fit a BiomedCLIP-style model ({what}).")


def convert(folder, out, text_dir=None, seed: int = 0) -> Path:
    """Write a BiomedCLIPSeg model folder (safetensors, tokenizer, processor, card) to ``out``."""
    from napari_vlsm.core.atomic import atomic_write_text
    from napari_vlsm.core.models.model_card import CARD_FILE

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelNotFoundError(f"{out} is not empty; choose a new folder for the converted model.")
    backend = build_from_open_clip(folder, text_dir, seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    backend.save(tmp)
    atomic_write_text(tmp / CARD_FILE, json.dumps(UNTRAINED_CARD, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
