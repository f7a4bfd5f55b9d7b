"""A synthetic segmentation set with exact ground truth, for training and for checking labels.

Each image is a textured, noisy background with a few coloured shapes that may overlap
(later shapes occlude earlier ones). A class is a shape AND a colour:

=====  ===============  =====================================================
index  name             what it looks like
=====  ===============  =====================================================
0      background       muted texture, plus "distractor" shapes in cyan/magenta
1      red disc         filled circle, red
2      blue square      filled, slightly rotated square, blue
3      green triangle   filled triangle, green
4      yellow stripe    long thick bar at any angle, yellow
=====  ===============  =====================================================

The colours are chosen so that the bugs a labelling pipeline can make are visible in the
score: swapping R and B turns red into blue and blue into red (a disc becomes a blue
disc, which is no class), and turns yellow into cyan, the colour of the background's
distractors. Because distractors come in every shape, colour is needed to find the
objects; because red/blue/green/yellow objects only come in their own shape, a model
that only looks at colour is also fine, but one that sees swapped channels is wrong.

Layout written under ``root``::

    images/<id>.png   RGB image (stored by OpenCV, so BGR order on disk as PNG requires)
    masks/<id>.png    uint8, class index per pixel; 255 marks a one-pixel ignore outline
                      around every visible object, where anti-aliasing mixes colours
    classes.json      {"name", "classes", "palette", "mean", "std", "ignore_index"}

Everything is deterministic: image ``i`` depends only on ``(seed, i, size)``, so a set of
10 images is the prefix of the set of 100 with the same seed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from drn.io import atomic_write

IGNORE_INDEX = 255

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "red disc",
    "blue square",
    "green triangle",
    "yellow stripe",
)
# RGB; the palette used to render masks (and the objects' base colours for classes 1-4).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (40, 40, 40),
    (220, 30, 30),
    (30, 60, 220),
    (30, 170, 40),
    (230, 210, 30),
)
# Background distractors: cyan is yellow with R and B swapped; magenta survives the swap.
DISTRACTOR_COLOURS: tuple[tuple[int, int, int], ...] = ((30, 210, 230), (200, 40, 200))

_SHAPES = ("disc", "square", "triangle", "stripe")


@dataclass(frozen=True)
class SyntheticSet:
    """What :func:`make_synthetic_set` wrote."""

    root: Path
    ids: tuple[str, ...]
    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def classes_file(self) -> Path:
        return self.root / "classes.json"

    def label_set(self):
        """The same facts as a ``drn.LabelSet`` (read back from ``classes.json``)."""
        import drn

        return drn.load_label_set(self.classes_file)


def make_synthetic_set(
    root: str | os.PathLike,
    *,
    count: int,
    size: int = 128,
    seed: int = 0,
    num_classes: int = len(CLASS_NAMES),
) -> SyntheticSet:
    """Write ``count`` images and masks of ``size`` x ``size`` pixels under ``root``.

    ``num_classes`` (2 to 5) keeps the first classes of :data:`CLASS_NAMES`; shapes of the
    dropped classes are not drawn. Mean/std in ``classes.json`` are measured on the images
    written (RGB, in [0, 1]), as training would compute them.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be between 2 and {len(CLASS_NAMES)}, got {num_classes}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(count - 1)))
    ids = tuple(f"{i:0{width}d}" for i in range(count))

    pixel_sum = np.zeros(3, np.float64)
    pixel_sq = np.zeros(3, np.float64)
    for i, image_id in enumerate(ids):
        image, mask = render_sample(i, size=size, seed=seed, num_classes=num_classes)
        _write_png(root / "images" / f"{image_id}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        _write_png(root / "masks" / f"{image_id}.png", mask)
        flat = image.reshape(-1, 3).astype(np.float64) / 255.0
        pixel_sum += flat.sum(0)
        pixel_sq += (flat**2).sum(0)
    n = count * size * size
    mean = pixel_sum / n
    std = np.sqrt(np.maximum(pixel_sq / n - mean**2, 1e-12))
    info = SyntheticSet(
        root=root,
        ids=ids,
        name="synthetic",
        class_names=CLASS_NAMES[:num_classes],
        palette=PALETTE[:num_classes],
        mean=tuple(round(float(v), 5) for v in mean),
        std=tuple(round(float(v), 5) for v in std),
    )
    classes = {
        "name": info.name,
        "classes": list(info.class_names),
        "palette": [list(c) for c in info.palette],
        "mean": list(info.mean),
        "std": list(info.std),
        "ignore_index": info.ignore_index,
    }
    with atomic_write(root / "classes.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(classes, indent=2) + "\n")
    return info


def render_sample(
    index: int, *, size: int = 128, seed: int = 0, num_classes: int = len(CLASS_NAMES)
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the set ``seed``: (H x W x 3 RGB uint8, H x W uint8 mask)."""
    rng = np.random.default_rng([seed, index, size])
    image = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)

    # Two to four objects of random classes, zero to two distractors, in random depth order.
    objects: list[tuple[str, int]] = []  # (shape, class index; 0 = distractor)
    drawable = list(range(1, num_classes))
    n_objects = int(rng.integers(2, 5))
    for _ in range(n_objects):
        class_index = int(rng.choice(drawable))
        objects.append((_SHAPES[class_index - 1], class_index))
    for _ in range(int(rng.integers(0, 3))):
        objects.append((_SHAPES[int(rng.integers(0, len(_SHAPES)))], 0))
    rng.shuffle(objects)  # occlusion between any two kinds

    for shape, class_index in objects:
        if class_index:
            colour = _jitter(rng, PALETTE[class_index])
        else:
            colour = _jitter(rng, DISTRACTOR_COLOURS[int(rng.integers(0, len(DISTRACTOR_COLOURS)))])
        region = _shape_region(rng, shape, size)  # uint8 0/1, drawn without anti-aliasing
        _paint(rng, image, region, colour)
        mask[region > 0] = class_index
        # One-pixel outline of what is visible now; occluders drawn later overwrite it.
        outline = region - cv2.erode(region, np.ones((3, 3), np.uint8))
        mask[outline > 0] = IGNORE_INDEX

    # Smooth object edges a little (as a camera would), then sensor noise.
    image = cv2.GaussianBlur(image, (3, 3), 0.6)
    noise = rng.normal(0.0, float(rng.uniform(4.0, 12.0)), image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, mask


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted colour, low-frequency blotches and a faint oriented stripe texture."""
    base = rng.uniform(70, 170) + rng.uniform(-25, 25, 3)  # greyish, slightly tinted
    grid = int(rng.integers(3, 7))
    blotches = rng.normal(0, 22, (grid, grid, 3)).astype(np.float32)
    blotches = cv2.resize(blotches, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(5, 16)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
    stripes = (rng.uniform(5, 18) * np.sin(phase))[..., None]
    image = base[None, None, :] + blotches + stripes
    return np.clip(image, 0, 255).astype(np.uint8)


def _jitter(rng: np.random.Generator, rgb: Sequence[int]) -> tuple[int, int, int]:
    """The base colour with a random brightness and a small per-channel shift."""
    gain = rng.uniform(0.75, 1.1)
    return tuple(int(np.clip(c * gain + rng.uniform(-15, 15), 0, 255)) for c in rgb)


def _shape_region(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    region = np.zeros((size, size), np.uint8)
    cx, cy = (float(v) for v in rng.uniform(0.1 * size, 0.9 * size, 2))
    r = float(rng.uniform(0.1, 0.2) * size)
    if shape == "disc":
        cv2.circle(region, (round(cx), round(cy)), max(3, round(r)), 1, -1, cv2.LINE_8)
    elif shape == "square":
        box = cv2.boxPoints(((cx, cy), (1.6 * r, 1.6 * r), float(rng.uniform(-20, 20))))
        cv2.fillPoly(region, [np.round(box).astype(np.int32)], 1, cv2.LINE_8)
    elif shape == "triangle":
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([cx + 1.5 * r * np.cos(angles), cy + 1.5 * r * np.sin(angles)], 1)
        cv2.fillPoly(region, [np.round(pts).astype(np.int32)], 1, cv2.LINE_8)
    elif shape == "stripe":
        length = float(rng.uniform(0.5, 0.9) * size)
        thickness = float(rng.uniform(0.08, 0.12) * size)
        rect = ((cx, cy), (length, max(3.0, thickness)), float(rng.uniform(0, 180)))
        cv2.fillPoly(region, [np.round(cv2.boxPoints(rect)).astype(np.int32)], 1, cv2.LINE_8)
    else:  # pragma: no cover - the list of shapes is fixed above
        raise ValueError(shape)
    return region


def _paint(rng: np.random.Generator, image: np.ndarray, region: np.ndarray, colour) -> None:
    """Fill ``region`` with ``colour`` under a soft linear shading, in place."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    shade = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5)
    fill = np.clip(np.asarray(colour, np.float32)[None, None, :] * shade[..., None], 0, 255)
    inside = region > 0
    image[inside] = fill[inside].astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: OpenCV could not write the PNG")
