"""DRN backbones: DRN-A (a dilated torchvision-style ResNet), DRN-C and DRN-D.

Parameter names follow the published checkpoints, so they load strictly:
- DRN-C/D: the authors' ``drn.py`` layout (``conv1``/``bn1`` stem for C, ``layer0``
  for D, then ``layer1`` .. ``layer8``, classifier ``fc`` as a 1x1 conv with bias);
- DRN-A: torchvision's ResNet layout (``conv1``, ``bn1``, ``layer1`` .. ``layer4``,
  ``fc`` as ``nn.Linear``), so torchvision ResNet checkpoints load unchanged.

Every backbone has output stride 8. Built with ``num_classes=None`` it has no pooling
or classifier; otherwise an adaptive average pool and ``fc`` give N x num_classes
logits for any input size. The order of child modules matters: the segmentation
model numbers them (``base.<i>``) exactly as the authors' ``DRNSeg`` does.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from drn.registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "DRN", "DRNA", "HEAD_NAMES"]

# Child modules that belong to the classifier head, not to the feature extractor.
HEAD_NAMES = ("avgpool", "fc")
DRN_CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding == dilation keeps the spatial size for stride 1.
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride,
        padding=dilation, dilation=dilation, bias=False,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs, both at ``dilation``; ``residual=False`` drops the shortcut
    (DRN-C's degridding stages). A ``downsample`` is kept even without residual so
    the parameters match the authors' checkpoints; it is not computed then."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride and the dilation), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if not residual:
            raise ValueError("Bottleneck blocks always have a residual connection")
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


class _Backbone(nn.Module):
    """What DRN and DRNA share: the feature/head split and the classifier forward."""

    family: str
    block_type: str
    layers: tuple[int, ...]
    out_dim: int
    inplanes: int

    def _residual_stage(
        self,
        block: Block,
        planes: int,
        blocks: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        residual: bool = True,
    ) -> nn.Sequential:
        """``blocks`` blocks; the first may change stride/width (1x1 downsample) and
        may use ``first_dilation`` instead of ``dilation``."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first = dilation if first_dilation is None else first_dilation
        stage = [block(self.inplanes, planes, stride, downsample, first, residual)]
        self.inplanes = planes * block.expansion
        stage += [
            block(self.inplanes, planes, dilation=dilation, residual=residual)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*stage)

    def feature_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every child before the classifier head, in order."""
        return [(n, m) for n, m in self.named_children() if n not in HEAD_NAMES]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-8 feature map: N x out_dim x ceil(H/8) x ceil(W/8)."""
        for _, module in self.feature_modules():
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "fc"):
            raise RuntimeError("this backbone was built without a classifier (num_classes=None)")
        x = self.avgpool(self.forward_features(x))
        if isinstance(self.fc, nn.Linear):
            return self.fc(torch.flatten(x, 1))
        return torch.flatten(self.fc(x), 1)


