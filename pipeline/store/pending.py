"""Bounded look-ups that let a run see, without Ray, that it has nothing to do.

A job streams its input through Ray Data so that the driver never holds the input list
(pipeline.job.plan). Before it starts Ray, `pipeline.job.precheck` asks these functions
two cheap questions, each answered only while the answer fits in `limit` rows and
otherwise given up (None), so the driver's memory stays bounded whatever INPUT is:

- `listed_ids(plan, limit)`: the image ids a local INPUT lists (a folder, a glob, a
  manifest), chunk by chunk, with the same ids the job's listing gives them;
- `done_ids(output, meta, statuses, limit)`: the image ids OUTPUT holds for one model
  identity (the rows the job's skip stage would skip).
"""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.store.output import SCHEMA, OutputMetadata, data_files
from pipeline.store.sources import InputPlan, list_unit, list_units

LIMIT = 1_000_000
"""Rows a look-up may hold: about 100 MB of ids at most; beyond it the job streams as usual."""
CHUNK = 4096
"""Rows per listed block: the first images answer "is there any input?" at once."""


class TooMany(Exception):
    """The look-up would hold more than its limit."""


def listed_ids(plan: InputPlan, limit: int = LIMIT) -> Iterator[pa.Array] | None:
    """The image ids INPUT lists, in chunks, as the job's listing names them; None when the
    plan cannot be listed here cheaply (object stores, URL and WebDataset inputs, embedded
    bytes). The iterator raises `TooMany` once more than `limit` ids were listed."""
    if plan.scheme != "local" or plan.kind not in ("image", "directory", "glob", "txt", "csv", "parquet"):
        return None
    return _bounded(_chunks(plan, limit), limit)


def _bounded(chunks: Iterator[pa.Array], limit: int) -> Iterator[pa.Array]:
    seen = 0
    for ids in chunks:
        seen += len(ids)
        if seen > limit:
            raise TooMany(f"more than {limit} inputs")
        yield ids


def _chunks(plan: InputPlan, limit: int) -> Iterator[pa.Array]:
    """The ids the job's own listing gives (pipeline.store.sources: its units, block by
    block); a Parquet manifest's footer says at once when it holds too many rows."""
    if plan.kind == "parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(plan.path).metadata.num_rows > limit:  # read nothing more
            raise TooMany(f"more than {limit} rows in {plan.input}")
    for unit in list_units(plan):
        for block in list_unit(plan, unit, block_rows=CHUNK):
            yield block.column("image_id").combine_chunks()


def done_ids(output: str, meta: OutputMetadata, statuses: tuple[str, ...],
             limit: int = LIMIT) -> pa.Array | None:
    """The image ids of OUTPUT's rows of identity `meta` whose status is in `statuses`,
    as a set (an Arrow array of unique ids); None when OUTPUT holds more than `limit` rows
    (of any identity, counted from the files' footers) or when an image has two rows of
    this identity (a run that must reconcile them, which the job does)."""
    import pyarrow.dataset as ds

    from pipeline.store.fs import resolve
    from pipeline.store.reconcile import done_pieces, has_duplicates

    files = data_files(output)
    if not files:
        return pa.array([], pa.string())
    fs, _ = resolve(output)
    if ds.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA).count_rows() > limit:
        return None
    (rows,) = done_pieces(output, files, meta, 1)
    if has_duplicates(rows.column("image_id")):
        return None
    keep = pc.is_in(rows.column("status"), value_set=pa.array(statuses, pa.string()))
    return rows.column("image_id").filter(keep).combine_chunks()
