"""Small real models and checkpoints for tests.

Random weights with a non-zero head bias give one constant class, which proves nothing
about orientation or channels; with the head's bias at zero the arg-max follows the
image's content, so masks vary across each picture.
"""
from __future__ import annotations

from pathlib import Path

import torch

import drn


def content_model(arch: str = "drn_d_22", num_classes: int = 19, seed: int = 0, classes=None):
    model = drn.create_model(arch, num_classes=None if classes else num_classes,
                             classes=classes, seed=seed)
    with torch.no_grad():
        model.seg.bias.zero_()
    return model.eval()


def authors_checkpoint(path: Path, arch: str = "drn_d_22", num_classes: int = 19, seed: int = 0) -> Path:
    """A DRNSeg checkpoint in the authors' key layout (base.*, seg.*, up.weight)."""
    model = content_model(arch, num_classes, seed)
    state = model.state_dict()
    assert any(k.startswith("base.") for k in state) and "up.weight" in state
    torch.save(state, path)
    return path
