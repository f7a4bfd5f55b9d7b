"""The registered architectures, built-in ones included: the questions users ask.

Importing this module imports ``drn.models`` (torch and the builders, which register
themselves in ``drn.registry``), so every answer here covers the built-in models as
well as any registered by the user. ``drn.list_models`` and ``drn.model_info`` are the
functions below.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

import drn.models  # noqa: F401 - runs the built-in @register_model decorators
from drn.registry import ModelInfo, lookup_builder, registered_names

__all__ = ["list_models", "model_info", "get_builder"]


def list_models(pattern: str | None = None) -> list[str]:
    """Registered architecture names, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"drn_d_*"``), sorted by family then depth (drn_a_18 ... drn_d_107)."""
    return registered_names(pattern)


def get_builder(name: str) -> Callable[..., object]:
    """The builder registered as ``name``; an unknown name raises ``ValueError``
    that lists the closest registered names."""
    return lookup_builder(name)


def model_info(name: str) -> ModelInfo:
    """Facts about architecture ``name``. The parameter count is that of the
    1000-class classifier, counted on a model built on the ``meta`` device (no memory,
    no initialisation), and cached."""
    return _model_info(name, get_builder(name))


# Keyed by the builder too: a name registered again (after removal) is counted afresh.
@functools.lru_cache(maxsize=None)
def _model_info(name: str, builder: Callable[..., object]) -> ModelInfo:
    with torch.device("meta"):
        model = builder(num_classes=1000)
    return ModelInfo(
        name=name,
        family=model.family,
        block=model.block_type,
        layers=tuple(model.layers),
        num_params=sum(p.numel() for p in model.parameters()),
        feature_channels=model.out_dim,
    )
