"""BiomedCLIPSeg: BiomedCLIP's encoders with a CLIPSeg decoder (``model.py``), and the converter
of BiomedCLIP's open_clip files (``convert.py``). Registered as a family here."""

from __future__ import annotations

from pathlib import Path

import torch

from napari_vlsm.core.models.biomedclipseg.model import (
    BiomedClipSegBackend,
    BiomedClipSegConfig,
    BiomedClipSegForImageSegmentation,
    biomedclip_image_processor,
    biomedclip_processor,
    new_decoder,
)
from napari_vlsm.core.models.clipseg import onnx_meta as clipseg_onnx_meta
from napari_vlsm.core.models.families import Family

_WORDS = ("polyp tumor tumour breast ultrasound image lesion in the of a an and with small large pink round oval "
          "red white one two three left right top bottom center colonoscopy mucosa lung kidney liver skin "
          "ulcer foot nucleus cell no").split()


def wordpiece_vocab(size: int) -> list[str]:
    """A WordPiece vocabulary of ``size`` entries: BERT's special tokens, some medical words,
    letters and digits (so every word can be spelled), then filler."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-()")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + chars + ["##" + c for c in chars]
    return vocab + [f"[unused{i}]" for i in range(size - len(vocab))]


# BiomedCLIP's layout at toy widths: a 12-block ViT (the decoder reads blocks 4, 7, 10) at 64 px
# and a 2-layer BERT on a small WordPiece vocabulary
TINY_VISION = dict(hidden_size=48, num_hidden_layers=12, num_attention_heads=2, intermediate_size=96,
                   image_size=64, patch_size=16)
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=600, max_position_embeddings=272)


def build_random(folder, seed: int = 0) -> Path:
    """A tiny BiomedCLIPSeg model folder with random weights and a WordPiece tokenizer."""
    import tempfile

    from transformers import BertTokenizer

    torch.manual_seed(seed)
    config = BiomedClipSegConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=32)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(wordpiece_vocab(TINY_TEXT["vocab_size"])) + "\n")
        tokenizer = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=config.context_length)
        processor = biomedclip_image_processor(TINY_VISION["image_size"], config.image_mean, config.image_std)
        BiomedClipSegBackend(BiomedClipSegForImageSegmentation(config).eval(), tokenizer, processor,
                             torch.device("cpu"), torch.float32).save(folder)
    return folder


def load(folder, device, dtype, source: str = "") -> BiomedClipSegBackend:
    from napari_vlsm.core.models.loading import strict_from_pretrained
    from napari_vlsm.core.models.processors import load_tokenizer

    module = strict_from_pretrained(BiomedClipSegForImageSegmentation, folder)
    return BiomedClipSegBackend(module, load_tokenizer(folder, own=True), biomedclip_processor(folder, module.config),
                                device, dtype, source)


def new_biomedclipseg(device="auto", encoders=None, seed: int = 0) -> BiomedClipSegBackend:
    """BiomedCLIP's encoders with a new (random) CLIPSeg decoder, for finetuning: ``encoders``
    is an open_clip folder (converted in memory) or a BiomedCLIPSeg model folder (its decoder
    is replaced)."""
    from napari_vlsm.core.errors import ModelNotFoundError
    from napari_vlsm.core.models.loading import load_model
    from napari_vlsm.core.models.biomedclipseg.convert import build_from_open_clip, is_open_clip_folder

    if encoders is None:
        raise ModelNotFoundError("new:biomedclipseg needs encoders=FOLDER: BiomedCLIP's open_clip files "
                                 "(napari-vlsm models pull microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
                                 "on an online machine) or a BiomedCLIPSeg model folder.")
    folder = Path(encoders)
    if is_open_clip_folder(folder):
        return build_from_open_clip(folder, seed=seed, device=device)
    backend = load_model(str(folder), device=device, dtype="fp32")
    if backend.name != BiomedClipSegBackend.name:
        raise ModelNotFoundError(f"{folder} holds a {backend.name} model; encoders= takes BiomedCLIP's "
                                 "open_clip files or a BiomedCLIPSeg folder.")
    torch.manual_seed(seed)
    backend.module.decoder = new_decoder(backend.module.config.sub_configs_built()[2]).to(backend.device)
    backend.source = "new:biomedclipseg"
    return backend


FAMILY = Family(model_type=BiomedClipSegConfig.model_type, name=BiomedClipSegBackend.name, load=load,
                build_random=build_random, onnx_meta=clipseg_onnx_meta, new=new_biomedclipseg,
                new_key="biomedclipseg", new_help="a new CLIPSeg decoder on BiomedCLIP's encoders (encoders=)",
                new_needs_encoders=True)
