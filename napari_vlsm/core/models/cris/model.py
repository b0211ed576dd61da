"""CRIS (CLIP-Driven Referring Image Segmentation, Wang et al. 2022) as the medvlsm benchmark builds it.

The network of ``src/models/cris_model`` in naamiinepal/medvlsm (CRIS.pytorch's ``model/``
with a bicubic upsampling of the logits to the input size):

* ``backbone``: OpenAI CLIP RN50. The image side is CLIP's modified ResNet whose stage-2
  and stage-3 outputs (C3, C4) and attention-pool output (C5, kept as a map; CRIS adds the
  residual ``connect`` conv) feed the neck. The text side is CLIP's causal transformer:
  every token's state after ``ln_final`` (the words) and the end-of-text state through
  ``text_projection`` (the sentence state).
* ``neck``: the multi-modal FPN. Only ``f1_v_proj``, ``f2_v_proj`` and ``f3_v_proj`` (with
  the average pool after it) see image features alone; everything from ``f5 * state`` on
  depends on the prompt.
* ``decoder``: vision-language transformer layers over the C4-sized map: self-attention
  between visual tokens, cross-attention to the words (padding masked out), sine position
  encodings for both.
* ``proj``: the Projector turns the sentence state into one 3x3 kernel and bias per prompt
  and convolves the upsampled visual features with it.

Module and parameter names are those of the original, so a CRIS release checkpoint's
``state_dict`` loads after dropping DataParallel's ``module.`` prefix (``cris_convert.py``).

The split for the predictor: ``encode_image`` runs the ResNet and the neck's image-only
convolutions once per image; ``decode`` runs the rest of the neck, the decoder and the
projector once per prompt.

Prompts are padded to ``context_length`` (77) and ``pad_mask = tokens == 0`` (CRIS's rule) in
one of two ways, the one the weights were trained with (``CrisConfig.text_padding``):

* ``"zero"``: CRIS.pytorch's own tokenizer pads with 0, so the padding words are masked out of
  the decoder's cross-attention. Padding then does not change a prompt's result (the text
  transformer is causal). A release checkpoint (``module.`` keys) was trained so.
* ``"eot"``: medvlsm tokenizes for CRIS with CLIPSeg's tokenizer and ``padding="max_length"``,
  whose pad token is ``<|endoftext|>`` (49407), not 0: the pad mask then masks nothing and the
  decoder attends to all 77 positions, the end-of-text copies included. Weights finetuned by
  the benchmark (its Lightning module's ``net.`` keys) learnt that. On one such model the two
  paddings gave probabilities up to 0.50 apart, so a folder records its own.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from napari_vlsm.core.models.backend import TorchBackend
from napari_vlsm.core.models.train_modes import TRAIN_MODES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the benchmark's img_mean / img_std for CRIS
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EOT_TOKEN_ID = 49407  # CLIP's <|endoftext|>: the CLIP/CLIPSeg tokenizer's pad token
# How prompts are padded to context_length: with 0, masked out of the decoder (CRIS.pytorch), or
# with <|endoftext|>, which the pad mask (tokens == 0) does not mask (medvlsm); module docstring.
TEXT_PADDINGS = ("zero", "eot")
BENCHMARK_THRESHOLD = 0.35  # medvlsm's configs/model/cris.yaml (CRIS.pytorch tests at 0.35 too)
# peft LoRA goes into the backbone's linear layers that run as modules: the attention pool's
# q/k/v/c projections, the text blocks' attention output and MLP
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "c_proj", "c_fc", "out_proj"]

# The release shape (CRIS R50 with medvlsm's configs/model/cris.yaml) and a tiny one of the
# same layout for tests. In "tiny" the CLIP conventions the converter infers shapes by still
# hold: 64-wide text (one head), attention-pool heads = width * 32 / 64, 8 decoder heads.
SHAPES = {
    "rn50": dict(vision_layers=(3, 4, 6, 3), vision_width=64, embed_dim=1024, attnpool_grid=7, text_width=512,
                 text_layers=12, text_heads=8, fpn_in=(512, 1024, 1024), fpn_out=(256, 512, 1024), vis_dim=512,
                 word_dim=1024, num_layers=3, num_head=8, dim_ffn=2048, image_size=416),
    "tiny": dict(vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=64, attnpool_grid=3, text_width=64,
                 text_layers=2, text_heads=1, fpn_in=(64, 128, 64), fpn_out=(32, 64, 64), vis_dim=64,
                 word_dim=64, num_layers=2, num_head=8, dim_ffn=128, image_size=64),
}


class CrisConfig(PretrainedConfig):
    """Defaults: the release shape. ``context_length`` is CRIS's ``word_len`` (77 in medvlsm,
    also CLIP's context); ``attnpool_grid``: the side of CLIP's attention-pool position grid
    (224 / 32 = 7 for RN50), resized to the C5 map's size as CRIS does."""

    model_type = "vlsm_cris"

    def __init__(self, vision_layers=(3, 4, 6, 3), vision_width=64, vision_heads=None, embed_dim=1024,
                 attnpool_grid=7, text_width=512, text_layers=12, text_heads=8, vocab_size=49408,
                 context_length=77, fpn_in=(512, 1024, 1024), fpn_out=(256, 512, 1024), vis_dim=512,
                 word_dim=1024, num_layers=3, num_head=8, dim_ffn=2048, dropout=0.2, intermediate=False,
                 image_size=416, image_mean=CLIP_MEAN, image_std=CLIP_STD, text_padding="zero",
                 eot_token_id=EOT_TOKEN_ID, **kwargs):
        super().__init__(**kwargs)
        self.vision_layers = list(vision_layers)
        self.vision_width = vision_width
        self.vision_heads = vision_heads or vision_width * 32 // 64  # CLIP's rule for the attention pool
        self.embed_dim = embed_dim
        self.attnpool_grid = attnpool_grid
        self.text_width, self.text_layers, self.text_heads = text_width, text_layers, text_heads
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.fpn_in, self.fpn_out = list(fpn_in), list(fpn_out)
        self.vis_dim, self.word_dim = vis_dim, word_dim
        self.num_layers, self.num_head, self.dim_ffn = num_layers, num_head, dim_ffn
        self.dropout = dropout  # medvlsm's cris.yaml (CRIS's RefCOCO configs use 0.1); training only
        self.intermediate = intermediate
        self.image_size = image_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.text_padding = text_padding  # "zero" (CRIS.pytorch's) or "eot" (the benchmark's): module docstring
        self.eot_token_id = eot_token_id  # CLIP's <|endoftext|>, the pad token of the "eot" padding
        self._check()

    def _check(self) -> None:
        w = self.vision_width
        wanted = [w * 8, w * 16, self.embed_dim]  # C3, C4 channels; C5 is the attention pool's output
        if self.fpn_in != wanted:
            raise ValueError(f"fpn_in must be the backbone's C3/C4/C5 channels {wanted}, not {self.fpn_in}.")
        if self.word_dim != self.embed_dim:
            raise ValueError(f"word_dim ({self.word_dim}) must be the sentence state's size, embed_dim "
                             f"({self.embed_dim}).")
        if not self.vis_dim == self.text_width == self.fpn_out[1]:
            raise ValueError(f"vis_dim ({self.vis_dim}), text_width ({self.text_width}) and fpn_out[1] "
                             f"({self.fpn_out[1]}) must be equal: the decoder attends from the neck's map "
                             "to the words.")
        if self.vis_dim % 4 or self.vis_dim % self.num_head or self.text_width % self.text_heads:
            raise ValueError("vis_dim must be divisible by 4 and by num_head, text_width by text_heads.")
        if self.image_size % 32:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of 32.")
        if self.text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding is {' or '.join(TEXT_PADDINGS)}, not {self.text_padding!r}.")


