"""What OUTPUT already holds for a model identity, and rewriting it file by file.

Resume reads the committed ``(image_id, status)`` of one identity; ``--overwrite`` drops
that identity's rows; after ``--retry-errors`` one row per image and identity stays.
Every rewrite is atomic per file.
"""
from __future__ import annotations

from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import UnreadableData
from pipeline.store.fs import PART_RE, resolve, write_table_atomic
from pipeline.store.output import DATA_DIR, RUNS_DIR, SCHEMA, STATE_DIR, OutputMetadata, data_files
from pipeline.store.reader import identity_filter, identity_mask, open_dataset


# -- what is already done -----------------------------------------------------------------
def existing_rows(output: str, meta: OutputMetadata,
                  columns: tuple[str, ...] = ("image_id", "status", "run_id")) -> pa.Table:
    """`columns` of the committed rows with this model identity."""
    dataset = open_dataset(output)
    if dataset is None:
        return pa.table({c: pa.array([], SCHEMA.field(c).type) for c in columns})
    try:
        return dataset.to_table(columns=list(columns), filter=identity_filter(meta))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnreadableData(f"OUTPUT {output}: a data file cannot be read "
                             f"({' '.join(str(exc).split())[:300]}); move it out of OUTPUT/data "
                             "(rerunning relabels its images)") from None


def shard_of(image_ids: list[str], shards: int) -> list[int]:
    """The hash partition (0 .. shards-1) of each image id: stable across processes and
    runs (crc32, not Python's salted hash), so a shard's done set and its rows agree."""
    import zlib

    if shards == 1:
        return [0] * len(image_ids)
    return [zlib.crc32(i.encode("utf-8", "surrogatepass")) % shards for i in image_ids]


def done_pieces(output: str, files: list[str], meta: OutputMetadata, shards: int) -> list[pa.Table]:
    """`image_id` and `status` of this identity's rows in `files` (full paths of OUTPUT's data
    files), split into `shards` hash partitions: one piece of the done set, read where it is
    needed instead of in the driver."""
    import pyarrow.dataset as ds

    empty = pa.table({"image_id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    if not files:
        return [empty] * shards
    fs, _ = resolve(output)
    table = ds.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA).to_table(
        columns=["image_id", "status"], filter=identity_filter(meta))
    if shards == 1:
        return [table]
    parts = pa.array(shard_of(table.column("image_id").to_pylist(), shards), pa.int32())
    return [table.filter(pc.equal(parts, k)) for k in range(shards)]


def has_duplicates(image_ids: pa.ChunkedArray) -> bool:
    return len(image_ids) > 0 and len(pc.unique(image_ids)) < len(image_ids)


def remove_identity_rows(output: str, meta: OutputMetadata) -> int:
    """--overwrite: drop every committed row of this model identity (file by file, atomically)."""
    return _rewrite_files(output, lambda t: pc.invert(identity_mask(t, meta)))


def drop_replaced_rows(output: str, meta: OutputMetadata) -> int:
    """Keep one row per image of this model identity: an ok row over an error row, else
    the newest row, else (rows of one run, labelled in the same instant: an output written
    before duplicate input rows were dropped) the first in OUTPUT's order (data file
    name, then row), so the choice is the same whoever reconciles and however often.
    --retry-errors writes the new row beside the old error row and removes the old one
    here; a run killed before this step leaves both, and the next run finishes the job
    (`_run_leased` calls this whenever it finds duplicates)."""
    rows = existing_rows(output, meta, ("image_id", "status", "run_id", "labelled_at"))
    counts = pc.value_counts(rows["image_id"])
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return 0
    best: dict[str, tuple] = {}
    for row in rows.filter(pc.is_in(rows["image_id"], repeated)).to_pylist():
        rank = (row["status"] == "ok", row["labelled_at"], row["run_id"])
        if row["image_id"] not in best or rank > best[row["image_id"]]:
            best[row["image_id"]] = rank

    kept: set[str] = set()  # ids whose row is kept, over the files in order

    def keep(t: pa.Table):
        candidates = pc.and_(identity_mask(t, meta), pc.is_in(t["image_id"], repeated)).to_pylist()
        mask = [True] * t.num_rows
        picked = t.select(["image_id", "status", "run_id", "labelled_at"]).to_pylist()
        for i, candidate in enumerate(candidates):
            if candidate:
                row = picked[i]
                best_row = (row["status"] == "ok", row["labelled_at"], row["run_id"]) == best[row["image_id"]]
                mask[i] = best_row and row["image_id"] not in kept
                if mask[i]:
                    kept.add(row["image_id"])
        return pa.array(mask)

    return _rewrite_files(output, keep)


def _rewrite_files(output: str, keep: Callable[[pa.Table], pa.Array]) -> int:
    """Rewrite OUTPUT's data files (in `data_files`' sorted order) keeping the rows `keep` marks."""
    import pyarrow.parquet as pq

    fs, root = resolve(output)
    dropped = 0
    for path in data_files(output):
        table = pq.read_table(path, filesystem=fs)
        mask = keep(table)
        kept = table.filter(mask)
        if kept.num_rows == table.num_rows:
            continue
        dropped += table.num_rows - kept.num_rows
        name = path[len(root):].lstrip("/")
        if kept.num_rows == 0:
            fs.delete_file(path)
        else:
            write_table_atomic(output, name, kept.replace_schema_metadata(table.schema.metadata))
    return dropped


def clean_tmp(output: str) -> int:
    """Remove the partial files that writers killed mid-write left (hidden ``.part`` names
    only the project uses, beside OUTPUT's data files and side files). Runs under the
    lease, so no live writer of OUTPUT can own one. Returns how many were removed."""
    fs, root = resolve(output)
    removed = 0
    for folder in (root, f"{root}/{DATA_DIR}", f"{root}/{STATE_DIR}", f"{root}/{RUNS_DIR}"):
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.type == pafs.FileType.File and PART_RE.match(info.base_name):
                fs.delete_file(info.path)
                removed += 1
    return removed
