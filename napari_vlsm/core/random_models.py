"""Randomly initialised models of known shapes, built offline, for tests and benchmarks.

Random weights cost the same time as trained ones, so the ``rd64`` shape (that of
``CIDAS/clipseg-rd64-refined``: ViT-B/16, 352x352, reduce_dim 64, complex transposed
convolution, 150.7 M parameters) measures speed without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

import torch


def clipseg_config(shape: str = "tiny"):
    from transformers import CLIPSegConfig

    if shape == "rd64":
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=352, patch_size=16)
        return CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=512, reduce_dim=64,
                             extract_layers=[3, 6, 9], use_complex_transposed_convolution=True)
    if shape == "tiny":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=64, patch_size=16)
        return CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=32, reduce_dim=16,
                             extract_layers=[0, 1], decoder_num_attention_heads=2,
                             decoder_intermediate_size=32, use_complex_transposed_convolution=True)
    raise ValueError(f"Unknown shape {shape!r}; use 'tiny' or 'rd64'.")


def build_random_clipseg(folder, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random CLIPSeg of ``shape`` with a real CLIP tokenizer and processor to ``folder``."""
    from transformers import CLIPSegForImageSegmentation

    from .loading import quiet_transformers
    from .processors import clipseg_image_processor, load_tokenizer

    quiet_transformers()
    torch.manual_seed(seed)
    config = clipseg_config(shape)
    model = CLIPSegForImageSegmentation(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    load_tokenizer(folder).save_pretrained(folder)
    clipseg_image_processor(config.vision_config.image_size).save_pretrained(folder)
    return folder


def build_random_film_unet(folder, seed: int = 0, **config) -> Path:
    """Write a random FiLM-UNet (default shape, or ``config`` overrides) to ``folder``."""
    from .film_unet import FilmUNetConfig, FilmUNetForSegmentation
    from .processors import load_tokenizer

    torch.manual_seed(seed)
    model = FilmUNetForSegmentation(FilmUNetConfig(**config)).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    load_tokenizer(folder).save_pretrained(folder)
    return folder
