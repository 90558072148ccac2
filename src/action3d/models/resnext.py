"""3D ResNeXt-50 / 101 / 152 (Xie et al., "Aggregated Residual Transformations").

Bottlenecks whose 3x3x3 convolution is split into `cardinality` groups; stage
widths 128, 256, 512, 1024 with expansion 2, and a 64-channel stem. Keys and
shapes match the reference's published resnext-101-kinetics.pth
(conv1, bn1, layer1..4 with conv1/bn1/conv2/bn2/conv3/bn3/downsample, fc).
"""

from __future__ import annotations

from torch import nn

from .registry import register_model
from .resnet import Bottleneck, ResNet

RESNEXT_INPLANES = (128, 256, 512, 1024)


class ResNeXtBottleneck(Bottleneck):
    """Bottleneck with `cardinality * planes / 32` grouped middle channels."""

    expansion = 2

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        cardinality: int = 32,
    ) -> None:
        # The reference's width rule: 32 groups of planes/32 channels at cardinality 32.
        mid_planes = cardinality * planes // 32
        super().__init__(in_planes, planes, stride, downsample, mid_planes=mid_planes, groups=cardinality)


def _resnext(layers: tuple[int, ...], *, cardinality: int = 32, **kwargs) -> ResNet:
    return ResNet(
        ResNeXtBottleneck,
        layers,
        RESNEXT_INPLANES,
        stem_planes=64,
        block_kwargs={"cardinality": cardinality},
        **kwargs,
    )


@register_model
def resnext50(**kwargs) -> ResNet:
    return _resnext((3, 4, 6, 3), **kwargs)


@register_model
def resnext101(**kwargs) -> ResNet:
    return _resnext((3, 4, 23, 3), **kwargs)


@register_model
def resnext152(**kwargs) -> ResNet:
    return _resnext((3, 8, 36, 3), **kwargs)
