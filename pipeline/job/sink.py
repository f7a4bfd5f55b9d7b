"""The Parquet sink: workers write in parallel, each file committed atomically.

- A write task's rows go into one file named ``data/part-<run_id>-<digest>.parquet``, where the
  digest is taken over the rows' image ids: a retried task rewrites the same name with the
  same rows, so a retry can never add a second copy.
- Files are committed with `pipeline.store.fs.write_table_atomic` (local: a hidden part
  file renamed into place; S3: one PUT), so a reader never sees half a file.
- ``data/`` holds data files only; side files live in ``_state/`` (see pipeline.store.output).
- A write task commits only while its run still holds OUTPUT's lease: a run that lost
  it (stalled past the lease's expiry while another run took over) stops instead of
  labelling the same images a second time.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipeline.store.fs import write_table_atomic
from pipeline.store.lease import check_lease
from pipeline.store.output import data_file_name


class LabelDatasink(Datasink):
    """Ray Data sink: each write task commits one file (see the module doc)."""

    def __init__(self, output: str, *, run_id: str, schema: pa.Schema, rows_per_file: int,
                 progress=None) -> None:
        self.output, self.run_id, self.schema = output, run_id, schema
        self.rows_per_file, self.progress = rows_per_file, progress
        self.files: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WriteLabels"

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"file": None, "rows": 0, "ok": 0, "errors": 0}
        table = pa.concat_tables(tables).cast(self.schema)
        table = table.sort_by("image_id")
        name = data_file_name(self.run_id, table.column("image_id").to_pylist())
        check_lease(self.output, self.run_id)
        write_table_atomic(self.output, name, table)
        errors = sum(1 for s in table.column("status").to_pylist() if s != "ok")
        stats = {"file": name, "rows": table.num_rows, "ok": table.num_rows - errors,
                 "errors": errors}
        if self.progress is not None:
            try:
                self.progress.add_committed.remote(stats["ok"], stats["errors"])
            except Exception:  # noqa: BLE001 - progress must never fail a write
                pass
        return stats

    def on_write_complete(self, write_result) -> None:
        self.files = [r for r in write_result.write_returns if r and r.get("file")]
