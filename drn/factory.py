"""create_model(): architecture + task + weights + label set -> an eval-mode module."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from drn.catalog import get_builder, list_models
from drn.checkpoints import Checkpoint, CheckpointError, load_checkpoint, load_into, state_dict_sha256
from drn.errors import ModelError, Setting
from drn.labels import LabelSet, check_num_classes, load_label_set
from drn.seg import DRNSeg

__all__ = ["ModelConfig", "create_model", "TASKS"]

TASKS = ("segment", "classify")


@dataclass(frozen=True)
class ModelConfig:
    """What a built model is; attached as ``model.drn_config``.

    ``label_set`` is never ``None``: a model given no label set (and whose weights carry
    none) gets ``LabelSet.default(num_classes)`` (``class_0`` .., a generated palette,
    ImageNet's mean/std); a ``ModelConfig`` made with ``label_set=None`` fills it in the same
    way. ``weights_sha256`` identifies the weights: the sha256 of the checkpoint file's bytes
    when the checkpoint supplied every parameter; otherwise (no weights, or a classifier
    checkpoint under a freshly initialised segmentation head) ``"init:"`` followed by
    ``drn.checkpoints.state_dict_sha256`` of the model's state dict (sorted keys; name,
    dtype, shape and raw bytes of each tensor). ``weights_source`` is the checkpoint
    source as given, ``None`` without weights.
    """

    arch: str
    task: str
    num_classes: int
    label_set: LabelSet
    weights_sha256: str
    weights_source: str | None
    temperature: float = 1.0  # logits are divided by it before probabilities (drn.calibration)

    def __post_init__(self) -> None:
        if self.label_set is None:
            object.__setattr__(self, "label_set", LabelSet.default(self.num_classes))

    @property
    def mean(self) -> tuple[float, float, float]:
        """Input normalisation mean (of RGB in [0, 1]): the label set's."""
        return self.label_set.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Input normalisation std (of RGB in [0, 1]): the label set's."""
        return self.label_set.std


def _resolve_num_classes(
    name: str,
    task: str,
    num_classes: int | None,
    label_set: LabelSet | None,
    classes_given: bool,
    checkpoint: Checkpoint | None,
) -> int:
    # The checkpoint tells the class count only when its head is the one we build.
    from_checkpoint = checkpoint.num_classes if checkpoint and checkpoint.task == task else None
    if from_checkpoint is not None:
        source, head = checkpoint.source, checkpoint.head_key
        if num_classes is not None and num_classes != from_checkpoint:
            raise CheckpointError.spelled(
                "{source}: num_classes conflict: expected {asked} (given as {arg:num_classes}) but got "
                "{found} from the checkpoint's {head}; leave {arg:num_classes} out to use {found}",
                source=source, asked=num_classes, found=from_checkpoint, head=head)
        if classes_given and label_set is not None and label_set.num_classes != from_checkpoint:
            raise CheckpointError.spelled(
                "{source}: num_classes conflict: expected {asked} (label set {label_set!r}) "
                "but got {found} from the checkpoint's {head}; pass a label set "
                "with {found} classes", source=source, asked=label_set.num_classes,
                label_set=label_set.name, found=from_checkpoint, head=head)
    if num_classes is not None and label_set is not None and num_classes != label_set.num_classes:
        raise ModelError.spelled(
            "{name}: {arg:num_classes} {asked} but label set {label_set!r} ({arg:classes}) has "
            "{found} classes; pass one of them, or make them agree", name=name,
            asked=num_classes, label_set=label_set.name, found=label_set.num_classes)
    if num_classes is not None:
        resolved = num_classes
    elif label_set is not None:
        resolved = label_set.num_classes
    else:
        resolved = from_checkpoint
    if resolved is None:
        if task == "classify":
            return 1000  # ImageNet, as the released classifiers
        raise ModelError.spelled(
            "{name}: the number of classes is unknown; pass {arg:num_classes}, {arg:classes} (a "
            "preset such as 'cityscapes' or a label file) or {arg:weights} that carry "
            "them", name=name)
    return _check_num_classes(name, resolved)


