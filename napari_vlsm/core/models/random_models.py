"""Randomly initialised models of known shapes, built offline, for tests and benchmarks.

Random weights cost the same time as trained ones, so published shapes (CLIPSeg rd64,
BiomedCLIP's open_clip files) measure speed without downloading anything. Each family's own
builder lives in its module (its FAMILY's ``build_random``); here are the open_clip files that
``napari-vlsm models convert`` reads, and the names the tests and benchmarks import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from napari_vlsm.core.models.biomedclipseg import wordpiece_vocab
from napari_vlsm.core.models.clipseg import build_random_clipseg, clipseg_config  # noqa: F401  (builders live with their family)
from napari_vlsm.core.models.film_unet import TINY_FILM_UNET, build_random_film_unet  # noqa: F401


# BiomedCLIP's published shape: timm ViT-B/16 at 224, PubMedBERT (BERT-base, 30522 WordPieces),
# both projected to 512; "tiny" keeps the layout and the 12 blocks the decoder reads from.
OPEN_CLIP_SHAPES = {
    "base": dict(vit="vit_base_patch16_224", width=768, depth=12, mlp=3072, image=224, patch=16, embed=512,
                 bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           vocab_size=30522, max_position_embeddings=512)),
    "tiny": dict(vit="vit_tiny_patch16_224", width=192, depth=12, mlp=384, image=64, patch=16, embed=32,
                 bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=600, max_position_embeddings=272)),
}
def build_random_open_clip(folder, shape: str = "tiny", seed: int = 0, text_folder=None) -> Path:
    """Write a BiomedCLIP-shaped open_clip model with random weights in the hub's layout:
    ``open_clip_config.json`` and the pickled ``open_clip_pytorch_model.bin`` (timm and
    open_clip key names), and the text tower's ``config.json``, ``vocab.txt`` and tokenizer
    config in ``text_folder`` (default: the same folder)."""
    from transformers import BertConfig, BertModel

    s = OPEN_CLIP_SHAPES[shape]
    folder, text_folder = Path(folder), Path(text_folder or folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape_, scale=0.02, mean=0.0):
        return torch.randn(*shape_, generator=g) * scale + mean

    w, n_tok = s["width"], (s["image"] // s["patch"]) ** 2 + 1
    state = {"visual.trunk.cls_token": rand(1, 1, w), "visual.trunk.pos_embed": rand(1, n_tok, w),
             "visual.trunk.patch_embed.proj.weight": rand(w, 3, s["patch"], s["patch"]),
             "visual.trunk.patch_embed.proj.bias": rand(w), "visual.trunk.norm.weight": rand(w, scale=0.1, mean=1.0),
             "visual.trunk.norm.bias": rand(w), "visual.head.proj.weight": rand(s["embed"], w)}
    for i in range(s["depth"]):
        b = f"visual.trunk.blocks.{i}."
        state.update({b + "norm1.weight": rand(w, scale=0.1, mean=1.0), b + "norm1.bias": rand(w),
                      b + "attn.qkv.weight": rand(3 * w, w), b + "attn.qkv.bias": rand(3 * w),
                      b + "attn.proj.weight": rand(w, w), b + "attn.proj.bias": rand(w),
                      b + "norm2.weight": rand(w, scale=0.1, mean=1.0), b + "norm2.bias": rand(w),
                      b + "mlp.fc1.weight": rand(s["mlp"], w), b + "mlp.fc1.bias": rand(s["mlp"]),
                      b + "mlp.fc2.weight": rand(w, s["mlp"]), b + "mlp.fc2.bias": rand(w)})
    torch.manual_seed(seed)
    bert_config = BertConfig(**s["bert"])
    bert = BertModel(bert_config)  # with its pooler, as open_clip builds it
    state.update({"text.transformer." + k: v for k, v in bert.state_dict().items()})
    d, hid = s["bert"]["hidden_size"], (s["bert"]["hidden_size"] + s["embed"]) // 2
    state.update({"text.proj.0.weight": rand(hid, d), "text.proj.2.weight": rand(s["embed"], hid),
                  "logit_scale": torch.tensor(4.6052)})
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    text_repo = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    config = {"model_cfg": {"embed_dim": s["embed"],
                            "vision_cfg": {"timm_model_name": s["vit"], "timm_model_pretrained": False, "timm_pool": "",
                                           "timm_proj": "linear", "image_size": s["image"]},
                            "text_cfg": {"hf_model_name": text_repo, "hf_tokenizer_name": text_repo,
                                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                         "context_length": 256}},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    bert_config.save_pretrained(text_folder)
    (text_folder / "vocab.txt").write_text("\n".join(wordpiece_vocab(s["bert"]["vocab_size"])) + "\n")
    (text_folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512,
                                                                   "tokenizer_class": "BertTokenizer"}))
    return folder


def build_random_biomedclipseg(folder, shape: str = "tiny", seed: int = 0) -> Path:
    """A BiomedCLIPSeg model folder with random weights: ``shape`` open_clip files, converted."""
    import tempfile

    from napari_vlsm.core.models.biomedclipseg.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        return convert(build_random_open_clip(Path(tmp) / "open_clip", shape, seed), folder, seed=seed)
