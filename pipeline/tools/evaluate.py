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
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from drn.metrics import ConfusionMatrix  # noqa: E402 - the metric itself lives with the models


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
    from pipeline.store.output import decode_mask
    from pipeline.store.reader import iter_batches, select_identity

    meta_obj = select_identity(output_uri, model=model, weights_sha256=weights_sha256)
    meta = json.loads(meta_obj.to_json())
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
    for batch in iter_batches(output_uri, meta_obj, ["image_id", "status", "mask"],
                              batch_size=batch_size):
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
