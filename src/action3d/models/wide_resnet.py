"""Wide 3D ResNet-50 (Zagoruyko and Komodakis, "Wide Residual Networks").

Bottleneck stages k times wider, with expansion 2 instead of 4: stage widths
64k, 128k, 256k, 512k, outputs 128k ... 1024k channels. The stem keeps 64
channels, as in the reference's published wide ResNet, so its keys and shapes
(conv1, bn1, layer1..4, fc) load with strict=True.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model
from .resnet import BLOCK_INPLANES, Bottleneck, ResNet


class WideBottleneck(Bottleneck):
    expansion = 2


def _wide_resnet(layers: tuple[int, ...], *, k: int = 2, **kwargs) -> ResNet:
    return ResNet(WideBottleneck, layers, [planes * k for planes in BLOCK_INPLANES], stem_planes=64, **kwargs)


@register_model
def wide_resnet50(**kwargs) -> nn.Module:
    return _wide_resnet((3, 4, 6, 3), **kwargs)
