"""EfficientNet-Lite (lite0, lite2) in plain PyTorch.

The architecture, module names and state_dict keys are those of timm's
`tf_efficientnet_liteN`, so weights saved in that layout load unchanged. The serving
image cannot install torchvision (nor timm, which imports it), hence this module.

Lite variants: ReLU6, no squeeze-excitation, stem (32) and head (1280) channels fixed,
first and last stage depths fixed, BatchNorm eps 1e-3 and TensorFlow "same" padding,
which the pretrained weights were trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Per stage, before scaling: (expansion, kernel, stride of its first block, channels, blocks).
STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# name -> (width multiplier, depth multiplier)
VARIANTS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite2": (1.1, 1.2)}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with


class SameConv2d(nn.Conv2d):
    """A strided Conv2d with TensorFlow "same" padding, computed from each input's size.

    With stride 2 the padding depends on the input size and may be one pixel larger on
    the bottom/right, which nn.Conv2d's symmetric padding cannot express.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding TensorFlow's "same" adds along one axis: the output is ceil(size / stride)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # odd kernels: "same" padding is symmetric, so static
        return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False)
    return SameConv2d(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm2d, then `drop` and `act` (ReLU6 or nothing), like timm's BatchNormAct2d.

    Both are attributes so that folding the norm into the convolution before it can keep
    them (see encoder.fold_batchnorms).
    """

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=BN_EPS)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class DepthwiseSeparable(nn.Module):
    """The first stage's block: depthwise conv, then a linear pointwise projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw = conv(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = BatchNormAct(in_channels)
        self.conv_pw = conv(in_channels, out_channels, 1)
        self.bn2 = BatchNormAct(out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return out + x if self.residual else out


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise conv, linear pointwise projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = in_channels * expansion
        self.conv_pw = conv(in_channels, mid, 1)
        self.bn1 = BatchNormAct(mid)
        self.conv_dw = conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct(mid)
        self.conv_pwl = conv(mid, out_channels, 1)
        self.bn3 = BatchNormAct(out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.residual else out


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor`, but never more than 10% below `channels` (timm's make_divisible)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class EfficientNetLite(nn.Module):
    """Pixels (B, 3, H, W) -> ImageNet logits; forward_features gives the (B, 1280, H/32, W/32) map.

    Attributes are registered in forward order (each norm right after its convolution),
    which fold_batchnorms relies on.
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate  # dropout before the classifier, while training
        self.conv_stem = conv(3, STEM_CHANNELS, 3, stride=2)
        self.bn1 = BatchNormAct(STEM_CHANNELS)
        stages, channels = [], STEM_CHANNELS
        for index, (expansion, kernel, stride, out_channels, repeats) in enumerate(STAGES):
            if 0 < index < len(STAGES) - 1:  # the first and last stages keep one block
                repeats = math.ceil(repeats * depth)
            out_channels = round_channels(out_channels * width)
            stages.append(_stage(channels, out_channels, kernel, stride, expansion, repeats))
            channels = out_channels
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(channels, HEAD_CHANNELS, 1)
        self.bn2 = BatchNormAct(HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.bn2(self.conv_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return self.classifier(F.dropout(pooled, self.drop_rate, self.training))


def _stage(
    in_channels: int, out_channels: int, kernel: int, stride: int, expansion: int, repeats: int
) -> nn.Sequential:
    """`repeats` blocks; only the first one strides or changes the channel count."""
    blocks = []
    for index in range(repeats):
        block_in, block_stride = (in_channels, stride) if index == 0 else (out_channels, 1)
        if expansion == 1:
            blocks.append(DepthwiseSeparable(block_in, out_channels, kernel, block_stride))
        else:
            blocks.append(InvertedResidual(block_in, out_channels, kernel, block_stride, expansion))
    return nn.Sequential(*blocks)


def efficientnet_lite(name: str, **kwargs) -> EfficientNetLite:
    """`efficientnet_lite0` or `efficientnet_lite2`, with freshly initialised weights."""
    if name not in VARIANTS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(VARIANTS))}")
    width, depth = VARIANTS[name]
    return EfficientNetLite(width, depth, **kwargs)
