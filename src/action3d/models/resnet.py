"""3D ResNet-10 ... 200 (Hara et al., CVPR 2018).

Module names and tensor shapes follow kenshohara/3D-ResNets-PyTorch
(models/resnet.py), so its published checkpoints (r3d18_K_200ep.pth, ...) load
with strict=True:

    conv1, bn1                      stem: (t x 7 x 7) conv, stride (t_stride, 2, 2)
    layer1 ... layer4               residual stages, stage k>1 halves T, H and W
      layerN.M.conv1/bn1/...        block layers
      layerN.0.downsample.0/.1      type-B projection shortcut (conv 1x1x1 + BN)
    fc                              classifier

Input [B, C, T, H, W] -> logits [B, n_classes]. With the defaults (max-pool on,
conv1_t_stride 1) layer4 sees T/16 x H/32 x W/32; global average pooling makes
the network accept any clip at least that large.

The `ResNet` class here is also the trunk of the pre-activation, wide, ResNeXt
and R(2+1)D families: they swap the block (and, for R(2+1)D, the stem).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model

BLOCK_INPLANES = (64, 128, 256, 512)


def conv3x3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Type-A shortcut: subsample by `stride`, then append zero channels up to `out_planes`.

    No parameters, hence no state_dict keys: a type-A checkpoint simply lacks the
    `downsample` entries a type-B one has. Unlike the reference, gradients flow
    through the identity part (the reference concatenates `out.data`).
    """

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        # Same as avg_pool3d(kernel_size=1, stride=s), the reference's choice.
        out = x[:, :, ::s, ::s, ::s]
        zeros = out.new_zeros(out.shape[0], self.out_planes - out.shape[1], *out.shape[2:])
        return torch.cat([out, zeros], dim=1)


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions; output channels = planes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1x1 reduce, 3x3x3 (carries the stride), 1x1x1 expand; output = planes * expansion.

    `mid_planes` (default: planes) and `groups` exist for ResNeXt's grouped middle convolution.
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        mid_planes: int | None = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        mid_planes = mid_planes or planes
        self.conv1 = conv1x1x1(in_planes, mid_planes)
        self.bn1 = nn.BatchNorm3d(mid_planes)
        self.conv2 = nn.Conv3d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False
        )
        self.bn2 = nn.BatchNorm3d(mid_planes)
        self.conv3 = conv1x1x1(mid_planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """Stem, four residual stages, global average pooling, linear classifier.

    Args:
        block: block class with an `expansion` attribute, called as
            block(in_planes, planes, stride, downsample, **block_kwargs).
        layers: number of blocks in each of the four stages.
        block_inplanes: `planes` of each stage (before `widen_factor`).
        n_input_channels: channels of the input clip (3 for RGB, 2 for flow).
        conv1_t_size, conv1_t_stride: temporal kernel size and stride of the stem.
        no_max_pool: skip the stem's 3x3x3 max-pool (keeps T, H, W twice as large).
        shortcut_type: 'A' zero-padding identity, 'B' 1x1x1 projection + BN.
        widen_factor: multiplies every stage width (and the stem, unless stem_planes is set).
        n_classes: classifier outputs.
        stem_planes: stem output channels when they differ from stage 1's width
            (wide ResNet and ResNeXt keep the 64-channel stem of their checkpoints).
        block_kwargs: extra arguments for every block (ResNeXt's cardinality).
    """

    classifier_name = "fc"

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        block_inplanes: Sequence[int] = BLOCK_INPLANES,
        *,
        n_input_channels: int = 3,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = False,
        shortcut_type: str = "B",
        widen_factor: float = 1.0,
        n_classes: int = 400,
        stem_planes: int | None = None,
        block_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' (zero padding) or 'B' (projection), got {shortcut_type!r}")
        widths = [int(planes * widen_factor) for planes in block_inplanes]
        self.in_planes = stem_planes or widths[0]
        self._make_stem(n_input_channels, conv1_t_size, conv1_t_stride)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if no_max_pool else nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        block_kwargs = block_kwargs or {}
        for i, (planes, n_blocks) in enumerate(zip(widths, layers)):
            stage = self._make_layer(block, planes, n_blocks, shortcut_type, 1 if i == 0 else 2, block_kwargs)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(self.in_planes, n_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stem(self, n_input_channels: int, t_size: int, t_stride: int) -> None:
        self.conv1 = nn.Conv3d(
            n_input_channels,
            self.in_planes,
            kernel_size=(t_size, 7, 7),
            stride=(t_stride, 2, 2),
            padding=(t_size // 2, 3, 3),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(self.in_planes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _make_layer(self, block, planes, n_blocks, shortcut_type, stride, block_kwargs) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_planes != out_planes:
            if shortcut_type == "A":
                downsample = ZeroPadShortcut(out_planes, stride)
            else:
                downsample = nn.Sequential(conv1x1x1(self.in_planes, out_planes, stride), nn.BatchNorm3d(out_planes))
        blocks = [block(self.in_planes, planes, stride, downsample, **block_kwargs)]
        self.in_planes = out_planes
        blocks += [block(out_planes, planes, **block_kwargs) for _ in range(1, n_blocks)]
        return nn.Sequential(*blocks)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """Modules with parameters, input to classifier: the choices for `ft_begin_module`."""
        return [(name, m) for name, m in self.named_children() if any(True for _ in m.parameters())]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n_input_channels, T, H, W] -> logits [B, n_classes]."""
        x = self.maxpool(self._stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block: type[nn.Module], layers: Sequence[int], **kwargs) -> ResNet:
    return ResNet(block, layers, BLOCK_INPLANES, **kwargs)


@register_model
def resnet10(**kwargs) -> ResNet:
    return _resnet(BasicBlock, (1, 1, 1, 1), **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    return _resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return _resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_model
def resnet200(**kwargs) -> ResNet:
    return _resnet(Bottleneck, (3, 24, 36, 3), **kwargs)
