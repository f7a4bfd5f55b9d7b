"""The write stage: labelled rows go to the shard writers that commit them.

Ray Data's write tasks run on the workers, in parallel; each hands its rows to the
writers of their image ids' shards (pipeline.job.commit) and returns at once, so a write
task never waits for a file to fill up. The writers commit each file atomically
(`pipeline.store.fs.write_table_atomic`: a hidden part file renamed into place locally,
one PUT on S3) under a name that is a digest of its image ids, at least every
`COMMIT_INTERVAL_S` seconds or every `rows_per_file` rows, and only while the run holds
OUTPUT's lease: a run that lost it (stalled past the lease's expiry while another run
took over) commits nothing more.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from pipeline.job.commit import commit_rows


class LabelDatasink(Datasink):
    """Ray Data sink over the run's shard writers (see the module doc)."""

    def __init__(self, writers: list, schema: pa.Schema) -> None:
        self.writers, self.schema = writers, schema
        self.rows = 0

    def get_name(self) -> str:
        return "WriteLabels"

    def write(self, blocks: Iterable, ctx) -> int:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return 0
        return commit_rows(pa.concat_tables(tables).cast(self.schema), self.writers)

    def on_write_complete(self, write_result) -> None:
        self.rows = sum(r for r in write_result.write_returns if r)
