"""`drn-label select`: pick the images people should check, as a manifest of image ids.

Strategies (over the ok rows of one model identity):

- ``least-confident``: lowest ``confidence`` (mean top probability) first.
- ``entropy``: highest mean per-pixel ``entropy`` first (schema version 2).
- ``margin``: smallest mean ``margin`` between the two most probable classes first (v2).
- ``random``: a uniform sample; the same ``seed`` picks the same images whatever the
  order of OUTPUT's files (each id's rank is a hash of seed and id).
- ``class-balanced``: least-confident images taken in turn from each class's own list
  (images where the model predicts the class), rarest class first, so that a rare
  class is not crowded out by a common one; ties broken by confidence.

OUTPUT is streamed: memory holds `limit` candidates (per class for class-balanced), not
the rows. The manifest (.txt: one id a line; .csv / .parquet: image_id, uri, score, rank)
lists the most useful image first; `export --ids` and `read_ids` read all three.
"""
from __future__ import annotations

import csv
import hashlib
import heapq
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from drn.io import atomic_write
from pipeline.errors import UsageError
from pipeline.store.output import OutputMetadata
from pipeline.store.reader import iter_batches, select_identity

STRATEGIES = ("least-confident", "entropy", "margin", "random", "class-balanced")
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


@dataclass(frozen=True)
class Picked:
    image_id: str
    uri: str
    score: float  # the strategy's figure: confidence, entropy, margin, or a hash rank


@dataclass(frozen=True)
class SelectResult:
    out: Path
    strategy: str
    picked: tuple[Picked, ...]
    candidates: int  # ok rows of the identity

    def summary(self) -> str:
        return (f"selected {len(self.picked)} of {self.candidates} images by {self.strategy} "
                f"to {self.out}")


def _column(strategy: str) -> str:
    return {"least-confident": "confidence", "entropy": "entropy", "margin": "margin",
            "class-balanced": "confidence"}.get(strategy, "confidence")