# ---------------------------------------------------------------- CLIP RN50 (CRIS's clip.py)

class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computed in fp32 whatever the input dtype."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # all convs have stride 1; an avgpool follows the second one when stride > 1
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pool as CRIS uses it: over every position of the C5 map (no pooled
    token), its position grid resized bicubically to the map, plus the ``connect`` residual.
    The attention is written out with the projection modules (the original passes their
    weights to ``F.multi_head_attention_forward``; the math is the same) so LoRA can wrap them."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.connect = nn.Sequential(nn.Conv2d(embed_dim, output_dim, 1, stride=1, bias=False),
                                     nn.BatchNorm2d(output_dim))

    def resized_pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        g = self.spacial_dim
        grid = self.positional_embedding[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # the class token's row is unused
        grid = F.interpolate(grid, size=size, align_corners=False, mode="bicubic")
        return grid.flatten(2)  # 1, C, HW

    def forward(self, x):
        b, c, h, w = x.shape
        res = self.connect(x)
        x = (x.reshape(b, c, -1) + self.resized_pos_embed((h, w)).to(x.dtype)).transpose(1, 2)  # B, HW, C
        heads = self.num_heads
        q, k, v = (p(x).reshape(b, h * w, heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        x = self.c_proj(a).transpose(1, 2).reshape(b, -1, h, w)
        return F.relu(x + res, True)


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim: int, heads: int, attnpool_grid: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(attnpool_grid, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = x.to(self.conv1.weight.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        x = self.layer1(self.avgpool(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.attnpool(self.layer4(c4))
        return c3, c4, c5


class ResidualAttentionBlock(nn.Module):
    """CLIP's text block. ``attn`` (an ``nn.MultiheadAttention``) holds the weights; the
    attention is written out (same math) so that the output projection runs as a module
    (LoRA can wrap it) and the ONNX export stays simple."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)

    def attention(self, x, mask):
        b, n, d = x.shape
        heads = self.attn.num_heads
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.attn.out_proj(a.transpose(1, 2).reshape(b, n, d))

    def forward(self, x, mask):
        x = x + self.attention(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):  # batch first here (the original runs length first; the same per token)
        n = x.shape[1]
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for block in self.resblocks:
            x = block(x, causal)
        return x


class CLIP(nn.Module):
    """CRIS's ``backbone``: the CLIP model's parts, under CLIP's names."""

    def __init__(self, config: CrisConfig):
        super().__init__()
        c = config
        self.visual = ModifiedResNet(c.vision_layers, c.embed_dim, c.vision_heads, c.attnpool_grid, c.vision_width)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))  # CLIP's; unused by CRIS, kept for the keys
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """CLIP's initialisation (a random model then has sensible activations)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        pool = self.visual.attnpool
        std = pool.c_proj.in_features ** -0.5
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)
        t = self.transformer
        proj_std, attn_std, fc_std = t.width ** -0.5 * (2 * t.layers) ** -0.5, t.width ** -0.5, (2 * t.width) ** -0.5
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> words (B, L, width) after ln_final, state (B, embed_dim) at the
        end-of-text token (the highest id in each row)."""
        dtype = self.visual.conv1.weight.dtype
        x = self.token_embedding(text).to(dtype) + self.positional_embedding.to(dtype)[: text.shape[1]]
        x = self.ln_final(self.transformer(x))
        eot = text.argmax(dim=-1)
        pooled = x.gather(1, eot[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]
        return x, pooled @ self.text_projection.to(dtype)


# ---------------------------------------------------------------- CRIS's layers.py

def conv_layer(in_dim, out_dim, kernel_size=1, padding=0, stride=1):
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(out_dim), nn.ReLU(True))


def linear_layer(in_dim, out_dim, bias=False):
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias), nn.BatchNorm1d(out_dim), nn.ReLU(True))


class CoordConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1, stride=1):
        super().__init__()
        self.conv1 = conv_layer(in_channels + 2, out_channels, kernel_size, padding, stride)

    def forward(self, x):
        b, _, h, w = x.shape
        y_range = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        x_range = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        yy, xx = torch.meshgrid(y_range, x_range, indexing="ij")
        coords = torch.stack([xx, yy])[None].expand(b, -1, -1, -1)
        return self.conv1(torch.cat([x, coords], 1))


class FPN(nn.Module):
    """CRIS's multi-modal FPN, in two halves: ``encode_image`` (what sees only the image)
    and ``fuse`` (from ``f5 * state`` on). ``forward`` is the original's."""

    def __init__(self, in_channels=(512, 1024, 1024), out_channels=(256, 512, 1024)):
        super().__init__()
        i, o = in_channels, out_channels
        self.txt_proj = linear_layer(i[2], o[2])
        self.f1_v_proj = conv_layer(i[2], o[2], 1, 0)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(o[2]), nn.ReLU(True))
        self.f2_v_proj = conv_layer(i[1], o[1], 3, 1)
        self.f2_cat = conv_layer(o[2] + o[1], o[1], 1, 0)
        self.f3_v_proj = conv_layer(i[0], o[0], 3, 1)
        self.f3_cat = conv_layer(o[0] + o[1], o[1], 1, 0)
        self.f4_proj5 = conv_layer(o[2], o[1], 3, 1)
        self.f4_proj4 = conv_layer(o[1], o[1], 3, 1)
        self.f4_proj3 = conv_layer(o[1], o[1], 3, 1)
        self.aggr = conv_layer(3 * o[1], o[1], 1, 0)
        self.coordconv = nn.Sequential(CoordConv(o[1], o[1], 3, 1), conv_layer(o[1], o[1], 3, 1))

    def encode_image(self, imgs) -> list[torch.Tensor]:
        v3, v4, v5 = imgs
        return [self.f1_v_proj(v5), self.f2_v_proj(v4), F.avg_pool2d(self.f3_v_proj(v3), 2, 2)]

    def project_state(self, state):
        linear, bn, relu = self.txt_proj
        s = linear(state)
        if bn.training and s.shape[0] == 1:
            # batch statistics of one sample do not exist (BatchNorm1d raises): use the running ones
            s = F.batch_norm(s, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            s = bn(s)
        return relu(s)

    def fuse(self, feats: list[torch.Tensor], state: torch.Tensor) -> torch.Tensor:
        f5, f4, f3 = feats
        f5 = self.norm_layer(f5 * self.project_state(state)[..., None, None])
        f4 = self.f2_cat(torch.cat([f4, F.interpolate(f5, scale_factor=2, mode="bilinear")], dim=1))
        f3 = self.f3_cat(torch.cat([f3, f4], dim=1))
        fq5 = F.interpolate(self.f4_proj5(f5), scale_factor=2, mode="bilinear")
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), fq5], dim=1))
        return self.coordconv(fq)

    def forward(self, imgs, state):
        return self.fuse(self.encode_image(imgs), state)


