"""CLIPSeg (``transformers.CLIPSegForImageSegmentation``) behind the backend interface.

For text prompts the decoder reads only the vision activations at ``extract_layers`` and
the text embedding, so the image encoder stops after the last extracted layer (a quarter
of the vision FLOPs in rd64) and its activations are what the predictor caches.
Unlike the stock forward, nothing here runs under ``no_grad``: the trainer decides what
learns by ``requires_grad``, so "full" and "lora" really train the encoders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPSegForImageSegmentation

from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.models.train_modes import TRAIN_MODES
from napari_vlsm.core.models.families import Family

LORA_TARGETS = ["q_proj", "v_proj"]


class ClipSegBackend(TorchBackend):
    name = "CLIPSeg"
    lora_targets = LORA_TARGETS

    def __init__(self, module: CLIPSegForImageSegmentation, tokenizer, image_processor,
                 device: torch.device, dtype: torch.dtype, source: str = ""):
        self.module = module.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device, self.dtype, self.source = device, dtype, source
        self.extract_layers = list(module.config.extract_layers)

    def lora_roots(self) -> list[torch.nn.Module]:
        """The encoders LoRA adapters go into."""
        return [self.module.clip]

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.image_processor.size
        if "height" in size:
            return size["height"], size["width"]
        return size["shortest_edge"], size["shortest_edge"]

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        vision = self.module.clip.vision_model
        hidden = vision.embeddings(pixel_values.to(self.dtype), interpolate_pos_encoding=True)
        hidden = vision.pre_layrnorm(hidden)
        wanted = set(self.extract_layers)
        activations = []
        for i, layer in enumerate(vision.encoder.layers[: max(wanted) + 1]):
            hidden = layer(hidden, None)
            if i in wanted:
                activations.append(hidden)
        return activations

    def text_from_tokens(self, input_ids, attention_mask) -> torch.Tensor:
        return self.module.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    def decode(self, features: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        n = text.shape[0]
        if features[0].shape[0] == 1 and n > 1:
            features = [f.expand(n, -1, -1) for f in features]
        logits = self.module.decoder(features, text.to(features[0].dtype)).logits
        return logits.reshape(n, logits.shape[-2], logits.shape[-1])

    def forward(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.decode(self.encode_image(pixel_values), self.encode_text(prompts))

    def trainable_parameters(self, mode: str) -> list[torch.nn.Parameter]:
        if mode not in TRAIN_MODES:
            raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}.")
        module = self.module
        module.requires_grad_(mode == "full")
        if mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            if not any("lora_A" in n for n, _ in module.named_parameters()):
                for root in self.lora_roots():
                    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=self.lora_targets), root)
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        module.decoder.requires_grad_(True)
        return [p for p in module.parameters() if p.requires_grad]

    def save(self, folder) -> None:
        folder = Path(folder)
        self.module.save_pretrained(folder, state_dict=merged_state_dict(self.module))
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with any LoRA adapters merged in, under the stock key names,
    so a LoRA-finetuned CLIPSeg is saved as a plain CLIPSeg checkpoint."""
    lora_layers = [m for m in module.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    if not lora_layers:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    for layer in lora_layers:
        layer.merge()
    try:
        state = {}
        for key, value in module.state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value.detach().clone()
        return state
    finally:
        for layer in lora_layers:
            layer.unmerge()


def clipseg_config(shape: str = "tiny"):
    """A CLIPSeg config: "rd64" is ``CIDAS/clipseg-rd64-refined``'s shape (ViT-B/16, 352x352,
    reduce_dim 64, 150.7 M parameters: random weights of it measure speed offline), "tiny" one
    for tests."""
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


def build_random_clipseg(folder, seed: int = 0, shape: str = "tiny") -> Path:
    """Write a random CLIPSeg of ``shape`` with a real CLIP tokenizer and processor to ``folder``."""
    from transformers import CLIPSegForImageSegmentation

    from napari_vlsm.core.models.loading import quiet_transformers
    from napari_vlsm.core.models.processors import clipseg_image_processor, load_tokenizer

    quiet_transformers()
    torch.manual_seed(seed)
    config = clipseg_config(shape)
    model = CLIPSegForImageSegmentation(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    load_tokenizer(folder).save_pretrained(folder)
    clipseg_image_processor(config.vision_config.image_size).save_pretrained(folder)
    return folder


def load(folder, device, dtype, source: str = "") -> ClipSegBackend:
    from napari_vlsm.core.models.loading import strict_from_pretrained
    from napari_vlsm.core.models.processors import load_image_processor, load_tokenizer

    module = strict_from_pretrained(CLIPSegForImageSegmentation, folder)
    processor = load_image_processor(folder, module.config.vision_config.image_size)
    return ClipSegBackend(module, load_tokenizer(folder), processor, device, dtype, source)


def onnx_meta(backend) -> dict:
    return {"preprocess": "image_processor"}  # the saved preprocessor_config.json


FAMILY = Family(model_type="clipseg", name=ClipSegBackend.name, load=load, build_random=build_random_clipseg,
                onnx_meta=onnx_meta)
