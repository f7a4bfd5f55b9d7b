"""Label sets: class names, palette and the input normalisation that go with a model.

A ``LabelSet`` travels with the model (``model.drn_config.label_set``) and into the
output's metadata, so a mask can always be read back with the right names and colours.
Presets hold the facts of known label sets; ``load_label_set`` also reads a JSON or
text file. This module is also the one home of the mask facts: which integer type a mask
of C classes is stored in (``mask_dtype``) and which label value marks unlabelled pixels by
default (``default_ignore_index``). No torch here (numpy only): it is cheap to import.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "LabelSet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_CLASSES",
    "MAX_UINT8_CLASSES",
    "IGNORE_INDEX_UINT8",
    "IGNORE_INDEX_UINT16",
    "check_num_classes",
    "mask_dtype",
    "default_ignore_index",
    "get_preset",
    "list_presets",
    "load_label_set",
    "generate_palette",
]

RGB = tuple[int, int, int]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -- mask facts ---------------------------------------------------------------------------
# A mask stores one class id per pixel: uint8 up to 256 classes (ids 0..255), uint16 up to
# 65,536 (ids 0..65535). No model or label set may have more classes than a mask can hold.
MAX_UINT8_CLASSES = 256
MAX_CLASSES = 65536
# The default label value of unlabelled (ground-truth) pixels: the largest value of the
# mask type, as long as it is not a class id.
IGNORE_INDEX_UINT8 = 255
IGNORE_INDEX_UINT16 = 65535


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` if a mask can hold that many classes (1 .. ``MAX_CLASSES``), else
    ``ValueError`` naming the count and the limit."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes > MAX_CLASSES:
        raise ValueError(f"a mask holds at most {MAX_CLASSES:,} classes; got {num_classes}")
    return int(num_classes)


def mask_dtype(num_classes: int) -> np.dtype:
    """The integer type of a mask of ``num_classes`` classes: uint8 up to 256 classes,
    uint16 up to 65,536; more raise ``ValueError``."""
    check_num_classes(num_classes)
    return np.dtype(np.uint8 if num_classes <= MAX_UINT8_CLASSES else np.uint16)


def default_ignore_index(num_classes: int) -> int:
    """The label value that marks unlabelled pixels when a label set names none: 255 up to
    255 classes, 65535 up to 65,535 classes (255 is a class id above 255 classes). With
    65,536 classes every 16-bit value is a class id, so the default is 65536, a value no
    mask holds (nothing is ignored)."""
    check_num_classes(num_classes)
    if num_classes <= IGNORE_INDEX_UINT8:
        return IGNORE_INDEX_UINT8
    if num_classes <= IGNORE_INDEX_UINT16:
        return IGNORE_INDEX_UINT16
    return num_classes


@dataclass(frozen=True)
class LabelSet:
    """Class names (index = class id), one RGB colour per class, the per-channel
    mean/std (of RGB values in [0, 1]) the model's input is normalised with, and the
    label value that marks unlabelled pixels.

    ``ignore_index`` defaults to ``default_ignore_index(num_classes)``: 255, or 65535
    when there are more than 255 classes (255 is a class id then); it must not be a class
    id. A label set has at most ``MAX_CLASSES`` (65,536) classes: what a mask can hold.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[RGB, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int | None = field(default=None)

    def __post_init__(self) -> None:
        # Normalise sequences (lists from JSON) to tuples so the object is hashable.
        set_ = object.__setattr__
        set_(self, "class_names", tuple(str(n) for n in self.class_names))
        set_(self, "palette", tuple(tuple(int(v) for v in rgb) for rgb in self.palette))
        set_(self, "mean", tuple(float(v) for v in self.mean))
        set_(self, "std", tuple(float(v) for v in self.std))
        where = f"label set {self.name!r}"
        if not self.name:
            raise ValueError("a label set needs a non-empty name")
        if not self.class_names:
            raise ValueError(f"{where}: no classes")
        if len(self.class_names) > MAX_CLASSES:
            raise ValueError(
                f"{where}: a mask holds at most {MAX_CLASSES:,} classes; got {len(self.class_names)}"
            )
        for index, class_name in enumerate(self.class_names):
            if not class_name.strip():
                raise ValueError(f"{where}: class {index} has an empty name")
        seen: dict[str, int] = {}
        for index, class_name in enumerate(self.class_names):
            if class_name in seen:
                raise ValueError(
                    f"{where}: class name {class_name!r} is used twice (ids {seen[class_name]} "
                    f"and {index}); class names must be unique"
                )
            seen[class_name] = index
        if len(self.palette) != len(self.class_names):
            raise ValueError(
                f"{where}: {len(self.palette)} palette colours for {len(self.class_names)} "
                "classes; give one [r, g, b] per class or leave the palette out"
            )
        for index, rgb in enumerate(self.palette):
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError(f"{where}: palette entry {index} {list(rgb)} is not [r, g, b] in 0..255")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"{where}: mean and std need 3 values (R, G, B)")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"{where}: std values must be > 0, got {list(self.std)}")
        if self.ignore_index is None:
            set_(self, "ignore_index", default_ignore_index(self.num_classes))
        elif 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"{where}: ignore_index {self.ignore_index} is a class id (0..{self.num_classes - 1}); "
                "pick a value outside the class range"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; the same shape ``load_label_set`` reads from a file."""
        return {
            "name": self.name,
            "classes": list(self.class_names),
            "palette": [list(rgb) for rgb in self.palette],
            "mean": list(self.mean),
            "std": list(self.std),
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def default(cls, num_classes: int) -> "LabelSet":
        """The label set of a model that was given none: name ``"default"``, classes
        ``class_0`` .. ``class_<C-1>``, ``generate_palette(C)`` and ImageNet's mean/std
        (what an ImageNet-pretrained backbone expects)."""
        return _default_label_set(check_num_classes(num_classes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, default_name: str = "custom") -> "LabelSet":
        """Build from ``to_dict``'s shape: ``classes`` is required; ``palette`` defaults
        to ``generate_palette``; ``mean``/``std`` default to ImageNet's."""
        if "classes" not in data:
            raise ValueError("label set: missing 'classes' (a list of class names)")
        classes = data["classes"]
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise ValueError("label set: 'classes' must be a list of class names")
        palette = data.get("palette")
        return cls(
            name=str(data.get("name") or default_name),
            class_names=tuple(classes),
            palette=tuple(palette) if palette is not None else generate_palette(len(classes)),
            mean=tuple(data.get("mean") or IMAGENET_MEAN),
            std=tuple(data.get("std") or IMAGENET_STD),
            ignore_index=data.get("ignore_index"),
        )


