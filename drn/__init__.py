"""drn: dilated residual networks (Yu, Koltun, Funkhouser, CVPR 2017) for labelling.

Plain PyTorch, no Ray. ``import drn`` is cheap: torch and the model code load on first
use of a name below (PEP 562 lazy attributes).

    >>> import drn
    >>> drn.list_models("drn_d_2*")
    ['drn_d_22', 'drn_d_24']
    >>> model = drn.create_model("drn_d_22", classes="cityscapes")  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "list_models",
    "model_info",
    "register_model",
    "ModelInfo",
    "create_model",
    "ModelConfig",
    "LabelSet",
    "get_preset",
    "list_presets",
    "load_label_set",
    "load_checkpoint",
    "save_checkpoint",
    "Checkpoint",
    "CheckpointError",
    "ConfusionMatrix",
]

# public name -> submodule that defines it
_EXPORTS = {
    "list_models": "catalog",
    "model_info": "catalog",
    "register_model": "registry",
    "ModelInfo": "registry",
    "create_model": "factory",
    "ModelConfig": "factory",
    "LabelSet": "labels",
    "get_preset": "labels",
    "list_presets": "labels",
    "load_label_set": "labels",
    "load_checkpoint": "checkpoints",
    "save_checkpoint": "checkpoints",
    "Checkpoint": "checkpoints",
    "CheckpointError": "checkpoints",
    "ConfusionMatrix": "metrics",
}

if TYPE_CHECKING:
    from drn.catalog import list_models, model_info
    from drn.checkpoints import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
    from drn.factory import ModelConfig, create_model
    from drn.labels import LabelSet, get_preset, list_presets, load_label_set
    from drn.metrics import ConfusionMatrix
    from drn.registry import ModelInfo, register_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'drn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"drn.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
