"""The text tokenizers and image processors that models load from their folders, with the
CLIP tokenizer shipped in the package as the fallback (nothing is downloaded)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from napari_vlsm.core.images.preprocess import IMAGENET_MEAN, IMAGENET_STD


def clip_tokenizer_dir() -> Path:
    return Path(str(files("napari_vlsm") / "assets" / "clip_tokenizer"))


def load_tokenizer(folder: Path | None = None, own: bool = False):
    """The folder's own tokenizer, else (unless ``own``: a model whose text encoder is not
    CLIP's) the CLIP BPE tokenizer shipped with the package."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from napari_vlsm.core.errors import ModelNotFoundError

    names = ("vocab.json", "tokenizer.json", "vocab.txt")
    if folder is not None and any((folder / n).exists() for n in names):
        return AutoTokenizer.from_pretrained(folder)
    if own:
        raise ModelNotFoundError(f"{folder} has no tokenizer files ({', '.join(names)}); "
                                 "use the complete model folder.")
    tok = clip_tokenizer_dir()
    return CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"))


def load_image_processor(folder: Path, image_size: int):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    if (folder / "preprocessor_config.json").exists():
        return ViTImageProcessorPil.from_pretrained(folder)
    return clipseg_image_processor(image_size)


def clipseg_image_processor(image_size: int):
    """CLIPSeg's preprocessing: bilinear resize to a square, ImageNet mean/std."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, resample=2,
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
