"""Segmentation quality: IoU, mIoU and pixel accuracy from a confusion matrix.

Definition (the one the authors and the Cityscapes/VOC benchmarks use):

* One confusion matrix ``M`` (C x C, rows = ground truth, columns = prediction) is
  accumulated over every pixel of every evaluated image; images are not averaged
  separately, so a large image weighs more than a small one.
* Pixels whose ground truth is the ignore index (255) are left out, whatever was predicted.
* ``IoU_c = M[c, c] / (sum_row_c + sum_col_c - M[c, c])`` = TP / (TP + FP + FN).
* ``mIoU`` is the mean of ``IoU_c`` over the classes present in the ground truth or in the
  prediction; a class absent from both has no IoU (``null`` in JSON) and is excluded from
  the mean. A class predicted but never in the ground truth counts, with IoU 0.
* ``pixel_accuracy = trace(M) / sum(M)``.

Plain numpy (no torch, no Ray): training, evaluation of a labelling run's output and
anything else that scores masks share this one implementation.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["ConfusionMatrix", "DEFINITION"]

DEFINITION = (
    "One confusion matrix (rows = ground truth, columns = prediction) accumulated over all "
    "pixels of all evaluated images; pixels whose ground truth is {ignore} are ignored. "
    "IoU_c = TP / (TP + FP + FN); mIoU = mean IoU over classes present in the ground truth "
    "or the prediction (classes absent from both are null and excluded); "
    "pixel_accuracy = correct pixels / counted pixels."
)


class ConfusionMatrix:
    """A C x C matrix of pixel counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one prediction/ground-truth pair of equal shape (integer class indices).

        Ground-truth pixels equal to ``ignore_index`` are skipped. Any other value outside
        ``[0, num_classes)`` in either array is an error, not something to count silently.
        """
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        c = self.num_classes
        gt = gt.ravel().astype(np.int64, copy=False)
        pred = pred.ravel().astype(np.int64, copy=False)
        keep = gt != self.ignore_index
        if not keep.all():
            gt, pred = gt[keep], pred[keep]
        if gt.size == 0:
            return
        for name, values in (("ground truth", gt), ("prediction", pred)):
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= c:
                bad = high if high >= c else low
                raise ValueError(
                    f"{name} holds class index {bad}, outside 0..{c - 1} "
                    f"(and not the ignore index {self.ignore_index})"
                )
        self.matrix += np.bincount(gt * c + pred, minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix of the same classes (e.g. from another worker); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes but got {other.num_classes}")
        self.matrix += other.matrix
        return self

    @property
    def total(self) -> int:
        """Number of pixels counted (ignored pixels excluded)."""
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU (float64, length C); NaN for classes absent from both sides."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - np.diag(self.matrix)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in ground truth or prediction; NaN if none is."""
        iou = self.iou()
        present = ~np.isnan(iou)
        return float(iou[present].mean()) if present.any() else math.nan

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; NaN when nothing was counted."""
        total = self.total
        return float(np.trace(self.matrix) / total) if total else math.nan

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready summary: miou, pixel_accuracy, per_class (by name), confusion, definition.

        NaN (nothing to measure) becomes ``None``, i.e. ``null`` in JSON.
        """
        if class_names is None:
            class_names = [str(i) for i in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class names but got {len(class_names)}")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class names must be unique, got {list(class_names)}")
        return {
            "miou": _none_if_nan(self.miou()),
            "pixel_accuracy": _none_if_nan(self.pixel_accuracy()),
            "per_class": {n: _none_if_nan(v) for n, v in zip(class_names, self.iou().tolist())},
            "pixels": self.total,
            "ignore_index": self.ignore_index,
            "confusion": self.matrix.tolist(),
            "definition": DEFINITION.format(ignore=self.ignore_index),
        }


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