class DRN(_Backbone):
    """DRN-C (``arch="C"``) or DRN-D (``arch="D"``): eight stages, output stride 8.

    Stage 1-2: C uses residual BasicBlocks after a conv1/bn1/relu stem; D uses plain
    conv-BN-ReLU stacks after a ``layer0`` stem. Stages 3-4 downsample; stages 5 and 6
    dilate by 2 and 4 in every block (the first included); stages 7 (dilation 2) and
    8 (dilation 1) remove gridding artefacts and have no residual connections.
    """

    def __init__(
        self,
        arch: str,
        block: Block,
        layers: Sequence[int],
        num_classes: int | None = 1000,
        channels: Sequence[int] = DRN_CHANNELS,
    ) -> None:
        super().__init__()
        if arch not in ("C", "D"):
            raise ValueError(f"arch must be 'C' or 'D', got {arch!r}")
        if len(layers) != 8 or len(channels) != 8:
            raise ValueError("DRN needs 8 layer counts and 8 channel widths")
        self.family = "drn_" + arch.lower()
        self.block_type = "basic" if block is BasicBlock else "bottleneck"
        self.layers = tuple(layers)
        self.out_dim = channels[-1]
        self.inplanes = channels[0]

        # Registration order below == child order == the authors' base.<i> indices.
        if arch == "C":
            self.conv1 = nn.Conv2d(3, channels[0], kernel_size=7, stride=1, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(channels[0])
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = self._residual_stage(BasicBlock, channels[0], layers[0])
            self.layer2 = self._residual_stage(BasicBlock, channels[1], layers[1], stride=2)
        else:
            self.layer0 = nn.Sequential(
                nn.Conv2d(3, channels[0], kernel_size=7, stride=1, padding=3, bias=False),
                nn.BatchNorm2d(channels[0]),
                nn.ReLU(inplace=True),
            )
            self.layer1 = self._conv_stage(channels[0], layers[0])
            self.layer2 = self._conv_stage(channels[1], layers[1], stride=2)
        self.layer3 = self._residual_stage(block, channels[2], layers[2], stride=2)
        self.layer4 = self._residual_stage(block, channels[3], layers[3], stride=2)
        self.layer5 = self._residual_stage(block, channels[4], layers[4], dilation=2)
        self.layer6 = self._residual_stage(block, channels[5], layers[5], dilation=4)
        if arch == "C":
            self.layer7 = self._residual_stage(
                BasicBlock, channels[6], layers[6], dilation=2, residual=False)
            self.layer8 = self._residual_stage(
                BasicBlock, channels[7], layers[7], dilation=1, residual=False)
        else:
            self.layer7 = self._conv_stage(channels[6], layers[6], dilation=2)
            self.layer8 = self._conv_stage(channels[7], layers[7], dilation=1)

        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Conv2d(self.out_dim, num_classes, kernel_size=1, bias=True)
        self._init_weights()

    def _conv_stage(self, channels: int, convs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        modules: list[nn.Module] = []
        for i in range(convs):
            modules += [
                nn.Conv2d(self.inplanes, channels, kernel_size=3, stride=stride if i == 0 else 1,
                          padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            self.inplanes = channels
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        # The authors' init: N(0, sqrt(2 / (k*k*out_channels))) for every conv, fc included.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class DRNA(_Backbone):
    """DRN-A: torchvision's ResNet with layer3/layer4 at stride 1, dilated 2 and 4.

    As torchvision's ``replace_stride_with_dilation``: the first block of a dilated
    stage keeps the previous dilation (layer3: 1, layer4: 2), the rest use the new one.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int | None = 1000) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError("DRN-A needs 4 layer counts")
        self.family = "drn_a"
        self.block_type = "basic" if block is BasicBlock else "bottleneck"
        self.layers = tuple(layers)
        self.out_dim = 512 * block.expansion
        self.inplanes = 64

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._residual_stage(block, 64, layers[0])
        self.layer2 = self._residual_stage(block, 128, layers[1], stride=2)
        self.layer3 = self._residual_stage(block, 256, layers[2], dilation=2, first_dilation=1)
        self.layer4 = self._residual_stage(block, 512, layers[3], dilation=4, first_dilation=2)
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)  # not AvgPool2d(7): the map is H/8
            self.fc = nn.Linear(self.out_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: kaiming normal (fan_out, relu) convs, BN 1/0, Linear default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# Thin public builders: each only names its architecture's arguments.

@register_model
def drn_a_18(*, num_classes: int | None = 1000) -> DRNA:
    return DRNA(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model
def drn_a_34(*, num_classes: int | None = 1000) -> DRNA:
    return DRNA(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model
def drn_a_50(*, num_classes: int | None = 1000) -> DRNA:
    return DRNA(Bottleneck, (3, 4, 6, 3), num_classes)


@register_model
def drn_a_101(*, num_classes: int | None = 1000) -> DRNA:
    return DRNA(Bottleneck, (3, 4, 23, 3), num_classes)


@register_model
def drn_a_152(*, num_classes: int | None = 1000) -> DRNA:
    return DRNA(Bottleneck, (3, 8, 36, 3), num_classes)


@register_model
def drn_c_26(*, num_classes: int | None = 1000) -> DRN:
    return DRN("C", BasicBlock, (1, 1, 2, 2, 2, 2, 1, 1), num_classes)


@register_model
def drn_c_42(*, num_classes: int | None = 1000) -> DRN:
    return DRN("C", BasicBlock, (1, 1, 3, 4, 6, 3, 1, 1), num_classes)


@register_model
def drn_c_58(*, num_classes: int | None = 1000) -> DRN:
    return DRN("C", Bottleneck, (1, 1, 3, 4, 6, 3, 1, 1), num_classes)


@register_model
def drn_d_22(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", BasicBlock, (1, 1, 2, 2, 2, 2, 1, 1), num_classes)


@register_model
def drn_d_24(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", BasicBlock, (1, 1, 2, 2, 2, 2, 2, 2), num_classes)


@register_model
def drn_d_38(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", BasicBlock, (1, 1, 3, 4, 6, 3, 1, 1), num_classes)


@register_model
def drn_d_40(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", BasicBlock, (1, 1, 3, 4, 6, 3, 2, 2), num_classes)


@register_model
def drn_d_54(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", Bottleneck, (1, 1, 3, 4, 6, 3, 1, 1), num_classes)


@register_model
def drn_d_56(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", Bottleneck, (1, 1, 3, 4, 6, 3, 2, 2), num_classes)


@register_model
def drn_d_105(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", Bottleneck, (1, 1, 3, 4, 23, 3, 1, 1), num_classes)


@register_model
def drn_d_107(*, num_classes: int | None = 1000) -> DRN:
    return DRN("D", Bottleneck, (1, 1, 3, 4, 23, 3, 2, 2), num_classes)
