"""The ResNet feature extractor of the hybrid ViT (paper §3.1 "Hybrid Architecture"), single-device.

The paper's hybrids take their patches from a ResNet feature map. Its ResNet follows BiT
(Kolesnikov et al., 2020): Group Normalization instead of BatchNorm and weight-standardised
convolutions, so it trains with any per-device batch. For R50+ViT-B/16 stage 4 is dropped and
stage 3 gets 9 blocks instead of 6: layers (3, 4, 9), 1024 output channels, output stride 16.

Layout (the one the original JAX hybrid and timm's ``vit_base_r50_s16_*`` use, so their
weights load through ``stages.model.timm_interop``):

- stem: 7x7/2 weight-standardised conv (64 channels) -> GroupNorm -> ReLU -> 3x3/2 max pool;
- stages: bottleneck blocks with the *post*-activation ordering (conv -> GN -> ReLU, the last GN
  before the residual sum, ReLU after it) and the stride on the 3x3 conv ("ResNet v1.5");
  stage ``s`` has ``256 * 2**s`` output channels, stride 1 for the first stage, 2 after;
- "SAME" (TensorFlow) padding: strided layers pad asymmetrically, depending on the input size.

Parameter and FLOP counts are closed-form (``count_resnet_params``, ``resnet_flops``) and tested
against the module and against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "StdConv2d", "Bottleneck", "ResNet", "same_padding", "stage_channels", "resnet_stride",
    "resnet_out_channels", "count_resnet_params", "resnet_flops",
]

STEM_CHANNELS = 64
GROUPS = 32  # GroupNorm(32) everywhere, as in BiT
GN_EPS = 1e-5
# Weight standardisation epsilon: timm's hybrid uses 1e-8; conv weights' variance (~1/fan_in) is
# far larger, so it only guards all-zero filters, but matching it keeps imported weights exact.
WS_EPS = 1e-8


def stage_channels(stage: int) -> int:
    """Output channels of ResNet stage ``stage`` (0-based): 256, 512, 1024, 2048."""
    return 256 * 2**stage


def resnet_stride(layers: Sequence[int]) -> int:
    """Output stride: 4 from the stem (conv /2, pool /2), then /2 per stage after the first."""
    return 4 * 2 ** (len(layers) - 1)


def resnet_out_channels(layers: Sequence[int]) -> int:
    return stage_channels(len(layers) - 1)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dim: output ceil(size / stride), extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Bias-free conv whose filters are standardised (zero mean, unit variance over fan-in) at every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        if stride == 1 and kernel_size % 2 == 0:
            raise ValueError("SAME padding of an even kernel at stride 1 is asymmetric; not supported")
        # At stride 1 (odd kernel) SAME padding is symmetric, so the conv pads itself; strided
        # convs pad in forward, because SAME padding there depends on the input size.
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(kernel_size - 1) // 2 if stride == 1 else 0, bias=False)

    def standardized_weight(self) -> torch.Tensor:
        # At least float32 statistics: a bf16 variance over thousands of small weights loses most of its digits.
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, correction=0)
        return ((w - mean) / torch.sqrt(var + WS_EPS)).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride, self.padding)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=GN_EPS)


class Bottleneck(nn.Module):
    """1x1 (reduce to out/4) -> 3x3 (stride) -> 1x1 (expand), GN after each conv.

    The shortcut is a strided 1x1 conv + GN where the shape changes (each stage's first block).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        mid = out_channels // 4
        self.conv1 = StdConv2d(in_channels, mid, 1)
        self.norm1 = _group_norm(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = _group_norm(mid)
        self.conv3 = StdConv2d(mid, out_channels, 1)
        self.norm3 = _group_norm(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.proj: nn.Module | None = StdConv2d(in_channels, out_channels, 1, stride=stride)
            self.proj_norm: nn.Module | None = _group_norm(out_channels)
        else:
            self.proj = self.proj_norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj_norm(self.proj(x))
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))  # (B, mid, H/stride, W/stride)
        y = self.norm3(self.conv3(y))
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    """Stem + ``len(layers)`` bottleneck stages; (B, C, H, W) -> (B, out_channels, H/stride, W/stride)."""

    def __init__(self, layers: Sequence[int], in_channels: int = 3, checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.checkpoint_activations = checkpoint_activations  # recompute each stage in backward (training only)
        if not 1 <= len(layers) <= 4 or any(n < 1 for n in layers):
            raise ValueError(f"ResNet layers must be 1 to 4 positive block counts, got {tuple(layers)}")
        self.layers = tuple(layers)
        self.stride = resnet_stride(layers)
        self.out_channels = resnet_out_channels(layers)
        self.stem_conv = StdConv2d(in_channels, STEM_CHANNELS, 7, stride=2)
        self.stem_norm = _group_norm(STEM_CHANNELS)
        stages, prev = [], STEM_CHANNELS
        for s, blocks in enumerate(layers):
            out = stage_channels(s)
            stages.append(nn.Sequential(*(Bottleneck(prev if b == 0 else out, out, stride=2 if s and b == 0 else 1)
                                          for b in range(blocks))))
            prev = out
        self.stages = nn.ModuleList(stages)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, StdConv2d):
                # Standardisation makes the filters' scale irrelevant to the forward pass; He init
                # only sets the starting norm, which (with weight decay) sets the effective step size.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            for block in stage:
                # Zero-initialised last GN scale: every residual block starts as (ReLU of) its
                # shortcut, which keeps the signal of a deep stack well-scaled at init (Goyal et al.).
                nn.init.zeros_(block.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem_conv(x)))  # (B, 64, H/2, W/2)
        # -inf padding: a padded pixel never wins the max (after the ReLU 0 would do too).
        x = F.max_pool2d(_pad_same(x, 3, 2, value=-math.inf), kernel_size=3, stride=2)  # (B, 64, H/4, W/4)
        for stage in self.stages:
            x = checkpoint(stage, x, use_reentrant=False) if self.checkpoint_activations and self.training \
                else stage(x)
        return x


