"""The interface the predictor, trainer and exporter talk to.

A backend splits a vision-language segmentation model the way Segment Anything splits
SAM: an expensive image encoder, run once per image, and a cheap prompt decoder, run
once per prompt. CLIPSeg, the project's offline FiLM-UNet and the ONNX runtime backend
all implement it; other VLSM families (BiomedCLIP encoders, CRIS) plug in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
MAX_TOKENS = 77  # the CLIP text encoders' context


def warn_if_cut(tokenizer, prompts, limit: int = MAX_TOKENS) -> None:
    """Say so when a prompt is longer than the text encoder reads (it is cut)."""
    import warnings

    for p in prompts:
        if len(p) <= limit - 2:  # a token covers at least one character: cannot be cut
            continue
        n = len(tokenizer(p, truncation=False)["input_ids"])
        if n > limit:
            warnings.warn(f"The prompt '{p[:40]}…' has {n} tokens; the text encoder reads the first {limit}, "
                          "the rest is ignored. Shorten it to what matters.", UserWarning, stacklevel=3)


def resize_normalize_meta(backend) -> dict:
    """What an ONNX export of a model that resizes and normalises by its config's mean/std
    needs to preprocess the same way (vlsm_onnx.json)."""
    cfg = backend.module.config
    return {"preprocess": "resize_normalize", "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)}


class Backend(ABC):
    """One loaded model on one device. ``features`` are opaque to callers."""

    name: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    source: str = ""  # the spec or folder it was loaded from
    input_size: tuple[int, int]  # (h, w) the model sees: 352 x 352 for CLIPSeg rd64, 256 x 256 for the FiLM-UNet
    flip_average: bool = False  # the predictor also reads the mirrored image and averages (the model's config says)

    @abstractmethod
    def preprocess(self, images: list[np.ndarray]) -> Any:
        """N images, each (H, W, 3) uint8 RGB of any size -> the model's batched input,
        (N, 3, h, w) at ``input_size``, normalised, on ``device`` in ``dtype``."""

    @abstractmethod
    def encode_image(self, pixel_values: Any) -> Any:
        """Run the image encoder once on (N, 3, h, w); return what the decoder needs for each
        image (for CLIPSeg the activations of its extract layers, for the FiLM-UNet the
        encoder's feature maps), batch first."""

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> Any:
        """P prompt strings -> (P, d) conditioning vectors (d: 512 for CLIPSeg, text_dim for
        the FiLM-UNet). Prompts longer than the text encoder reads are cut, with a warning."""

    @abstractmethod
    def decode(self, features: Any, text: Any) -> torch.Tensor:
        """Logits (P, h, w). ``features`` of batch 1 are broadcast over the P prompts;
        otherwise image i goes with prompt i."""

    @property
    def takes_clicks(self) -> bool:
        """Whether this model reads clicks, a box and a previous result beside the text."""
        return False

    def encode_guided(self, features: Any, guidance: Any) -> Any:
        """``features`` of one image (from ``encode_image``) redone with guidance maps
        (N, GUIDANCE_CHANNELS, h, w) at ``input_size``: one image, N click states."""
        raise NotImplementedError(f"{self.name or 'This model'} takes text prompts only.")

    def select(self, features: Any, index: int) -> Any:
        """The features of image ``index`` of a batch, as a batch of one."""
        return [f[index : index + 1] for f in features]


class TorchBackend(Backend):
    """A backend around a trainable ``torch.nn.Module`` saved as a Hugging Face folder."""

    module: torch.nn.Module
    tokenizer: Any
    default_train_mode = "decoder"  # what finetuning trains unless told otherwise
    default_lr = {"decoder": 1e-3, "full": 1e-4, "lora": 3e-4}
    default_crop: int | None = None  # train on random crops of this side (fully convolutional models)
    default_frozen_levels = 0        # image-encoder levels a round leaves as they are
    image_encoder_prefixes: tuple = ("clip.vision_model.",)  # parameter names of the image encoder
    context_length: int = MAX_TOKENS  # tokens the text encoder reads

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids padded to the longest prompt (the CLIP text encoders pool at the
        end-of-text token and BERT reads its CLS token under the attention mask, so shorter
        padding gives the same embedding for less work)."""
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.context_length,
                               return_overflowing_tokens=False, return_length=False, return_tensors="pt")
        warn_if_cut(self.tokenizer, prompts, self.context_length)
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_from_tokens(**self.tokenize(prompts))

    @abstractmethod
    def text_from_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> one conditioning vector per prompt."""

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable logits (B, h, w) for training: image i with prompt i."""

    @abstractmethod
    def trainable_parameters(self, mode: str) -> list[torch.nn.Parameter]:
        """Freeze what ``mode`` (one of TRAIN_MODES) leaves fixed; return what it trains."""

    @abstractmethod
    def save(self, folder) -> None:
        """Write config, safetensors weights and tokenizer/processor files to ``folder``."""

    @property
    def input_size(self) -> tuple[int, int]:
        raise NotImplementedError
