"""The segmentation model: the authors' DRNSeg head on any registered backbone.

``base`` is an ``nn.Sequential`` of the backbone's children without pooling and
classifier, so parameter keys are ``base.<i>.*`` exactly as in the authors' released
checkpoints (for DRN-A, whose seg model is this project's own, the same rule numbers
conv1, bn1, relu, maxpool, layer1..layer4 as base.0..base.7). ``seg`` is a 1x1 conv
(with bias) to C classes and ``up`` a depthwise ConvTranspose2d (kernel 16, stride 8,
padding 4, groups C, no bias) holding a fixed bilinear kernel: exactly x8 up-sampling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drn.labels import check_num_classes

__all__ = ["DRNSeg", "OUTPUT_STRIDE", "bilinear_kernel"]

OUTPUT_STRIDE = 8


def bilinear_kernel(size: int) -> torch.Tensor:
    """A size x size bilinear interpolation kernel (float32), the one the authors'
    ``fill_up_weights`` writes: a separable tent centred between the middle taps."""
    factor = math.ceil(size / 2)
    center = (2 * factor - 1 - factor % 2) / (2.0 * factor)
    taps = torch.arange(size, dtype=torch.float64) / factor
    ramp = 1.0 - (taps - center).abs()
    return torch.outer(ramp, ramp).to(torch.float32)


class DRNSeg(nn.Module):
    """Backbone features -> 1x1 ``seg`` conv -> frozen bilinear x8 ``up``.

    Input: N x 3 x H x W, already normalised. Output: N x C x H x W logits for any H, W:
    the input is padded bottom/right with zeros (the normalised mean colour) to a
    multiple of 8 and the logits are cropped back to H x W.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        check_num_classes(num_classes)  # 1 .. 65,536: what a mask can hold
        features = backbone.feature_modules()
        self.family = backbone.family
        self.block_type = backbone.block_type
        self.layers = backbone.layers
        self.out_dim = backbone.out_dim
        # base.<i> is the backbone child named base_names[i] (used to map classifier
        # checkpoints onto the segmentation model).
        self.base_names = tuple(name for name, _ in features)
        self.base = nn.Sequential(*(module for _, module in features))

        self.seg = nn.Conv2d(self.out_dim, num_classes, kernel_size=1, bias=True)
        nn.init.normal_(self.seg.weight, 0.0, math.sqrt(2.0 / num_classes))
        nn.init.zeros_(self.seg.bias)

        self.up = nn.ConvTranspose2d(
            num_classes, num_classes, kernel_size=2 * OUTPUT_STRIDE, stride=OUTPUT_STRIDE,
            padding=OUTPUT_STRIDE // 2, groups=num_classes, bias=False,
        )
        with torch.no_grad():
            kernel = bilinear_kernel(2 * OUTPUT_STRIDE).to(self.up.weight.device)
            self.up.weight.copy_(kernel.expand_as(self.up.weight))
        self.up.weight.requires_grad_(False)  # a fixed interpolation, never trained

    @property
    def num_classes(self) -> int:
        return self.seg.out_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's stride-8 feature map (input already padded to /8)."""
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % OUTPUT_STRIDE, -width % OUTPUT_STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.up(self.seg(self.base(x)))
        return logits[:, :, :height, :width]
