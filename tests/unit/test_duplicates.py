"""Exactly once means once: an image id that the input holds twice gets one row, the first
row's, and reconciliation keeps one row of an id that an older OUTPUT holds twice, the same
one whoever reconciles. The shard writer is the actor body itself, without Ray; OUTPUT's
files are real Parquet."""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.commit import DONE, DUPLICATE, LABEL, ShardWriter
from pipeline.store.fs import write_table_atomic
from pipeline.store.idset import digests
from pipeline.store.lease import acquire_lease
from pipeline.store.output import SCHEMA, OutputMetadata, data_files, schema_with_metadata
from pipeline.store.reconcile import drop_replaced_rows

META = OutputMetadata(model="drn_d_22", weights=None, weights_sha256="0" * 64, num_classes=3,
                      classes=("a", "b", "c"), palette=((0, 0, 0),) * 3, mean=(0.5,) * 3,
                      std=(0.2,) * 3, ignore_index=255, schema_version=2)
AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


def rows(pairs: list[tuple[str, str]], run_id: str = "r1") -> pa.Table:
    """(image_id, uri) rows of one run, labelled in the same instant."""
    return pa.Table.from_pylist(
        [{"image_id": i, "uri": u, "status": "ok", "model": META.model, "weights_sha256": META.weights_sha256,
          "run_id": run_id, "labelled_at": AT} for i, u in pairs], schema=schema_with_metadata(META))


def test_the_first_row_of_an_id_wins_within_a_block_and_at_the_writer(tmp_path):
    output = str(tmp_path / "out")
    write_table_atomic(output, "data/part-r0-0.parquet", rows([("old", "/in/old")], run_id="r0"))
    lease = acquire_lease(output, "r1")
    writer = ShardWriter(output=output, run_id="r1", generation=lease.generation, shard=0, schema=SCHEMA,
                         rows_per_file=100, commit_interval_s=3600,
                         done_refs=[], skip_status=("ok", "error"))
    writer.skip.add(digests(["old"]))  # what the done set holds (read by Ray tasks in a run)
    assert writer.to_label(["a", "b", "a", "old", "c", "a", "old"]) == [
        LABEL, LABEL, DUPLICATE, DONE, LABEL, DUPLICATE, DONE]
    # Two rows of one id in one table (never sent together by the skip stage, but a
    # writer must not commit both): the first in the table's order is kept.
    assert writer.add(rows([("x", "/in/x-first"), ("y", "/in/y"), ("x", "/in/x-second")])) == 2
    assert writer.add(rows([("x", "/in/x-later"), ("z", "/in/z")])) == 1  # a row further apart
    done = writer.finish()
    assert done.repeated == 2 + 2  # two dropped at the skip stage, two at the writer
    (mine,) = [f for f in data_files(output) if "part-r1-" in f]
    kept = pq.read_table(mine).to_pylist()
    assert {r["image_id"]: r["uri"] for r in kept} == {"x": "/in/x-first", "y": "/in/y", "z": "/in/z"}


def test_reconciliation_keeps_the_first_of_identical_rows_deterministically(tmp_path):
    """An output written before duplicates were dropped: two rows of `a` in one file and
    a third in another, all of one run and one instant; a rerun's reconciliation used to
    keep all of them (the same rank). It keeps the first by file name and row, and a
    second reconciliation changes nothing."""
    output = str(tmp_path / "out")
    write_table_atomic(output, "data/part-r1-aaa.parquet",
                       rows([("a", "/in/a-1"), ("b", "/in/b"), ("a", "/in/a-2")]))
    write_table_atomic(output, "data/part-r1-bbb.parquet", rows([("a", "/in/a-3"), ("c", "/in/c")]))
    assert drop_replaced_rows(output, META) == 2
    table = pa.concat_tables(pq.read_table(f) for f in data_files(output))
    assert sorted(zip(table["image_id"].to_pylist(), table["uri"].to_pylist())) == [
        ("a", "/in/a-1"), ("b", "/in/b"), ("c", "/in/c")]
    assert drop_replaced_rows(output, META) == 0
