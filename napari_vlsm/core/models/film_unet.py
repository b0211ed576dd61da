"""FiLM-UNet: the project's small offline vision-language segmentation model.

A convolutional UNet image encoder (which learns from a few hundred images, unlike a ViT
trained from scratch) and a small text transformer over the CLIP tokenizer, joined the
way CLIPSeg joins them: the pooled text embedding scales and shifts (FiLM) the decoder's
features at every level. The encoder output is what the predictor caches; a new prompt
runs only the text encoder and the decoder. It is a ``transformers.PreTrainedModel``,
saved and loaded with ``save_pretrained`` / ``from_pretrained`` as config + safetensors.

Concept adapters: a class taught later (finetuning on corrections of a class the model did
not know) gets its own copy of the image path (encoder, FiLM, decoder, head), trained from
the base's weights while the base stays frozen. A prompt goes to the path of the nearest
prompt in the route table (its text embedding, cosine): the base's own prompts, the
negatives it was trained with, and each adapter's prompts. The base's answers to its own
prompts are therefore unchanged by any later finetuning of a new class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from napari_vlsm.core.models.backend import TorchBackend, resize_normalize_meta
from napari_vlsm.core.models.train_modes import TRAIN_MODES
from napari_vlsm.core.models.efficientnet_lite import CHANNELS as EFFICIENTNET_CHANNELS
from napari_vlsm.core.models.efficientnet_lite import NAME as EFFICIENTNET_LITE0
from napari_vlsm.core.models.efficientnet_lite import EfficientNetLite0Encoder
from napari_vlsm.core.models.families import Family
from napari_vlsm.core.images.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_normalize


class FilmUNetConfig(PretrainedConfig):
    model_type = "vlsm_film_unet"

    def __init__(self, widths=(8, 16, 32, 64, 256), image_size=256, text_dim=64, text_layers=2,
                 text_heads=4, vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                 image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, adapters=0, route_prompts=(),
                 route_owners=(), flip_average=False, encoder="unet", guidance=0, **kwargs):
        # "unet": the UNet encoder below, widths its levels' channels from full resolution down;
        # "efficientnet_lite0": that network (ImageNet weights to start from), its levels'
        # channels as widths, from half resolution down (logits upsampled 2x)
        self.encoder = encoder
        self.widths = list(widths)
        # clicks, a box and the previous result as extra input maps (core/images/guidance.py): 0 for
        # a text-only model, else their number; they join the image features at guide_level()
        self.guidance = guidance
        self.flip_average = flip_average          # predict on the image and its mirror, average the logits
        self.adapters = adapters                  # image paths of classes taught after the base
        self.route_prompts = list(route_prompts)  # prompt -> path table (0: the base, k: adapter k)
        self.route_owners = list(route_owners)
        self.image_size = image_size
        self.text_dim = text_dim
        self.text_layers = text_layers
        self.text_heads = text_heads
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(eos_token_id=eos_token_id, **kwargs)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TextEncoder(nn.Module):
    def __init__(self, cfg: FilmUNetConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.text_dim)
        self.layers = nn.ModuleList([TextBlock(cfg.text_dim, cfg.text_heads) for _ in range(cfg.text_layers)])
        self.norm = nn.LayerNorm(cfg.text_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        attend = attention_mask != 0
        for layer in self.layers:
            x = layer(x, attend)
        x = self.norm(x)
        weights = attention_mask.to(x.dtype)[..., None]
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TextBlock(nn.Module):
    """A pre-norm transformer layer with the parameters and the math of
    ``nn.TransformerEncoderLayer(norm_first=True, dropout=0)``, written out so that ONNX
    export keeps the batch and length dynamic (the stock layer's trace fixes them)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)  # holds the weights
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(self.norm1(x), self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        x = x + self.self_attn.out_proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


def image_encoder(config: FilmUNetConfig) -> nn.Module:
    if config.encoder == EFFICIENTNET_LITE0:
        if tuple(config.widths) != EFFICIENTNET_CHANNELS:
            raise ValueError(f"The {config.encoder} encoder's levels have {EFFICIENTNET_CHANNELS} channels; "
                             f"the config's widths are {tuple(config.widths)}.")
        return EfficientNetLite0Encoder()
    if config.encoder != "unet":
        raise ValueError(f"Unknown image encoder {config.encoder!r}: 'unet' or '{EFFICIENTNET_LITE0}'.")
    w = config.widths
    return nn.ModuleList([conv_block(3, w[0])] + [conv_block(a, b) for a, b in zip(w, w[1:])])


GUIDE_LEVEL = 3  # the first image-encoder level whose input carries the clicks and box


def guide_level(config: FilmUNetConfig) -> int:
    """The levels before this one read the image alone, so a click reuses them (cached with
    the image) and reruns only the later levels and the decoder: the first three levels of
    EfficientNet-Lite0 are half of its cost, and correction rounds leave them frozen anyway."""
    return max(1, min(GUIDE_LEVEL, len(config.widths) - 1))


def guide_encoder(config: FilmUNetConfig) -> nn.Sequential:
    """Guidance maps -> features added to the input of ``guide_level``: stride-2 convolutions
    down to that level's scale, then a 1x1 projection that starts at zero (the model answers
    as it did without guidance until it learns to use it). No biases: zero maps add exactly
    zero, so a text-only answer is the same with or without this branch."""
    from napari_vlsm.core.images.guidance import GUIDANCE_CHANNELS

    k = guide_level(config)
    downsample = 2 ** (k if config.encoder == EFFICIENTNET_LITE0 else k - 1)  # the scale of level k-1
    layers, c = [], GUIDANCE_CHANNELS
    for _ in range(max(int(np.log2(downsample)), 1)):
        stride = 2 if downsample > 1 else 1
        layers += [nn.Conv2d(c, 16, 3, stride=stride, padding=1, bias=False), nn.ReLU(inplace=True)]
        c, downsample = 16, downsample // stride
    project = nn.Conv2d(c, config.widths[k - 1], 1, bias=False)
    nn.init.zeros_(project.weight)
    return nn.Sequential(*layers, project)


def image_decoder(w: list[int], text_dim: int) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList, nn.Conv2d]:
    """One FiLM (scale, shift) per decoder level, bottleneck included; up-convolutions;
    decoder blocks; the 1x1 head."""
    return (nn.ModuleList([nn.Linear(text_dim, 2 * c) for c in reversed(w)]),
            nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(w[:-1], w[1:])][::-1]),
            nn.ModuleList([conv_block(2 * a, a) for a in w[:-1]][::-1]),
            nn.Conv2d(w[0], 1, 1))


