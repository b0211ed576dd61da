"""BiomedCLIPSeg: BiomedCLIP's encoders with a CLIPSeg decoder, the benchmark's third VLSM family.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is an open_clip model:
a timm ViT-B/16 at 224 x 224 and a PubMedBERT text tower read at 256 tokens, whose CLS state
goes through a two-layer projection to 512 dimensions. The benchmark (medvlsm,
``BiomedCLIPEncCLIPSegDec``) feeds the ViT's block outputs to a CLIPSeg rd64 decoder and the
projected text embedding to its FiLM. Here the same network is rebuilt from transformers
parts (``ViTModel`` for the timm trunk, ``BertModel`` for the text tower), so running it needs
neither open_clip, timm nor torchvision; ``convert.py`` maps the hub's weights onto it.

The benchmark's block outputs: its list of hidden states starts after the first block (no
embedding entry) yet is indexed at ``extract_layer + 1``, so for CLIPSeg's extract layers
[3, 6, 9] the decoder reads blocks 4, 7 and 10 (0-based) and the image encoder runs 11 of
its 12 blocks. ``block_offset`` = 1 reproduces that; the probabilities then match the
benchmark's composition built from the same weights.
"""

from __future__ import annotations

from pathlib import Path


import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    CLIPSegConfig,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)
from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder

from napari_vlsm.core.models.clipseg import ClipSegBackend

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BiomedCLIP's preprocessing (open_clip_config.json)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 256
LORA_TARGETS = ["q_proj", "v_proj", "query", "value"]  # ViT and BERT attention


def rd64_decoder_config(vision_hidden: int, patch_size: int, projection_dim: int) -> dict:
    """CLIPSeg's rd64-refined decoder (CIDAS/clipseg-rd64-refined) for a given vision width."""
    return dict(vision_config=dict(hidden_size=vision_hidden, patch_size=patch_size), projection_dim=projection_dim,
                reduce_dim=64, extract_layers=[3, 6, 9], decoder_num_attention_heads=4,
                decoder_intermediate_size=2048, conditional_layer=0, use_complex_transposed_convolution=True)


def new_decoder(config: CLIPSegConfig) -> CLIPSegDecoder:
    """A CLIPSeg decoder with PyTorch's default initialisation. (transformers 5 initialises it
    with unit-variance weights, which gives logits in the thousands before any training.)"""
    decoder = CLIPSegDecoder(config)
    for m in decoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm)):
            m.reset_parameters()
    return decoder


class BiomedClipSegConfig(PretrainedConfig):
    """``vision_config``: a ViTConfig as a dict; ``text_config``: a BertConfig as a dict;
    ``decoder_config``: a CLIPSegConfig as a dict (its extract layers, reduce_dim, ...)."""

    model_type = "vlsm_biomedclipseg"

    def __init__(self, vision_config=None, text_config=None, decoder_config=None, projection_dim=512,
                 context_length=CONTEXT_LENGTH, block_offset=1, image_mean=OPENAI_MEAN, image_std=OPENAI_STD,
                 **kwargs):
        super().__init__(**kwargs)
        self.vision_config = dict(vision_config or {})
        self.text_config = dict(text_config or {})
        self.projection_dim = projection_dim
        self.decoder_config = dict(decoder_config or rd64_decoder_config(
            self.vision_config.get("hidden_size", 768), self.vision_config.get("patch_size", 16), projection_dim))
        self.context_length = context_length
        self.block_offset = block_offset
        self.extract_layers = list(self.decoder_config["extract_layers"])
        depth = self.vision_config.get("num_hidden_layers", 12)
        if max(self.extract_layers) + block_offset >= depth:
            raise ValueError(f"The decoder reads ViT block {max(self.extract_layers) + block_offset} (0-based) but the "
                             f"image encoder has {depth} blocks; a BiomedCLIP-style ViT needs at least "
                             f"{max(self.extract_layers) + block_offset + 1}.")
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def sub_configs_built(self) -> tuple[ViTConfig, BertConfig, CLIPSegConfig]:
        vision, text = ViTConfig(**self.vision_config), BertConfig(**self.text_config)
        decoder = CLIPSegConfig(**self.decoder_config)
        for c in (vision, text, decoder, decoder.vision_config):  # nested models get no choice from from_pretrained
            c._attn_implementation = "sdpa"
        return vision, text, decoder


