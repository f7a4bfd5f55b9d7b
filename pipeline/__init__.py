"""drn-label's pipeline: the Ray Data job, its output format, the tools around it, the CLI.

Layers (docs/architecture.md; import-linter checks them): ``cli`` > ``tools`` >
``training`` | ``cluster`` > ``job`` (the only layer that imports Ray at module level) >
``store`` (Ray-free: filesystems, sources, decode, the output contract, lease) >
``spec`` | ``errors``. ``import pipeline`` is cheap; the names below load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["read_masks", "decode_mask", "read_probs", "decode_probs"]

_EXPORTS = {"read_masks": "pipeline.store.reader", "decode_mask": "pipeline.store.output",
            "read_probs": "pipeline.store.reader", "decode_probs": "pipeline.store.output"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
