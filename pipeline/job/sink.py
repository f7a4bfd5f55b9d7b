"""The Parquet sink: workers write in parallel, each file committed atomically.

- A write task's rows go into one file named ``part-<run_id>-<digest>.parquet``, where the
  digest is taken over the rows' image ids: a retried task rewrites the same name with the
  same rows, so a retry can never add a second copy.
- Local files are written under ``_tmp/`` and renamed into place (atomic on POSIX); on S3
  an object becomes visible only when its upload completes, so it is written in place.
- Every non-data name starts with ``_``, so readers skip it.
- A write task commits only while its run still holds OUTPUT's lease: a run that lost
  it (stalled past the lease's expiry while another run took over) stops instead of
  labelling the same images a second time.
"""
from __future__ import annotations

import hashlib
import os
import json
import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.output import LEASE_FILE
from pipeline.sources import resolve

TMP_DIR = "_tmp"


class LeaseLost(RuntimeError):
    """Another run holds OUTPUT's lease: this run must not commit more rows."""


def lease_holder(output: str) -> str | None:
    """The run_id named by OUTPUT's lease (None when there is no readable lease)."""
    raw = read_bytes_or_none(output, LEASE_FILE)
    try:
        return json.loads(raw).get("run_id") if raw else None
    except ValueError:
        return None


def check_lease(output: str, run_id: str) -> None:
    holder = lease_holder(output)
    if holder is not None and holder != run_id:
        raise LeaseLost(f"run {run_id} lost the lease on OUTPUT {output} to run {holder} "
                        f"(e.g. its heartbeat stopped for longer than the lease lasts); it "
                        f"stopped committing rows so that no image is labelled twice")


def is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def write_table_atomic(output: str, name: str, table: pa.Table) -> str:
    """Write ``table`` as OUTPUT/name so that readers see all of it or nothing."""
    fs, root = resolve(output)
    final = f"{root}/{name}"
    if is_local(fs):
        tmp_dir = f"{root}/{TMP_DIR}"
        fs.create_dir(tmp_dir, recursive=True)
        tmp = f"{tmp_dir}/{name}.{uuid.uuid4().hex}"
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")
        fs.move(tmp, final)
    else:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        put_object(fs, final, buf.getvalue().to_pybytes())
    return final


def put_object(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One PutObject: the object appears whole or not at all.

    pyarrow's S3 output stream always goes through a multipart upload, whose completion
    some S3-compatible servers reject; a Parquet file or side file is written once, whole,
    so a single PUT (up to 5 GiB) is both simpler and atomic. boto3 reads the endpoint
    (AWS_ENDPOINT_URL_S3), region and credentials from the environment as pyarrow does.
    """
    if fs.type_name != "s3":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    import boto3

    bucket, _, key = path.partition("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    boto3.client("s3", region_name=region, endpoint_url=endpoint).put_object(
        Bucket=bucket, Key=key, Body=data)


def write_bytes_atomic(output: str, name: str, data: bytes) -> None:
    """Small side files (_progress.json, _runs/*.json, _lease.json), atomically replaced."""
    fs, root = resolve(output)
    final = f"{root}/{name}"
    parent = final.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_local(fs):
        tmp = f"{final}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, final)
    else:
        put_object(fs, final, data)


def read_bytes_or_none(output: str, name: str) -> bytes | None:
    fs, root = resolve(output)
    try:
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def file_name(run_id: str, image_ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]
    return f"part-{run_id}-{digest}.parquet"


def make_datasink(output: str, *, run_id: str, schema: pa.Schema, rows_per_file: int,
                  progress_actor: str | None = None):
    """Build the Ray Data sink (Ray is imported only here)."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class LabelDatasink(Datasink):
        def __init__(self) -> None:
            self.output, self.run_id, self.schema = output, run_id, schema
            self.rows_per_file, self.progress_actor = rows_per_file, progress_actor
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
            name = file_name(self.run_id, table.column("image_id").to_pylist())
            check_lease(self.output, self.run_id)
            write_table_atomic(self.output, name, table)
            errors = sum(1 for s in table.column("status").to_pylist() if s != "ok")
            stats = {"file": name, "rows": table.num_rows, "ok": table.num_rows - errors,
                     "errors": errors}
            _report_committed(self.progress_actor, stats)
            return stats

        def on_write_complete(self, write_result) -> None:
            self.files = [r for r in write_result.write_returns if r and r.get("file")]

    return LabelDatasink()


def _report_committed(actor_name: str | None, stats: dict) -> None:
    from pipeline.progress import counter

    handle = counter(actor_name)
    if handle is None:
        return
    try:
        handle.add_committed.remote(stats["ok"], stats["errors"])
    except Exception:  # noqa: BLE001 - progress must never fail a write
        pass