def _hash_rank(seed: int, image_id: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _rows(output: str, meta: OutputMetadata, columns: list[str]) -> Iterator[dict]:
    for batch in iter_batches(output, meta, ["image_id", "uri", *columns],
                              where=pc.field("status") == "ok", batch_size=4096):
        yield from batch.to_pylist()


def select(output: str, strategy: str, limit: int, out: Path, *, model: str | None = None,
           weights_sha256: str | None = None, seed: int = 0) -> SelectResult:
    """Write the manifest of `limit` images picked by `strategy` (see the module doc)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if limit < 1:
        raise UsageError(f"--limit {limit}: must be at least 1")
    out = Path(out)
    if out.suffix.lower() not in MANIFEST_SUFFIXES:
        raise UsageError(f"--out {out}: the manifest must end in {', '.join(MANIFEST_SUFFIXES)}")
    meta = select_identity(output, model=model, weights_sha256=weights_sha256)
    if strategy == "class-balanced":
        picked, candidates = _class_balanced(output, meta, limit)
    else:
        picked, candidates = _ranked(output, meta, strategy, limit, seed)
    if not candidates:
        raise UsageError(f"{output}: no ok rows of {meta.model} (weights {meta.weights_sha256[:12]}) "
                         "to select from")
    write_ids(out, picked)
    return SelectResult(out, strategy, tuple(picked), candidates)


def _ranked(output: str, meta: OutputMetadata, strategy: str, limit: int,
            seed: int) -> tuple[list[Picked], int]:
    """The `limit` rows with the smallest key, kept in a bounded heap while rows stream."""
    column = _column(strategy)
    sign = -1.0 if strategy == "entropy" else 1.0  # high entropy first
    heap: list[tuple[float, str, str, float]] = []  # (-key, image_id, uri, score): a max-heap
    candidates = missing = 0
    for row in _rows(output, meta, [] if strategy == "random" else [column]):
        candidates += 1
        if strategy == "random":
            score = _hash_rank(seed, row["image_id"])
        else:
            score = row[column]
            if score is None:
                missing += 1
                continue
        item = (-sign * score, row["image_id"], row["uri"], score)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    if missing and not heap:
        raise UsageError(f"{output}: its rows have no {column} column (schema version 1); use "
                         "--strategy least-confident, or relabel with --overwrite")
    ordered = sorted(heap, key=lambda t: (-t[0], t[1]))
    return [Picked(image_id, uri, float(score)) for _, image_id, uri, score in ordered], candidates


def _class_balanced(output: str, meta: OutputMetadata, limit: int) -> tuple[list[Picked], int]:
    """Per class, the `limit` least confident images where the model predicts it; then
    round-robin over classes, rarest (fewest images) first, skipping repeats."""
    c = meta.num_classes
    heaps: list[list[tuple[float, str, str]]] = [[] for _ in range(c)]
    images_with = [0] * c
    candidates = 0
    for row in _rows(output, meta, ["confidence", "class_fraction"]):
        candidates += 1
        confidence = row["confidence"]
        for k, share in enumerate(row["class_fraction"] or ()):
            if k >= c or not share:
                continue
            images_with[k] += 1
            item = (-confidence, row["image_id"], row["uri"])
            if len(heaps[k]) < limit:
                heapq.heappush(heaps[k], item)
            elif item > heaps[k][0]:
                heapq.heapreplace(heaps[k], item)
    lists = [sorted(h, key=lambda t: (-t[0], t[1])) for h in heaps]
    order = sorted((k for k in range(c) if lists[k]), key=lambda k: (images_with[k], k))
    picked: list[Picked] = []
    seen: set[str] = set()
    position = [0] * c
    while len(picked) < limit and any(position[k] < len(lists[k]) for k in order):
        for k in order:
            while position[k] < len(lists[k]) and lists[k][position[k]][1] in seen:
                position[k] += 1
            if position[k] < len(lists[k]) and len(picked) < limit:
                neg_conf, image_id, uri = lists[k][position[k]]
                seen.add(image_id)
                picked.append(Picked(image_id, uri, -neg_conf))
                position[k] += 1
    return picked, candidates


# -- manifests --------------------------------------------------------------------------------
def write_ids(out: Path, picked: list[Picked]) -> None:
    """The manifest in the format its suffix names, written whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".txt":
        with atomic_write(out, "w", encoding="utf-8") as f:
            f.writelines(f"{p.image_id}\n" for p in picked)
    elif suffix == ".csv":
        with atomic_write(out, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", "uri", "score", "rank"])
            writer.writerows([p.image_id, p.uri, repr(p.score), i + 1] for i, p in enumerate(picked))
    else:
        import pyarrow.parquet as pq

        table = pa.table({"image_id": [p.image_id for p in picked], "uri": [p.uri for p in picked],
                          "score": pa.array([p.score for p in picked], pa.float64()),
                          "rank": pa.array(range(1, len(picked) + 1), pa.int32())})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        with atomic_write(out) as f:
            f.write(buf.getvalue())


def read_ids(path: Path) -> list[str]:
    """Image ids of a manifest: .txt (one a line; blank lines and ``#`` comments skipped),
    or .csv / .parquet with an ``image_id`` column. Order kept, repeats dropped."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UsageError(f"--ids {path}: no such file; write one with `drn-label select`")
    if suffix == ".txt":
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        ids = [i for i in ids if i and not i.startswith("#")]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "image_id" not in (reader.fieldnames or ()):
                raise UsageError(f"--ids {path}: no image_id column (it has {reader.fieldnames})")
            ids = [row["image_id"] for row in reader]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            ids = pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
        except (KeyError, pa.ArrowInvalid) as exc:
            raise UsageError(f"--ids {path}: no readable image_id column ({exc})") from None
    else:
        raise UsageError(f"--ids {path}: expected a {', '.join(MANIFEST_SUFFIXES)} manifest")
    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids:
        raise UsageError(f"--ids {path}: holds no image ids")
    return ids
