"""`drn-label compare`: how two model identities' labels of the same images differ.

After a round of the labelling loop OUTPUT holds the old and the new model's rows; this
says per image how much the masks agree (pixel agreement, and the mean IoU between the
two masks over the classes either one predicts) and which images changed most, the ones
worth a look before the next round.

Streamed in chunks of image ids: A's rows are read in chunks of `CHUNK` ids, and B's
rows of each chunk are found with a filtered scan, so memory holds one chunk's masks.
"""
from __future__ import annotations

import csv
import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from drn.io import atomic_write
from pipeline.errors import UsageError
from pipeline.store.output import OutputMetadata, decode_mask
from pipeline.store.reader import ids_filter, iter_batches, read_metadata, select_identity

CHUNK = 4096


@dataclass(frozen=True)
class ImageAgreement:
    image_id: str
    pixel_agreement: float  # share of pixels where both masks hold the same class
    mask_iou: float  # mean over classes in either mask of IoU(A == c, B == c)


@dataclass(frozen=True)
class CompareResult:
    a: OutputMetadata
    b: OutputMetadata
    images: int  # images with an ok row of both identities
    only_a: int
    only_b: int
    pixel_agreement: float  # mean over images
    mask_iou: float  # mean over images
    most_changed: tuple[ImageAgreement, ...]  # lowest pixel agreement first

    def lines(self) -> list[str]:
        out = [f"A {self.a.model} (weights {self.a.weights_sha256[:12]})  vs  "
               f"B {self.b.model} (weights {self.b.weights_sha256[:12]})",
               f"{self.images} images in both ({self.only_a} only in A, {self.only_b} only in B): "
               f"pixel agreement {self.pixel_agreement:.4f}, mean IoU between masks {self.mask_iou:.4f}"]
        if self.most_changed:
            out.append("changed most (pixel agreement, mask IoU):")
            out += [f"  {m.image_id}  {m.pixel_agreement:.4f}  {m.mask_iou:.4f}" for m in self.most_changed]
        return out


def mask_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(pixel agreement, mean IoU over the classes either mask holds) of two class masks."""
    if a.shape != b.shape:
        raise ValueError(f"masks of sizes {a.shape} and {b.shape}")
    agreement = float((a == b).mean()) if a.size else 1.0
    size = int(max(a.max(initial=0), b.max(initial=0))) + 1
    both = np.bincount(a.ravel().astype(np.int64) * size + b.ravel(), minlength=size * size)
    confusion = both.reshape(size, size)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    iou = float((inter[present] / union[present]).mean()) if present.any() else 1.0
    return agreement, iou


def parse_identity(output: str, text: str) -> OutputMetadata:
    """An identity as ``--a``/``--b`` give it: a checkpoint file (its sha256 is the rows'
    weights_sha256), a weights sha256 (or unique prefix), a model name, or ``MODEL@SHA``;
    resolved by `select_identity`."""
    if Path(text).is_file():
        from drn.checkpoints import sha256_file

        return select_identity(output, weights_sha256=sha256_file(Path(text)))
    if "@" in text:
        model, sha = text.split("@", 1)
        return select_identity(output, model=model or None, weights_sha256=sha or None)
    models = {m.model for m in read_metadata(output)}
    if text in models:
        return select_identity(output, model=text)
    return select_identity(output, weights_sha256=text)


def _ok_masks(output: str, meta: OutputMetadata, image_ids=None) -> Iterator[tuple[str, bytes]]:
    where = pc.field("status") == "ok"
    if image_ids is not None:
        where = where & ids_filter(image_ids)
    for batch in iter_batches(output, meta, ["image_id", "mask"], where=where):
        yield from zip(batch.column("image_id").to_pylist(), batch.column("mask").to_pylist())


def iter_agreement(output: str, a: OutputMetadata, b: OutputMetadata,
                   counts: dict | None = None) -> Iterator[ImageAgreement]:
    """Per image with ok rows of both identities, in A's order; `counts` gets only_a/only_b."""
    only_a = seen_b = matched = 0
    chunk: dict[str, object] = {}

    def flush() -> Iterator[ImageAgreement]:
        nonlocal only_a, matched
        found = dict(_ok_masks(output, b, list(chunk)))
        for image_id, cell in chunk.items():
            other = found.get(image_id)
            if other is None:
                only_a += 1
                continue
            matched += 1
            agreement, iou = mask_agreement(decode_mask(cell), decode_mask(other))
            yield ImageAgreement(image_id, agreement, iou)
        chunk.clear()

    for image_id, cell in _ok_masks(output, a):
        chunk[image_id] = cell
        if len(chunk) >= CHUNK:
            yield from flush()
    if chunk:
        yield from flush()
    for batch in iter_batches(output, b, ["image_id"], where=pc.field("status") == "ok",
                              batch_size=65536):
        seen_b += batch.num_rows
    if counts is not None:
        counts.update(only_a=only_a, only_b=seen_b - matched)


def compare(output: str, a: str, b: str, *, top: int = 20, out: Path | None = None) -> CompareResult:
    """Compare identities `a` and `b` of OUTPUT; `out` (.csv or .parquet) gets every image."""
    meta_a, meta_b = parse_identity(output, a), parse_identity(output, b)
    if (meta_a.model, meta_a.weights_sha256) == (meta_b.model, meta_b.weights_sha256):
        raise UsageError(f"--a {a} and --b {b} name the same model identity; name two")
    if out is not None and Path(out).suffix.lower() not in (".csv", ".parquet"):
        raise UsageError(f"--out {out}: per-image agreement is written as .csv or .parquet")
    counts: dict = {}
    rows: list[ImageAgreement] = [] if out is not None else None
    heap: list[tuple[float, str, ImageAgreement]] = []
    total_agree = total_iou = 0.0
    n = 0
    for item in iter_agreement(output, meta_a, meta_b, counts):
        n += 1
        total_agree += item.pixel_agreement
        total_iou += item.mask_iou
        key = (-item.pixel_agreement, item.image_id)
        if len(heap) < top:
            heapq.heappush(heap, (*key, item))
        elif key > heap[0][:2]:
            heapq.heapreplace(heap, (*key, item))
        if rows is not None:
            rows.append(item)
    if n == 0:
        raise UsageError(f"{output}: no image has ok rows of both identities; label the same "
                         "images with both models first")
    if out is not None:
        _write_rows(Path(out), rows)
    changed = tuple(item for *_, item in sorted(heap, key=lambda t: (-t[0], t[1])))
    return CompareResult(meta_a, meta_b, n, counts["only_a"], counts["only_b"], total_agree / n,
                         total_iou / n, changed)


def _write_rows(out: Path, rows: list[ImageAgreement]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with atomic_write(out, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "pixel_agreement", "mask_iou"])
            writer.writerows([r.image_id, repr(r.pixel_agreement), repr(r.mask_iou)] for r in rows)
        return
    import io

    import pyarrow.parquet as pq

    table = pa.table({"image_id": [r.image_id for r in rows],
                      "pixel_agreement": pa.array([r.pixel_agreement for r in rows], pa.float64()),
                      "mask_iou": pa.array([r.mask_iou for r in rows], pa.float64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with atomic_write(out) as f:
        f.write(buf.getvalue())