def generate_palette(num_colors: int) -> tuple[RGB, ...]:
    """A deterministic palette of distinct colours (the PASCAL VOC scheme: the bits of
    the class id spread over R, G, B from the most significant bit down). Distinct for
    up to 2**24 classes; class 0 is black."""
    palette = []
    for index in range(num_colors):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette.append((r, g, b))
    return tuple(palette)


@functools.lru_cache(maxsize=64)  # LabelSet is immutable: share one instance per size
def _default_label_set(num_classes: int) -> LabelSet:
    return LabelSet(
        name="default",
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        palette=generate_palette(num_classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


# Cityscapes' 19 train ids, with the colours of cityscapesScripts' labels.py.
_CITYSCAPES_CLASSES = (
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)


@functools.cache  # LabelSet is immutable: share one instance
def _cityscapes() -> LabelSet:
    return LabelSet(
        name="cityscapes",
        class_names=tuple(name for name, _ in _CITYSCAPES_CLASSES),
        palette=tuple(rgb for _, rgb in _CITYSCAPES_CLASSES),
        # The authors' datasets/cityscapes/info.json (their released models expect it).
        mean=(0.290101, 0.328081, 0.286964),
        std=(0.182954, 0.186566, 0.184475),
        ignore_index=255,
    )


@functools.cache
def _imagenet() -> LabelSet:
    # The 1000 ImageNet-1k classes in the usual (synset-sorted) order; named by index
    # because the names are not shipped with this package.
    return LabelSet(
        name="imagenet",
        class_names=tuple(f"class_{i}" for i in range(1000)),
        palette=generate_palette(1000),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


_PRESETS = {"cityscapes": _cityscapes, "imagenet": _imagenet}


def list_presets() -> list[str]:
    """Names of the built-in label sets."""
    return sorted(_PRESETS)


def get_preset(name: str) -> LabelSet:
    """The built-in label set ``name`` (see ``list_presets()``)."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise ValueError(
            f"unknown label set preset {name!r}; presets: {', '.join(list_presets())}"
        ) from None


def load_label_set(preset_or_path: str | Path | LabelSet) -> LabelSet:
    """A preset name, a ``LabelSet`` (returned as is), or a file:

    - ``.json``: ``{"name": ..., "classes": [...], "palette": [[r, g, b], ...],
      "mean": [r, g, b], "std": [r, g, b], "ignore_index": ...}``; only ``classes`` is
      required. ``name`` defaults to the file's stem;
    - ``.txt``: one class name per line (class id = line number, from 0).

    A missing palette is generated (``generate_palette``, deterministic). A missing
    mean/std defaults to ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225):
    right for ImageNet-pretrained backbones, wrong for models trained with other
    statistics (the authors' Cityscapes models: use the ``cityscapes`` preset).
    """
    if isinstance(preset_or_path, LabelSet):
        return preset_or_path
    text = str(preset_or_path)
    if text in _PRESETS:
        return get_preset(text)
    path = Path(preset_or_path)
    if not path.is_file():
        raise ValueError(
            f"label set {text!r}: not a preset ({', '.join(list_presets())}) and no such file; "
            "pass a preset name or the path of a .json or .txt label file"
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"label file {path}: not valid JSON ({exc}); fix the file") from None
        if not isinstance(data, dict):
            raise ValueError(f'label file {path}: expected a JSON object like {{"classes": [...]}}')
        try:
            return LabelSet.from_dict(data, default_name=path.stem)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"label file {path}: {exc}") from None
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise ValueError(
                    f"label file {path}: line {number} is empty; write one class name per line "
                    "(class id = line number - 1) with no blank lines"
                )
        try:
            return LabelSet.from_dict({"classes": [ln.strip() for ln in lines]}, default_name=path.stem)
        except ValueError as exc:
            raise ValueError(f"label file {path}: {exc}") from None
    raise ValueError(
        f"label file {path}: unknown format {suffix or '(no suffix)'!r}; use .json or .txt"
    )