class ImagePath(nn.Module):
    """The image side of the model, conditioned on a text embedding: UNet encoder, FiLM,
    decoder and head."""

    def __init__(self, config: FilmUNetConfig):
        super().__init__()
        self.config = config
        self.encoder = image_encoder(config)
        self.films, self.ups, self.decoder, self.head = image_decoder(config.widths, config.text_dim)
        if config.guidance:
            self.guide = guide_encoder(config)

    def encoder_level_parameters(self, levels: int) -> list[nn.Parameter]:
        """The weights of the image encoder's first ``levels`` levels (the stem included)."""
        encoder = self.encoder
        if not isinstance(encoder, nn.ModuleList):  # EfficientNet-Lite0
            return encoder.level_parameters(levels)
        return [p for block in encoder[:levels] for p in block.parameters()]

    def encode(self, pixel_values: torch.Tensor, guidance: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The encoder's levels; with ``guidance`` (N, GUIDANCE_CHANNELS, h, w) at the input's
        size, the levels from ``guide_level`` on read it too."""
        if guidance is None:
            return ImagePath._levels(self, pixel_values, 0)
        k = guide_level(self.config)
        return ImagePath.encode_guided(self, ImagePath._levels(self, pixel_values, 0, k), guidance)

    def encode_guided(self, feats: list[torch.Tensor], guidance: torch.Tensor) -> list[torch.Tensor]:
        """The levels from ``guide_level`` on again, from the image-only levels before it
        (``feats``: at least those) and the guidance maps."""
        k = guide_level(self.config)
        x = feats[k - 1]
        if x.shape[0] != guidance.shape[0]:
            x = x.expand(guidance.shape[0], -1, -1, -1)
        x = x + self.guide(guidance.to(x.dtype)).contiguous(memory_format=torch.channels_last)
        low = [f.expand(guidance.shape[0], -1, -1, -1) if f.shape[0] != guidance.shape[0] else f for f in feats[:k]]
        return low + ImagePath._levels(self, x, k, None, from_features=True)

    def _levels(self, x: torch.Tensor, start: int, stop: int | None = None,
                from_features: bool = False) -> list[torch.Tensor]:
        """Levels ``start`` to ``stop`` from the pixels (start 0) or from level start-1's features."""
        encoder = self.encoder
        if not isinstance(encoder, nn.ModuleList):  # EfficientNet-Lite0
            return encoder.levels(x if from_features else encoder.stem(x), start, stop)
        feats = []
        for i in range(start, len(encoder) if stop is None else stop):
            x = encoder[i](x if i == 0 else F.max_pool2d(x, 2))
            feats.append(x)
        return feats

    @staticmethod
    def _film(x: torch.Tensor, film: nn.Linear, text: torch.Tensor) -> torch.Tensor:
        scale, shift = film(text).chunk(2, dim=-1)
        return x * (1 + scale[..., None, None]) + shift[..., None, None]

    def decode(self, feats: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        n = text.shape[0]
        if feats[0].shape[0] == 1 and n > 1:
            feats = [f.expand(n, -1, -1, -1) for f in feats]
        x = ImagePath._film(feats[-1], self.films[0], text)
        for up, block, film, skip in zip(self.ups, self.decoder, self.films[1:], reversed(feats[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
            x = ImagePath._film(x, film, text)
        logits = self.head(x)
        stride = getattr(self.encoder, "output_stride", 1)  # the UNet encoder's top level is full size
        if stride > 1:
            logits = F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)
        return logits[:, 0]


class FilmUNetForSegmentation(PreTrainedModel):
    config_class = FilmUNetConfig
    base_model_prefix = "film_unet"
    main_input_name = "pixel_values"

    def __init__(self, config: FilmUNetConfig):
        super().__init__(config)
        # the base path's parts sit on the model itself (ImagePath's names), so weight names and
        # the order of random initialisation stay as they were before adapters
        self.encoder = image_encoder(config)
        self.text_encoder = TextEncoder(config)
        self.films, self.ups, self.decoder, self.head = image_decoder(config.widths, config.text_dim)
        self.adapters = nn.ModuleList([ImagePath(config) for _ in range(config.adapters)])
        if config.guidance:  # after the other parts: their random initialisation stays as it was
            self.guide = guide_encoder(config)
        if config.route_prompts:
            self.register_buffer("route_embeddings", torch.zeros(len(config.route_prompts), config.text_dim))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module in getattr(self, "films", []):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def paths(self) -> list[nn.Module]:
        """The base path (this model: its parts have ImagePath's names) and the adapters."""
        return [self, *self.adapters]

    def encode_image(self, pixel_values: torch.Tensor, guidance: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every path's features, one flat list (levels of the base, then of each adapter);
        ``guidance``: clicks, box and previous result as maps (``ImagePath.encode``)."""
        return [f for path in self.paths for f in ImagePath.encode(path, pixel_values, guidance)]

    def encode_guided(self, feats: list[torch.Tensor], guidance: torch.Tensor) -> list[torch.Tensor]:
        """``encode_image``'s features with clicks, box and previous result (``guidance``),
        reusing the image-only levels of ``feats`` (an image's cached features)."""
        levels = len(self.config.widths)
        return [f for k, path in enumerate(self.paths)
                for f in ImagePath.encode_guided(path, feats[k * levels:(k + 1) * levels], guidance)]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)

    def route(self, text: torch.Tensor) -> torch.Tensor:
        """The path of each prompt: the owner of the nearest prompt of the route table."""
        owners = torch.tensor(self.config.route_owners, device=text.device)
        sims = F.normalize(text.float(), dim=-1) @ F.normalize(self.route_embeddings.float(), dim=-1).T
        return owners[sims.argmax(-1)]

    def decode(self, feats: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        levels = len(self.config.widths)
        if not self.adapters:
            return ImagePath.decode(self, feats[:levels], text)
        owner = self.route(text)
        if torch.jit.is_tracing():  # an export keeps every path, chosen per prompt in the graph
            logits = ImagePath.decode(self, feats[:levels], text)
            for k, adapter in enumerate(self.adapters, 1):
                own = ImagePath.decode(adapter, feats[k * levels:(k + 1) * levels], text)
                logits = torch.where((owner == k)[:, None, None], own, logits)
            return logits
        # each path decodes only the prompts it owns: an adapter's prompt costs one decoder pass
        logits = None
        for k, path in enumerate(self.paths):
            mine = owner == k
            if not bool(mine.any()):
                continue
            own_feats = feats[k * levels:(k + 1) * levels]
            if own_feats[0].shape[0] > 1:  # image i goes with prompt i
                own_feats = [f[mine] for f in own_feats]
            own = ImagePath.decode(path, own_feats, text[mine])
            if logits is None:
                logits = own.new_zeros((len(text), *own.shape[1:]))
            logits[mine] = own
        return logits

    def forward(self, pixel_values, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.decode(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))

    def add_adapter(self) -> int:
        """A new path for a new class, starting from the base's weights; its number."""
        adapter = ImagePath(self.config).to(device=self.head.weight.device, dtype=self.head.weight.dtype)
        for name in ("encoder", "films", "ups", "decoder", "head") + (("guide",) if self.config.guidance else ()):
            getattr(adapter, name).load_state_dict(getattr(self, name).state_dict())
        self.adapters.append(adapter.to(memory_format=torch.channels_last))
        self.config.adapters = len(self.adapters)
        return len(self.adapters)

    def set_routes(self, prompts: list[str], owners: list[int], embeddings: torch.Tensor) -> None:
        """The route table: each prompt, the path that answers it, and its text embedding."""
        self.config.route_prompts, self.config.route_owners = list(prompts), [int(o) for o in owners]
        embeddings = embeddings.detach().to(self.head.weight.device, torch.float32)
        if "route_embeddings" in self._buffers:
            self.route_embeddings = embeddings
        else:
            self.register_buffer("route_embeddings", embeddings)


AutoConfig.register(FilmUNetConfig.model_type, FilmUNetConfig)
AutoModel.register(FilmUNetConfig, FilmUNetForSegmentation)


class FilmUNetBackend(TorchBackend):
    name = "FiLM-UNet"
    # small enough to train whole: a new domain needs the encoder, new words the text side
    default_train_mode = "full"
    @property
    def default_lr(self) -> dict[str, float]:
        # On the pretrained encoder a round of the shared network forgets less at 3e-4: 20
        # corrections of polyps at 1e-3 cost the other sets 0.05-0.09 Dice, at 3e-4 0.01-0.06
        # (docs/finetune.md). An adapter cannot make the base forget: its first round moves it
        # away from the base's weights at 2e-3; the rounds that continue it keep 1e-3, as 2e-3
        # there undid what the earlier rounds learned (docs/corrections.md).
        pretrained = self.module.config.encoder == EFFICIENTNET_LITE0
        return {"decoder": 1e-3, "full": 3e-4 if pretrained else 1e-3, "adapter": 1e-3,
                **({"new adapter": 2e-3} if pretrained else {})}
    default_crop = 160  # fully convolutional: crops are cheaper steps and an augmentation

    @property
    def default_frozen_levels(self) -> int:
        # The pretrained encoder's first three levels (strides 2-8: edges, textures) serve a new
        # domain as they are; not training them makes a step a third cheaper, and a round of 20
        # ultrasound corrections learned as well (docs/corrections.md). Four frozen levels learned worse.
        return 3 if self.module.config.encoder == EFFICIENTNET_LITE0 else 0
    image_encoder_prefixes = ("encoder.",)

    def __init__(self, module: FilmUNetForSegmentation, tokenizer, device, dtype, source: str = ""):
        # channels-last convolutions run about 1.5x faster on the CPU
        self.module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        self.tokenizer = tokenizer
        self.device, self.dtype, self.source = device, dtype, source
        self.flip_average = bool(getattr(module.config, "flip_average", False))

    @property
    def input_size(self) -> tuple[int, int]:
        s = self.module.config.image_size
        return s, s

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        cfg = self.module.config
        x = resize_normalize(images, self.input_size, cfg.image_mean, cfg.image_std, self.device)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @property
    def takes_clicks(self) -> bool:
        return bool(getattr(self.module.config, "guidance", 0))

    def encode_image(self, pixel_values, guidance=None):
        return self.module.encode_image(pixel_values.to(self.dtype), guidance)

    def encode_guided(self, features, guidance):
        return self.module.encode_guided(features, guidance.to(self.device, self.dtype))

    def text_from_tokens(self, input_ids, attention_mask):
        return self.module.encode_text(input_ids, attention_mask)

    def decode(self, features, text):
        return self.module.decode(features, text.to(features[0].dtype))

    def forward(self, pixel_values, prompts):
        return self.decode(self.encode_image(pixel_values), self.encode_text(prompts))

    def trainable_parameters(self, mode: str):
        if mode not in TRAIN_MODES:
            raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}.")
        if mode == "lora":
            raise ValueError("LoRA adapters are for the transformer encoders of CLIPSeg; "
                             "train the FiLM-UNet with 'decoder' or 'full'.")
        m = self.module
        m.requires_grad_(mode == "full")
        for part in (m.films, m.ups, m.decoder, m.head):
            part.requires_grad_(True)
        m.adapters.requires_grad_(False)  # a class's adapter trains alone (adapters.py)
        return [p for p in m.parameters() if p.requires_grad]

    def save(self, folder) -> None:
        self.module.save_pretrained(Path(folder))
        self.tokenizer.save_pretrained(Path(folder))


# a FiLM-UNet small enough for tests: 64 px, widths 4-16, a one-layer text encoder
TINY_FILM_UNET = dict(widths=[4, 8, 16], image_size=64, text_dim=16, text_layers=1, text_heads=2, guidance=4)


def build_random_film_unet(folder, seed: int = 0, **config) -> Path:
    """Write a random FiLM-UNet (default shape, or ``config`` overrides) to ``folder``."""
    from napari_vlsm.core.models.film_unet import FilmUNetConfig, FilmUNetForSegmentation
    from napari_vlsm.core.models.processors import load_tokenizer

    torch.manual_seed(seed)
    model = FilmUNetForSegmentation(FilmUNetConfig(**config)).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    load_tokenizer(folder).save_pretrained(folder)
    return folder


def load(folder, device, dtype, source: str = "") -> FilmUNetBackend:
    from napari_vlsm.core.models.loading import strict_from_pretrained
    from napari_vlsm.core.models.processors import load_tokenizer

    return FilmUNetBackend(strict_from_pretrained(FilmUNetForSegmentation, folder), load_tokenizer(folder),
                           device, dtype, source)


def new_film_unet(device="auto", encoders=None, seed: int = 0, **config) -> FilmUNetBackend:
    """A freshly initialised FiLM-UNet with the CLIP tokenizer, for training from scratch."""
    from napari_vlsm.core.device import pick_device
    from napari_vlsm.core.models.processors import load_tokenizer

    torch.manual_seed(seed)
    module = FilmUNetForSegmentation(FilmUNetConfig(**config))
    return FilmUNetBackend(module, load_tokenizer(), pick_device(device), torch.float32, "new:film-unet")


def _build_random(folder, seed: int = 0) -> Path:
    return build_random_film_unet(folder, seed=seed, **TINY_FILM_UNET)


def with_guidance(module: FilmUNetForSegmentation) -> FilmUNetForSegmentation:
    """A copy of a text-only FiLM-UNet that also takes clicks, a box and the previous result:
    the same weights, plus guidance encoders that start at zero (it answers as before until
    trained with guidance)."""
    from napari_vlsm.core.images.guidance import GUIDANCE_CHANNELS

    config = FilmUNetConfig.from_dict({**module.config.to_dict(), "guidance": GUIDANCE_CHANNELS})
    out = FilmUNetForSegmentation(config)
    missing, unexpected = out.load_state_dict(module.state_dict(), strict=False)
    if unexpected or any(".guide." not in f".{m}" for m in missing):
        raise ValueError(f"Weights do not fit the guided model: {unexpected[:3]} {missing[:3]}")
    return out


FAMILY = Family(model_type=FilmUNetConfig.model_type, name=FilmUNetBackend.name, load=load,
                build_random=_build_random, onnx_meta=resize_normalize_meta, new=new_film_unet, new_key="film-unet",
                new_help="a FiLM-UNet from scratch", train_modes=("decoder", "full"), adapters=True, clicks=True)
