"""How good are the labels: IoU, mIoU and pixel accuracy against ground-truth masks.

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

:func:`evaluate_output` applies this to a labelling run's OUTPUT (the Parquet of schema
version 1), streaming row batches so memory stays bounded however large the run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

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


# ---------------------------------------------------------------------------------------
# Evaluating a labelling run


def match_key(image_id: str) -> str:
    """The key an image id is matched by: the path after its last ``images/`` folder,
    without extension ("images/0001.png" -> "0001", "set/images/a/b.jpg" -> "a/b",
    "0001.png" -> "0001")."""
    key = image_id.replace("\\", "/").strip("/")
    if key.startswith("images/"):
        key = key[len("images/"):]
    elif "/images/" in key:
        key = key.rsplit("/images/", 1)[1]
    return os.path.splitext(key)[0]


def ground_truth_masks(ground_truth_dir: str | os.PathLike) -> dict[str, Path]:
    """Ground-truth mask files by match key: ``DIR/masks/**.png`` if there is a ``masks``
    folder, else ``DIR/**.png``; the key is the path below that folder without extension."""
    root = Path(ground_truth_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"ground truth {root}: not a directory")
    base = root / "masks" if (root / "masks").is_dir() else root
    masks = {p.relative_to(base).with_suffix("").as_posix(): p for p in sorted(base.rglob("*.png"))}
    if not masks:
        raise FileNotFoundError(f"ground truth {root}: no .png masks in {base}")
    return masks


def evaluate_output(
    output_uri: str,
    ground_truth_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    model: str | None = None,
    weights_sha256: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score the masks of a labelling run in ``output_uri`` against ground-truth masks.

    Matching: a row's ``image_id`` and a ground-truth mask are paired by
    :func:`match_key` (the id's path after its last ``images/`` folder, without extension)
    against the mask's path below ``masks/`` without extension; when that finds nothing,
    by the file stem alone if exactly one mask has it ("x/0001.jpg" -> "0001"). So ids
    made from the set's root ("images/0001.png") or from its ``images/`` folder
    ("0001.png") both match ``masks/0001.png``; ids under ``masks/`` (the ground truth
    labelled by mistake) match nothing.

    Class names: ``class_names`` if given, else the ``drn_label`` file metadata of the
    Parquet files, else ``classes.json`` in the ground-truth folder; none of them is an
    error. OUTPUT may hold several models' rows; pick one with ``model`` /
    ``weights_sha256`` when it does (the error lists what is there).

    Returns :meth:`ConfusionMatrix.to_dict` plus counts: ``images_evaluated``,
    ``images_missing_prediction`` (ground truth without an ``ok`` row),
    ``images_missing_ground_truth`` (``ok`` rows without a mask to compare with),
    ``error_rows``, ``duplicate_rows`` (a second row for an already-scored image, skipped)
    and ``size_mismatch`` (mask size differs from the ground truth; not scored).
    """
    import pyarrow.dataset as pads
    import pyarrow.compute as pc

    from pipeline.output import decode_mask

    fs, files = _data_files(output_uri)
    if not files:
        raise FileNotFoundError(f"output {output_uri}: no Parquet data files (was the run committed?)")
    dataset = pads.dataset(files, format="parquet", filesystem=fs)

    identities = _identities(dataset)
    row_filter = None
    if model is not None:
        row_filter = pc.field("model") == model
    if weights_sha256 is not None:
        f = pc.field("weights_sha256") == weights_sha256
        row_filter = f if row_filter is None else row_filter & f
    selected = {
        (m, w) for m, w in identities
        if (model is None or m == model) and (weights_sha256 is None or w == weights_sha256)
    }
    if not selected:
        raise ValueError(f"output {output_uri}: no rows of model={model} weights_sha256={weights_sha256}; "
                         f"it holds {sorted(identities)}")
    if len(selected) > 1:
        raise ValueError(f"output {output_uri} holds rows of several models {sorted(selected)}: "
                         "choose one with model= / weights_sha256=")

    meta = _metadata(files, fs, selected)
    gt_masks = ground_truth_masks(ground_truth_dir)
    names = _class_names(class_names, meta, Path(ground_truth_dir))
    ignore_index = int(meta.get("ignore_index", 255)) if meta else 255
    if meta and "num_classes" in meta and int(meta["num_classes"]) != len(names):
        raise ValueError(f"the model predicts {meta['num_classes']} classes but {len(names)} "
                         f"class names were given: {list(names)}")

    by_stem: dict[str, list[str]] = {}
    for key in gt_masks:
        by_stem.setdefault(key.rsplit("/", 1)[-1], []).append(key)

    cm = ConfusionMatrix(len(names), ignore_index=ignore_index)
    scored: set[str] = set()
    counts = {"error_rows": 0, "duplicate_rows": 0, "size_mismatch": 0, "images_missing_ground_truth": 0}
    scanner = dataset.scanner(
        columns=["image_id", "status", "mask"], filter=row_filter, batch_size=batch_size,
        batch_readahead=1, fragment_readahead=1,
    )
    for batch in scanner.to_batches():
        ids = batch.column("image_id").to_pylist()
        statuses = batch.column("status").to_pylist()
        mask_bytes = batch.column("mask").field("bytes")
        for row, (image_id, status) in enumerate(zip(ids, statuses)):
            if status != "ok":
                counts["error_rows"] += 1
                continue
            key = match_key(image_id)
            if key not in gt_masks:
                # Fall back on the stem, but never pair the ground truth's own files with it.
                candidates = [] if key.startswith("masks/") else by_stem.get(key.rsplit("/", 1)[-1], [])
                key = candidates[0] if len(candidates) == 1 else None
            if key is None:
                counts["images_missing_ground_truth"] += 1
                continue
            if key in scored:
                counts["duplicate_rows"] += 1
                continue
            data = mask_bytes[row].as_py()
            pred = decode_mask(data)
            if pred is None:
                raise ValueError(f"output {output_uri}: image {image_id} has status ok but no mask")
            gt = _read_mask(gt_masks[key])
            if pred.shape != gt.shape:
                counts["size_mismatch"] += 1
                scored.add(key)
                continue
            try:
                cm.update(pred, gt)
            except ValueError as e:
                raise ValueError(f"image {image_id} (ground truth {gt_masks[key]}): {e}") from None
            scored.add(key)

    result = cm.to_dict(names)
    result.update(
        images_evaluated=len(scored) - counts["size_mismatch"],
        images_missing_prediction=len(gt_masks) - len(scored),
        **counts,
    )
    if meta:
        result["model"] = meta.get("model")
        result["weights_sha256"] = meta.get("weights_sha256")
    return result


def _data_files(output_uri: str):
    """OUTPUT's filesystem and committed data files (the same rules as every reader)."""
    from pipeline.output import data_files
    from pipeline.sources import resolve

    fs, root = resolve(output_uri)
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"output {output_uri}: not a directory")
    return fs, data_files(output_uri)


def _identities(dataset) -> set[tuple[str | None, str | None]]:
    """Distinct (model, weights_sha256) pairs of the rows (two small columns, streamed)."""
    names = set(dataset.schema.names)
    if not {"model", "weights_sha256"} <= names:
        return {(None, None)}
    found: set[tuple[str | None, str | None]] = set()
    for batch in dataset.to_batches(columns=["model", "weights_sha256"], batch_size=65536):
        found.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    return found or {(None, None)}


def _metadata(files: Sequence[str], fs, selected: set) -> dict[str, Any] | None:
    """The ``drn_label`` metadata of the first file whose rows are of the selected model."""
    import pyarrow.parquet as pq

    from pipeline.output import METADATA_KEY

    (model, sha), = selected
    first = None
    for path in files:
        md = pq.read_schema(path, filesystem=fs).metadata or {}
        if METADATA_KEY not in md:
            continue
        meta = json.loads(md[METADATA_KEY])
        first = first or meta
        if meta.get("model") == model and meta.get("weights_sha256") == sha:
            return meta
    return first


def _class_names(given: Sequence[str] | None, meta: dict | None, gt_dir: Path) -> list[str]:
    if given is not None:
        return list(given)
    if meta and meta.get("classes"):
        return list(meta["classes"])
    classes_file = gt_dir / "classes.json"
    if classes_file.is_file():
        return list(json.loads(classes_file.read_text())["classes"])
    raise ValueError(
        "no class names: the output has no drn_label metadata and the ground truth has no "
        f"classes.json ({classes_file}); pass class_names"
    )


def _read_mask(path: Path) -> np.ndarray:
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"ground truth {path}: not a readable PNG")
    if mask.ndim != 2:
        raise ValueError(f"ground truth {path}: expected a one-channel mask of class indices, "
                         f"got shape {mask.shape}")
    return mask