def _block_params(in_channels: int, out_channels: int) -> int:
    mid = out_channels // 4
    convs = in_channels * mid + 9 * mid * mid + mid * out_channels
    norms = 2 * (mid + mid + out_channels)
    proj = in_channels * out_channels + 2 * out_channels if in_channels != out_channels else 0
    return convs + norms + proj


def count_resnet_params(layers: Sequence[int], in_channels: int = 3) -> int:
    """Closed-form parameter count of ``ResNet(layers, in_channels)`` (bias-free convs, GN scale + shift)."""
    total = in_channels * STEM_CHANNELS * 7 * 7 + 2 * STEM_CHANNELS
    prev = STEM_CHANNELS
    for s, blocks in enumerate(layers):
        out = stage_channels(s)
        # Every stage's first block changes the channel count (64 -> 256, then doubling), so it has the projection.
        total += _block_params(prev, out) + (blocks - 1) * _block_params(out, out)
        prev = out
    return total


def resnet_flops(layers: Sequence[int], image_size: int, in_channels: int = 3) -> int:
    """Forward conv FLOPs (2 per multiply-add) for one square image.

    Only convolutions are counted: GroupNorm, ReLU, max pooling and the weight standardisation
    (per step, not per image) are a few percent at most and vary by kernel, as in the ViT count.
    """
    def conv(size: int, c_in: int, c_out: int, kernel: int) -> int:  # size: the output's side
        return 2 * size * size * c_in * c_out * kernel * kernel

    size = -(-image_size // 2)
    total = conv(size, in_channels, STEM_CHANNELS, 7)
    size = -(-size // 2)  # max pool
    prev = STEM_CHANNELS
    for s, blocks in enumerate(layers):
        out, mid = stage_channels(s), stage_channels(s) // 4
        for b in range(blocks):
            c_in = prev if b == 0 else out
            out_size = -(-size // 2) if s and b == 0 else size
            total += conv(size, c_in, mid, 1) + conv(out_size, mid, mid, 3) + conv(out_size, mid, out, 1)
            if c_in != out:
                total += conv(out_size, c_in, out, 1)
            size = out_size
        prev = out
    return total
