"""R(2+1)D-10 ... 200 (Tran et al., "A Closer Look at Spatiotemporal Convolutions").

Every t x d x d convolution of the 3D ResNet becomes a 1 x d x d spatial
convolution to `mid` channels, BN, ReLU, then a t x 1 x 1 temporal one, with
`mid` chosen so the pair has about the parameters of the 3D convolution it
replaces. Keys follow the reference's models/resnet2p1d.py:

    conv1_s, bn1_s, conv1_t, bn1_t                         stem
    layerN.M.conv1_s/bn1_s/conv1_t/bn1_t/conv2_s/...       basic block
    layerN.M.conv1/bn1/conv2_s/bn2_s/conv2_t/bn2_t/conv3/bn3   bottleneck
    layerN.0.downsample.0/.1, fc

Input [B, C, T, H, W] -> logits [B, n_classes].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model
from .resnet import BLOCK_INPLANES, ResNet, conv1x1x1


def _mid_planes(in_planes: int, out_planes: int, t: int, d: int) -> int:
    """Channels between the spatial and temporal convs that match a t x d x d conv's parameters."""
    return (in_planes * out_planes * t * d * d) // (in_planes * d * d + t * out_planes)


def conv1x3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)


def conv3x1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        mid1 = _mid_planes(in_planes, planes, 3, 3)
        self.conv1_s = conv1x3x3(in_planes, mid1, stride)
        self.bn1_s = nn.BatchNorm3d(mid1)
        self.conv1_t = conv3x1x1(mid1, planes, stride)
        self.bn1_t = nn.BatchNorm3d(planes)
        mid2 = _mid_planes(planes, planes, 3, 3)
        self.conv2_s = conv1x3x3(planes, mid2)
        self.bn2_s = nn.BatchNorm3d(mid2)
        self.conv2_t = conv3x1x1(mid2, planes)
        self.bn2_t = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1_s(self.conv1_s(x)))
        out = self.relu(self.bn1_t(self.conv1_t(out)))
        out = self.relu(self.bn2_s(self.conv2_s(out)))
        out = self.bn2_t(self.conv2_t(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm3d(planes)
        mid = _mid_planes(planes, planes, 3, 3)
        self.conv2_s = conv1x3x3(planes, mid, stride)
        self.bn2_s = nn.BatchNorm3d(mid)
        self.conv2_t = conv3x1x1(mid, planes, stride)
        self.bn2_t = nn.BatchNorm3d(planes)
        self.conv3 = conv1x1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2_s(self.conv2_s(out)))
        out = self.relu(self.bn2_t(self.conv2_t(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class R2Plus1D(ResNet):
    """`resnet.ResNet` with a factorised stem: 1x7x7 spatial conv, then a conv1_t_size x 1 x 1 temporal one."""

    def _make_stem(self, n_input_channels: int, t_size: int, t_stride: int) -> None:
        # The reference sizes the stem for 3 input channels whatever n_input_channels is;
        # kept so its checkpoints (flow ones included) have the same shapes.
        mid = _mid_planes(3, self.in_planes, t_size, 7)
        self.conv1_s = nn.Conv3d(n_input_channels, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False)
        self.bn1_s = nn.BatchNorm3d(mid)
        self.conv1_t = nn.Conv3d(
            mid, self.in_planes, (t_size, 1, 1), stride=(t_stride, 1, 1), padding=(t_size // 2, 0, 0), bias=False
        )
        self.bn1_t = nn.BatchNorm3d(self.in_planes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1_s(self.conv1_s(x)))
        return self.relu(self.bn1_t(self.conv1_t(x)))


def _r2plus1d(block: type[nn.Module], layers: Sequence[int], **kwargs) -> R2Plus1D:
    return R2Plus1D(block, layers, BLOCK_INPLANES, **kwargs)


@register_model
def r2plus1d10(**kwargs) -> R2Plus1D:
    return _r2plus1d(BasicBlock, (1, 1, 1, 1), **kwargs)


@register_model
def r2plus1d18(**kwargs) -> R2Plus1D:
    return _r2plus1d(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def r2plus1d34(**kwargs) -> R2Plus1D:
    return _r2plus1d(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def r2plus1d50(**kwargs) -> R2Plus1D:
    return _r2plus1d(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def r2plus1d101(**kwargs) -> R2Plus1D:
    return _r2plus1d(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def r2plus1d152(**kwargs) -> R2Plus1D:
    return _r2plus1d(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_model
def r2plus1d200(**kwargs) -> R2Plus1D:
    return _r2plus1d(Bottleneck, (3, 24, 36, 3), **kwargs)
