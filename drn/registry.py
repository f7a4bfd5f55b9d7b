"""The model registry: one table from architecture name to builder.

This module is the table only. It imports no model code (nor torch), so the builders in
``drn.models`` can register themselves here (``@register_model``) without a cycle. The
lookups below answer from what is registered *so far*; the public questions
(``drn.list_models``, ``drn.model_info``, ``get_builder``) live in ``drn.catalog``, which
loads the built-in models first.

A builder is called as ``builder(num_classes=...)`` and returns a backbone
(``num_classes=None``: no pooling/classifier; otherwise the ImageNet-style classifier).
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

from drn.errors import ModelError

__all__ = ["ModelInfo", "register_model", "registered_names", "lookup_builder"]

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
        return builder

    return add(fn) if fn is not None else add


def _natural_key(name: str) -> tuple:
    # drn_a_18 < drn_a_101: compare digit runs as numbers.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def registered_names(pattern: str | None = None) -> list[str]:
    """Names registered so far, optionally filtered by an fnmatch ``pattern``, sorted
    by family then depth (drn_a_18 ... drn_d_107). Loads nothing."""
    names = sorted(_REGISTRY, key=_natural_key)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def _close_matches(name: str, limit: int = 5) -> list[str]:
    # Most similar first; equally similar names in list order (not difflib's reverse).
    scored = [
        (difflib.SequenceMatcher(None, name, candidate).ratio(), candidate)
        for candidate in registered_names()
    ]
    scored = [item for item in scored if item[0] >= 0.6]
    scored.sort(key=lambda item: (-round(item[0], 6), _natural_key(item[1])))
    return [candidate for _, candidate in scored[:limit]]


def lookup_builder(name: str) -> Callable[..., object]:
    """The builder registered so far as ``name``; an unknown name raises ``ValueError``
    that lists the closest registered names. Loads nothing."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = _close_matches(str(name))
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        raise ModelError.spelled("unknown model {name!r} ({hint}); {list:models} lists all {count}",
                                 name=name, hint=hint, count=len(_REGISTRY)) from None
