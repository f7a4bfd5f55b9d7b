"""The model registry: one table from architecture name to builder.

Builders register themselves with ``@register_model`` (in ``drn.models``); the
registry is filled the first time someone asks it a question, so ``import drn`` stays
cheap. A builder is called as ``builder(num_classes=...)`` and returns a backbone
(``num_classes=None``: no pooling/classifier; otherwise the ImageNet-style classifier).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

__all__ = ["ModelInfo", "register_model", "list_models", "model_info", "get_builder"]

Builder = TypeVar("Builder", bound=Callable[..., object])

# The one piece of global state in drn/: name -> builder, in registration order.
_REGISTRY: dict[str, Callable[..., object]] = {}


@dataclass(frozen=True)
class ModelInfo:
    """What an architecture is, without building its weights."""

    name: str
    family: str  # "drn_a", "drn_c" or "drn_d"
    block: str  # "basic" or "bottleneck"
    layers: tuple[int, ...]  # blocks (or convs) per stage
    num_params: int  # parameters of the 1000-class classifier (task="classify")
    feature_channels: int  # channels of the stride-8 feature map the seg head sees


def register_model(fn: Builder | None = None, *, name: str | None = None):
    """Add a builder to the registry under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with a name (``@register_model(name="x")``).
    Registering a name twice is an error, so two modules cannot silently shadow
    each other.
    """

    def add(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered; pick another name")
        _REGISTRY[key] = builder
        model_info.cache_clear()
        return builder

    return add(fn) if fn is not None else add


def _load_builtin_models() -> None:
    # Importing drn.models runs its @register_model decorators (once; Python caches it).
    from drn import models  # noqa: F401


def _natural_key(name: str) -> tuple:
    # drn_a_18 < drn_a_101: compare digit runs as numbers.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def list_models(pattern: str | None = None) -> list[str]:
    """Registered architecture names, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"drn_d_*"``), sorted by family then depth (drn_a_18 ... drn_d_107)."""
    _load_builtin_models()
    names = sorted(_REGISTRY, key=_natural_key)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def _close_matches(name: str, limit: int = 5) -> list[str]:
    # Most similar first; equally similar names in list order (not difflib's reverse).
    scored = [
        (difflib.SequenceMatcher(None, name, candidate).ratio(), candidate)
        for candidate in list_models()
    ]
    scored = [item for item in scored if item[0] >= 0.6]
    scored.sort(key=lambda item: (-round(item[0], 6), _natural_key(item[1])))
    return [candidate for _, candidate in scored[:limit]]


def get_builder(name: str) -> Callable[..., object]:
    """The builder registered as ``name``; an unknown name raises ``ValueError``
    that lists the closest registered names."""
    _load_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = _close_matches(str(name))
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ValueError(
            f"unknown model {name!r} ({hint}); drn.list_models() lists all {len(_REGISTRY)}"
        ) from None


@functools.lru_cache(maxsize=None)
def model_info(name: str) -> ModelInfo:
    """Facts about architecture ``name``. The parameter count is that of the
    1000-class classifier, counted on a model built on the ``meta`` device (no memory,
    no initialisation), and cached."""
    import torch

    builder = get_builder(name)
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