class BiomedClipSegForImageSegmentation(PreTrainedModel):
    config_class = BiomedClipSegConfig
    base_model_prefix = "biomedclipseg"
    main_input_name = "pixel_values"

    def __init__(self, config: BiomedClipSegConfig):
        super().__init__(config)
        vision, text, decoder = config.sub_configs_built()
        self.vision = ViTModel(vision, add_pooling_layer=False)
        self.text = BertModel(text, add_pooling_layer=False)
        d, out = text.hidden_size, config.projection_dim
        # open_clip's "mlp" projection of the CLS state
        self.text_projection = nn.Sequential(nn.Linear(d, (d + out) // 2, bias=False), nn.GELU(),
                                             nn.Linear((d + out) // 2, out, bias=False))
        self.decoder = new_decoder(decoder)
        self.post_init()

    def _init_weights(self, module):
        pass  # the parts initialise themselves; pretrained encoders arrive through convert.py

    @property
    def feature_blocks(self) -> list[int]:
        """The 0-based ViT blocks whose outputs the decoder reads (see the module's docstring)."""
        return [e + self.config.block_offset for e in self.config.extract_layers]

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        blocks = self.feature_blocks
        hidden = self.vision.embeddings(pixel_values, interpolate_pos_encoding=True)  # crops train too
        activations = []
        for i, layer in enumerate(self.vision.layers[: max(blocks) + 1]):
            hidden = layer(hidden)
            if i in blocks:
                activations.append(hidden)
        return activations

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return self.text_projection(cls)



AutoConfig.register(BiomedClipSegConfig.model_type, BiomedClipSegConfig)
AutoModel.register(BiomedClipSegConfig, BiomedClipSegForImageSegmentation)


class BiomedClipSegBackend(ClipSegBackend):
    """Like CLIPSeg: the ViT runs once per image up to the last block the decoder reads and
    its activations are cached; PubMedBERT (its own WordPiece tokenizer, 256 tokens) and the
    decoder run per prompt. Finetuning trains the decoder by default, as the benchmark does."""

    name = "BiomedCLIPSeg"
    default_lr = {"decoder": 2e-4, "full": 1e-5, "lora": 1e-4}  # the benchmark's AdamW 2e-4 for the decoder
    image_encoder_prefixes = ("vision.",)
    lora_targets = LORA_TARGETS

    def __init__(self, module: BiomedClipSegForImageSegmentation, tokenizer, image_processor,
                 device: torch.device, dtype: torch.dtype, source: str = ""):
        super().__init__(module, tokenizer, image_processor, device, dtype, source)
        self.context_length = module.config.context_length

    def lora_roots(self) -> list[nn.Module]:
        return [self.module.vision, self.module.text]

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.module.encode_image(pixel_values.to(self.dtype))

    def text_from_tokens(self, input_ids, attention_mask) -> torch.Tensor:
        return self.module.encode_text(input_ids, attention_mask)


def biomedclip_image_processor(image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD):
    """BiomedCLIP's preprocessing: bicubic resize to a square, OpenAI CLIP mean/std."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, resample=3,
                                image_mean=list(mean), image_std=list(std))


def biomedclip_processor(folder, config: BiomedClipSegConfig):
    """The folder's saved preprocessing, else BiomedCLIP's own from the model's config."""
    from napari_vlsm.core.models.processors import load_image_processor

    if (Path(folder) / "preprocessor_config.json").exists():
        return load_image_processor(Path(folder), config.vision_config.get("image_size", 224))
    return biomedclip_image_processor(config.vision_config.get("image_size", 224), config.image_mean, config.image_std)
