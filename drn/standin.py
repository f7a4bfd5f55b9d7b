"""A stand-in for a segmentation model that costs nothing: its forward pass returns zero
logits.

Everything around a model (reading, decoding, handing batches over, the statistics, mask
encoding, commits) must keep an accelerator busy. Replacing the model by this stand-in
measures that feed on any machine, a CPU included: whatever rate a pipeline reaches with
it is the most it can hand to a real model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drn.labels import LabelSet, check_num_classes, load_label_set

STAND_IN = "stand-in"
"""The architecture name (and weights identity) of the stand-in."""


class StandIn(nn.Module):
    """N x 3 x H x W in, N x C x H x W zero logits out."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return x.new_zeros((n, self.num_classes, h, w))


def create_stand_in(*, num_classes: int | None = None,
                    classes: str | Path | LabelSet | None = None) -> nn.Module:
    """A `StandIn` with a ``drn_config`` like `drn.create_model`'s (2 classes unless
    ``classes`` or ``num_classes`` say otherwise)."""
    from drn.factory import ModelConfig

    label_set = load_label_set(classes) if classes is not None else None
    resolved = num_classes or (label_set.num_classes if label_set else 2)
    model = StandIn(resolved).eval()
    model.drn_config = ModelConfig(arch=STAND_IN, task="segment", num_classes=resolved,
                                   label_set=label_set if label_set and label_set.num_classes == resolved
                                   else None,
                                   weights_sha256=STAND_IN, weights_source=None)
    return model
