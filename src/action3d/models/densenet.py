"""3D DenseNet-121 / 169 / 201 / 264 (Huang et al., DenseNet-BC).

Keys follow the reference's models/densenet.py:

    features.conv1, features.norm1                  stem (t x 7 x 7 conv, BN; then ReLU, max-pool)
    features.denseblockN.denselayerM.norm1/conv1/norm2/conv2
    features.transitionN.norm/conv                  BN-ReLU-1x1x1 conv-2x2x2 avg-pool, halves channels
    features.norm5                                  final BN
    classifier                                      linear

Input [B, C, T, H, W] -> logits [B, n_classes]. Each transition halves T, H and
W, so with the max-pool on the clip needs T >= 16 and H, W >= 32.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class _DenseLayer(nn.Sequential):
    """BN-ReLU-1x1x1 conv (bn_size * growth_rate) - BN-ReLU-3x3x3 conv (growth_rate); output is input ++ new."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm3d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv3d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm3d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new_features = super().forward(x)
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return torch.cat([x, new_features], dim=1)


class _DenseBlock(nn.Sequential):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int, drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv3d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool3d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC.

    Args:
        block_config: dense layers in each of the four blocks.
        growth_rate: channels each dense layer adds (k in the paper).
        num_init_features: stem output channels.
        bn_size: bottleneck width factor (bn_size * growth_rate channels before the 3x3x3 conv).
        drop_rate: dropout after each dense layer.
        n_input_channels, conv1_t_size, conv1_t_stride, no_max_pool: stem settings, as for ResNet.
        n_classes: classifier outputs.
    """

    classifier_name = "classifier"

    def __init__(
        self,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        *,
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        n_input_channels: int = 3,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = False,
        n_classes: int = 400,
    ) -> None:
        super().__init__()
        stem = [
            ("conv1", nn.Conv3d(
                n_input_channels,
                num_init_features,
                kernel_size=(conv1_t_size, 7, 7),
                stride=(conv1_t_stride, 2, 2),
                padding=(conv1_t_size // 2, 3, 3),
                bias=False,
            )),
            ("norm1", nn.BatchNorm3d(num_init_features)),
            ("relu1", nn.ReLU(inplace=True)),
        ]
        if not no_max_pool:
            stem.append(("pool1", nn.MaxPool3d(kernel_size=3, stride=2, padding=1)))
        self.features = nn.Sequential(OrderedDict(stem))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm3d(num_features))
        self.classifier = nn.Linear(num_features, n_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        """conv1, norm1, denseblock1, transition1, ..., norm5, classifier: the choices for `ft_begin_module`."""
        stages = [(name, m) for name, m in self.features.named_children() if any(True for _ in m.parameters())]
        return stages + [("classifier", self.classifier)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, n_input_channels, T, H, W] -> logits [B, n_classes]."""
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool3d(out, 1), 1)
        return self.classifier(out)


def _densenet(block_config: tuple[int, ...], **kwargs) -> DenseNet:
    return DenseNet(block_config, **kwargs)


@register_model
def densenet121(**kwargs) -> DenseNet:
    return _densenet((6, 12, 24, 16), **kwargs)


@register_model
def densenet169(**kwargs) -> DenseNet:
    return _densenet((6, 12, 32, 32), **kwargs)


@register_model
def densenet201(**kwargs) -> DenseNet:
    return _densenet((6, 12, 48, 32), **kwargs)


@register_model
def densenet264(**kwargs) -> DenseNet:
    return _densenet((6, 12, 64, 48), **kwargs)