def _check_num_classes(name: str, num_classes: int) -> int:
    try:
        return check_num_classes(num_classes)  # 1 .. 65,536: what a mask can hold
    except ValueError as exc:
        raise ModelError(f"{name}: {exc}") from None


def _build(name: str, task: str, num_classes: int, seed: int | None) -> nn.Module:
    """Build with weights initialised from ``seed``, or, with ``seed=None``, on the meta
    device (no memory, no init) for a checkpoint that will supply every tensor."""
    builder = get_builder(name)

    def build() -> nn.Module:
        if task == "classify":
            return builder(num_classes=num_classes)
        return DRNSeg(builder(num_classes=None), num_classes)

    if seed is None:
        with torch.device("meta"):
            return build()
    # A private RNG stream: identical weights in every worker, global state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    task: str = "segment",
    weights: str | os.PathLike | Checkpoint | None = None,
    classes: str | Path | LabelSet | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build architecture ``name`` (see ``drn.list_models()``) in eval mode.

    - ``task="segment"``: a ``DRNSeg``, N x 3 x H x W normalised input -> N x C x H x W
      logits for any H, W. ``task="classify"``: the backbone classifier, N x C logits.
    - ``weights``: a checkpoint source for ``drn.load_checkpoint`` (path, file:// or
      http(s):// URL, release name) or a loaded ``Checkpoint``. A classifier checkpoint
      under ``task="segment"`` fills the backbone only (a warning is logged).
    - ``classes``: a preset name, a ``LabelSet``, or a label file path; without it the
      label set comes from the checkpoint's metadata when it has one, else it is
      ``LabelSet.default(num_classes)``.
    - ``num_classes`` may be left out when ``classes`` or the weights tell it
      (``task="classify"`` defaults to 1000); at most 65,536 (what a mask can hold).
      Conflicts raise ``CheckpointError``.
    - Parameters the weights do not supply are initialised from ``seed``
      deterministically, so every worker builds identical models.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    get_builder(name)  # an unknown name fails here, before any download
    if num_classes is not None:
        _check_num_classes(name, num_classes)  # so does an impossible class count
    checkpoint = None
    if weights is not None:
        checkpoint = weights if isinstance(weights, Checkpoint) else load_checkpoint(weights)
        # Only a registered name is trusted (other scripts write their own spellings).
        if checkpoint.arch in list_models() and checkpoint.arch != name:
            raise CheckpointError.spelled(
                "{source}: the checkpoint holds {arch} (its metadata says so) but {name} was "
                "asked for; use {use}", source=checkpoint.source, arch=checkpoint.arch, name=name,
                use=Setting("model", checkpoint.arch))
    label_set = load_label_set(classes) if classes is not None else None
    if label_set is None and checkpoint is not None and checkpoint.task == task:
        label_set = checkpoint.label_set
    resolved = _resolve_num_classes(name, task, num_classes, label_set, classes is not None, checkpoint)
    if label_set is None or label_set.num_classes != resolved:
        # None known, or e.g. an ImageNet label set from metadata under another head.
        label_set = LabelSet.default(resolved)

    # A checkpoint with the same task supplies every tensor: skip the initialisation.
    full = checkpoint is not None and checkpoint.task == task
    model = _build(name, task, resolved, None if full else seed)
    covered = False
    if checkpoint is not None:
        # Copy only tensors of a Checkpoint the caller holds on to; ours is dropped.
        covered = load_into(model, checkpoint, arch=name, copy=isinstance(weights, Checkpoint))
    model.eval()
    if covered:
        weights_sha256 = checkpoint.sha256
    else:
        weights_sha256 = "init:" + state_dict_sha256(model.state_dict())
    model.drn_config = ModelConfig(
        arch=name,
        task=task,
        num_classes=resolved,
        label_set=label_set,
        weights_sha256=weights_sha256,
        weights_source=checkpoint.source if checkpoint is not None else None,
        temperature=checkpoint.temperature if full else 1.0,
    )
    return model
