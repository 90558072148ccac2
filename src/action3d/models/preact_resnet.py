"""Pre-activation 3D ResNet-10 ... 200 (He et al., "Identity Mappings in Deep Residual Networks").

Blocks apply BN and ReLU before each convolution and add the shortcut without a
final ReLU. Trunk, stem, shortcuts and classifier are `resnet.ResNet`, as in the
reference's models/pre_act_resnet.py, so state_dict keys are the ResNet ones
with the blocks' BNs sitting before their convolutions:

    layerN.M.bn1 (in_planes) conv1 bn2 conv2 [bn3 conv3]

As in the reference, no BN-ReLU follows the last block.

The reference's pre-activation file does not build (its blocks take `inplanes`
while its ResNet passes `in_planes=`); these are the networks it meant.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .resnet import BLOCK_INPLANES, ResNet, conv1x1x1, conv3x3x3


class PreActivationBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm3d(in_planes)
        self.conv1 = conv3x3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class PreActivationBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm3d(in_planes)
        self.conv1 = conv1x1x1(in_planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm3d(planes)
        self.conv3 = conv1x1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


def _preact_resnet(block: type[nn.Module], layers: tuple[int, ...], **kwargs) -> ResNet:
    return ResNet(block, layers, BLOCK_INPLANES, **kwargs)


@register_model
def preact_resnet10(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBasicBlock, (1, 1, 1, 1), **kwargs)


@register_model
def preact_resnet18(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def preact_resnet34(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def preact_resnet50(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def preact_resnet101(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def preact_resnet152(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBottleneck, (3, 8, 36, 3), **kwargs)


@register_model
def preact_resnet200(**kwargs) -> ResNet:
    return _preact_resnet(PreActivationBottleneck, (3, 24, 36, 3), **kwargs)