@lru_cache(maxsize=16)
def pos1d(d_model: int, length: int) -> torch.Tensor:
    """CRIS's 1-D sine encoding (length, 1, d). Made in numpy: a constant, also in an ONNX trace."""
    position = np.arange(length, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d_model)))
    pe = np.zeros((length, d_model), np.float32)
    pe[:, 0::2] = np.sin(position * div_term)
    pe[:, 1::2] = np.cos(position * div_term)
    return torch.from_numpy(pe)[:, None]


@lru_cache(maxsize=16)
def pos2d(d_model: int, height: int, width: int) -> torch.Tensor:
    """CRIS's 2-D sine encoding (h*w, 1, d): half the channels for x, half for y."""
    pe = np.zeros((d_model, height, width), np.float32)
    d = d_model // 2
    div_term = np.exp(np.arange(0.0, d, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d)))
    pos_w = np.arange(width, dtype=np.float32)[:, None] * div_term  # w, d/2
    pos_h = np.arange(height, dtype=np.float32)[:, None] * div_term
    pe[0:d:2] = np.sin(pos_w).T[:, None, :]
    pe[1:d:2] = np.cos(pos_w).T[:, None, :]
    pe[d::2] = np.sin(pos_h).T[:, :, None]
    pe[d + 1::2] = np.cos(pos_h).T[:, :, None]
    return torch.from_numpy(pe.reshape(d_model, 1, height * width).transpose(2, 1, 0).copy())


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model=512, nhead=9, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, kdim=d_model, vdim=d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.LayerNorm(dim_feedforward), nn.Linear(dim_feedforward, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, vis, txt, vis_pos, txt_pos, pad_mask):
        """vis (HW, B, d), txt (L, B, d), positions (., 1, d), pad_mask (B, L) True at padding."""
        vis2 = self.norm1(vis)
        q = k = vis2 + vis_pos
        vis2 = self.self_attn(q, k, value=vis2, need_weights=False)[0]
        vis = vis + self.dropout1(self.self_attn_norm(vis2))
        vis2 = self.norm2(vis)
        vis2 = self.multihead_attn(query=vis2 + vis_pos, key=txt + txt_pos, value=txt,
                                   key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(vis2))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers, d_model, nhead, dim_ffn, dropout, return_intermediate=False):
        super().__init__()
        self.layers = nn.ModuleList([TransformerDecoderLayer(d_model, nhead, dim_ffn, dropout)
                                     for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)
        self.return_intermediate = return_intermediate  # the original's option; only the last output is used

    def forward(self, vis, txt, pad_mask):
        """vis (B, C, H, W), txt (B, L, C), pad_mask (B, L) -> (B, C, HW)."""
        b, c, h, w = vis.shape
        vis_pos = pos2d(c, h, w).to(vis)
        txt_pos = pos1d(txt.shape[-1], txt.shape[1]).to(vis)
        output = vis.reshape(b, c, -1).permute(2, 0, 1)
        txt = txt.permute(1, 0, 2)
        for layer in self.layers:
            output = layer(output, txt, vis_pos, txt_pos, pad_mask)
        return self.norm(output).permute(1, 2, 0)


class Projector(nn.Module):
    def __init__(self, word_dim=1024, in_dim=256, kernel_size=3):
        super().__init__()
        self.in_dim, self.kernel_size = in_dim, kernel_size
        self.vis = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"),
                                 conv_layer(in_dim * 2, in_dim * 2, 3, padding=1),
                                 nn.Upsample(scale_factor=2, mode="bilinear"),
                                 conv_layer(in_dim * 2, in_dim, 3, padding=1),
                                 nn.Conv2d(in_dim, in_dim, 1))
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x, word):
        """x (B, 2*in_dim, h, w), word: the sentence state (B, word_dim) -> (B, 1, 4h, 4w)."""
        x = self.vis(x)
        b, c, h, w = x.shape
        word = self.txt(word)
        weight, bias = word[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size), word[:, -1]
        if not torch.jit.is_tracing():
            # the original: one grouped convolution, prompt i's kernel on image i's map
            out = F.conv2d(x.reshape(1, b * c, h, w), weight, padding=self.kernel_size // 2, groups=b, bias=bias)
            return out.transpose(0, 1)
        # an ONNX trace would fix the group count (the batch) in the graph: the same sum, per offset
        k, p = self.kernel_size, self.kernel_size // 2
        xp = F.pad(x, (p, p, p, p))
        out = bias[:, None, None]
        for i in range(k):
            for j in range(k):
                out = out + torch.einsum("bchw,bc->bhw", xp[:, :, i:i + h, j:j + w], weight[:, :, i, j])
        return out[:, None]


# ---------------------------------------------------------------- the model

def pack_text(words: torch.Tensor, pad_mask: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """One row per prompt, (P, L*W + L + E): the L words of width W flattened, then the pad
    mask (1.0 at padding), then the sentence state of size E. The predictor caches and
    stacks these rows; ``unpack_text`` splits them."""
    p = words.shape[0]
    return torch.cat([words.reshape(p, -1), pad_mask.to(words.dtype), state.to(words.dtype)], dim=1)


def unpack_text(text: torch.Tensor, length: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, n = text.shape[0], length * width
    return text[:, :n].reshape(p, length, width), text[:, n:n + length] > 0.5, text[:, n + length:]


class CrisForImageSegmentation(PreTrainedModel):
    config_class = CrisConfig
    base_model_prefix = "cris"
    main_input_name = "pixel_values"

    def __init__(self, config: CrisConfig):
        super().__init__(config)
        self.backbone = CLIP(config)
        self.neck = FPN(config.fpn_in, config.fpn_out)
        self.decoder = TransformerDecoder(config.num_layers, config.vis_dim, config.num_head, config.dim_ffn,
                                          config.dropout, config.intermediate)
        self.proj = Projector(config.word_dim, config.vis_dim // 2, 3)
        self.post_init()

    def _init_weights(self, module):
        pass  # the parts initialise themselves (CLIP's rules, PyTorch's defaults); weights come from checkpoints

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Backbone C3/C4/C5, then the neck's image-only convolutions: [f5 (B, fpn_out[2], s/32),
        f4 (B, fpn_out[1], s/16), f3 pooled (B, fpn_out[0], s/16)]."""
        return self.neck.encode_image(self.backbone.encode_image(pixel_values))

    def fixed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token rows as the weights were trained on them, padded (or cut) to context_length:
        with 0 (``text_padding`` "zero") or with <|endoftext|> ("eot")."""
        pad = self.config.eot_token_id if self.config.text_padding == "eot" else 0
        ids = input_ids.masked_fill(attention_mask == 0, pad)
        n = self.config.context_length
        # concatenate-then-slice, not a computed pad width: an ONNX trace keeps the length dynamic
        return torch.cat([ids, ids.new_full((ids.shape[0], n), pad)], dim=1)[:, :n]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = self.fixed_tokens(input_ids, attention_mask)
        words, state = self.backbone.encode_text(ids)
        return pack_text(words, ids == 0, state)  # CRIS's pad mask, whichever the padding

    def decode_parts(self, feats, words, pad_mask, state) -> torch.Tensor:
        """Neck fusion, decoder, projector, bicubic upsampling to the input: logits (P, s, s)."""
        fq = self.neck.fuse(feats, state)
        b, c, h, w = fq.shape
        fq = self.decoder(fq, words, pad_mask).reshape(b, c, h, w)
        pred = self.proj(fq, state)
        pred = F.interpolate(pred, self.config.image_size, mode="bicubic", align_corners=True)
        return pred[:, 0]

    def decode(self, feats: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        n = text.shape[0]
        if feats[0].shape[0] == 1 and n > 1:
            feats = [f.expand(n, -1, -1, -1) for f in feats]
        words, pad_mask, state = unpack_text(text.to(feats[0].dtype), self.config.context_length,
                                             self.config.text_width)
        return self.decode_parts(feats, words, pad_mask, state)

    def forward(self, pixel_values, input_ids, attention_mask=None):
        if attention_mask is None:  # the ids as given, padding included (the benchmark's forward)
            attention_mask = torch.ones_like(input_ids)
        return self.decode(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))


AutoConfig.register(CrisConfig.model_type, CrisConfig)
AutoModel.register(CrisConfig, CrisForImageSegmentation)


class CrisBackend(TorchBackend):
    """``encode_image`` (cached per image): the RN50 and the neck's image-only convolutions.
    ``encode_text`` (cached per prompt): one packed row of words, pad mask and sentence
    state (``pack_text``). ``decode``: the rest, per prompt."""

    name = "CRIS"
    default_train_mode = "decoder"  # encoders frozen: neck, decoder and projector learn
    # medvlsm's cris.yaml: AdamW lr 2e-5, weight decay 1e-3 (the trainer's default)
    default_lr = {"decoder": 2e-5, "full": 2e-5, "lora": 1e-4}
    image_encoder_prefixes = ("backbone.visual.",)
    lora_targets = LORA_TARGETS

    def __init__(self, module: CrisForImageSegmentation, tokenizer, device, dtype, source: str = ""):
        self.module = module.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        self.context_length = module.config.context_length

    @property
    def input_size(self) -> tuple[int, int]:
        s = self.module.config.image_size
        return s, s

    def preprocess(self, images):
        from napari_vlsm.core.images.preprocess import resize_normalize

        cfg = self.module.config
        return resize_normalize(images, self.input_size, cfg.image_mean, cfg.image_std, self.device).to(self.dtype)

    def encode_image(self, pixel_values):
        return self.module.encode_image(pixel_values.to(self.dtype))

    def text_from_tokens(self, input_ids, attention_mask):
        return self.module.encode_text(input_ids, attention_mask)

    def decode(self, features, text):
        return self.module.decode(list(features), text)

    def forward(self, pixel_values, prompts):
        return self.decode(self.encode_image(pixel_values), self.encode_text(prompts))

    def trainable_parameters(self, mode: str):
        if mode not in TRAIN_MODES:
            raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(TRAIN_MODES)}.")
        m = self.module
        m.requires_grad_(mode == "full")
        if mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            if not any("lora_A" in n for n, _ in m.named_parameters()):
                inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=self.lora_targets), m.backbone)
            for name, p in m.named_parameters():
                p.requires_grad_("lora_" in name)
        for part in (m.neck, m.decoder, m.proj):
            part.requires_grad_(True)
        return [p for p in m.parameters() if p.requires_grad]

    def save(self, folder) -> None:
        from napari_vlsm.core.models.clipseg import merged_state_dict

        folder = Path(folder)
        self.module.save_pretrained(folder, state_dict=merged_state_dict(self.module))
        self.tokenizer.save_pretrained(folder)


def load(folder, device, dtype, source: str = "") -> CrisBackend:
    from napari_vlsm.core.models.loading import quiet_transformers, strict_from_pretrained
    from napari_vlsm.core.models.processors import load_tokenizer

    quiet_transformers()
    return CrisBackend(strict_from_pretrained(CrisForImageSegmentation, Path(folder)), load_tokenizer(Path(folder)),
                       device, dtype, source)


def build_random_cris(folder, seed: int = 0, shape: str = "tiny") -> Path:
    """Write a CRIS of ``shape`` ("tiny" for tests, "rn50" for the release shape) with random
    weights and the CLIP tokenizer to ``folder``."""
    from napari_vlsm.core.models.loading import quiet_transformers
    from napari_vlsm.core.models.processors import load_tokenizer

    quiet_transformers()
    if shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; use one of {', '.join(SHAPES)}.")
    torch.manual_seed(seed)
    module = CrisForImageSegmentation(CrisConfig(**SHAPES[shape])).eval()
    folder = Path(folder)
    module.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder
