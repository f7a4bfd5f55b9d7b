"""Storage that fails: a shard writer keeps its rows until their file is written, retries
a full disk with backoff for a bounded time, then fails saying so; a run probes OUTPUT's
folders at its start under names no other run uses.

The writer here is the actor body itself (`ShardWriter`, a plain object without Ray),
committing real Parquet files into a real filesystem that fills up (a small tmpfs,
`small_fs` in tests/conftest.py).
"""
from __future__ import annotations

import errno
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import StorageError
from pipeline.store.fs import with_storage_retries
from pipeline.store.lease import acquire_lease
from pipeline.store.output import SCHEMA, data_files


def rows(ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"image_id": i, "uri": f"/in/{i}", "status": "ok", "model": "drn_d_22",
                                  "weights_sha256": "0" * 64, "run_id": "r1"} for i in ids], schema=SCHEMA)


def writer(output: str, *, rows_per_file: int, retry_s: float):
    from pipeline.job.commit import ShardWriter

    lease = acquire_lease(output, "r1")
    return ShardWriter(output=output, run_id="r1", generation=lease.generation, shard=0,
                       schema=SCHEMA, rows_per_file=rows_per_file, commit_interval_s=3600,
                       done_refs=[], skip_status=("ok", "error"), storage_retry_s=retry_s)


def committed_ids(output: str) -> list[str]:
    return sorted(i for f in data_files(output) for i in pq.read_table(f).column("image_id").to_pylist())


def test_a_full_disk_that_is_freed_loses_no_row(small_fs):
    output = str(small_fs.root / "out")
    w = writer(output, rows_per_file=4, retry_s=60)
    assert w.add(rows(["a", "b", "c", "d"])) == 4  # one file, before the disk fills
    small_fs.fill()
    freed = threading.Timer(1.5, small_fs.free)
    freed.start()
    t0 = time.monotonic()
    assert w.add(rows(["e", "f", "g", "h"])) == 4  # waits, retrying, until space is back
    waited = time.monotonic() - t0
    freed.join()
    assert waited >= 1.0
    w.add(rows(["i"]))
    done = w.finish()
    assert committed_ids(output) == list("abcdefghi")
    assert (done.accepted, done.uncommitted, done.failed) == (9, 0, None)
    assert not list((small_fs.root / "out" / "data").glob(".*.part"))  # no half-written file


def test_a_disk_that_stays_full_fails_after_the_retries_and_keeps_the_rows(small_fs):
    output = str(small_fs.root / "out")
    w = writer(output, rows_per_file=2, retry_s=1.0)
    w.add(rows(["a", "b"]))
    small_fs.fill()
    with pytest.raises(StorageError) as caught:
        w.add(rows(["c", "d"]))
    message = str(caught.value)
    assert message.startswith(f"OUTPUT {output}: cannot write data/part-r1-")
    assert "No space left on device" in message and "still failing after 1 s of retries" in message
    assert "\n" not in message
    with pytest.raises(StorageError):  # every later hand-over fails the same way
        w.add(rows(["e"]))
    assert w.buffered == 2  # kept, never dropped
    done = w.finish()
    assert (done.accepted, done.uncommitted) == (4, 2) and done.failed == message
    small_fs.free()
    assert committed_ids(output) == ["a", "b"]  # what was committed is whole


def test_retries_are_for_what_waiting_can_cure():
    calls = []

    def read_only():
        calls.append(1)
        raise OSError(errno.EROFS, "Read-only file system", "/x/data/f")

    with pytest.raises(StorageError, match=r"^w: Read-only file system: /x/data/f$"):
        with_storage_retries(read_only, what="w", budget_s=30, sleep=lambda s: None)
    assert len(calls) == 1  # at once: waiting does not make a filesystem writable

    flaky = iter([OSError(errno.EIO, "Input/output error"), OSError(errno.ENOSPC, "No space left on device")])
    naps: list[float] = []

    def twice_then_ok():
        err = next(flaky, None)
        if err:
            raise err
        return "written"

    assert with_storage_retries(twice_then_ok, what="w", budget_s=30, sleep=naps.append) == "written"
    assert naps == [0.5, 1.0]  # backoff
    with pytest.raises(KeyError):  # not a storage error: passes straight through
        with_storage_retries(lambda: {}["x"], what="w", budget_s=30)


def test_an_object_store_that_throttles_is_waited_for_one_that_refuses_is_not():
    """S3 answers as boto3 raises it (a PUT of a data file): throttling and 5xx are retried,
    a refusal is not."""
    from botocore.exceptions import ClientError

    from pipeline.store.fs import is_transient

    def answer(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert is_transient(answer("SlowDown", 503)) and is_transient(answer("InternalError", 500))
    assert not is_transient(answer("AccessDenied", 403)) and not is_transient(answer("NoSuchBucket", 404))
    replies = iter([answer("SlowDown", 503)])

    def put():
        reply = next(replies, None)
        if reply:
            raise reply
        return "etag"

    assert with_storage_retries(put, what="w", budget_s=30, sleep=lambda s: None) == "etag"
    with pytest.raises(StorageError, match="^OUTPUT s3://b/o: cannot write data/x: .*AccessDenied"):
        with_storage_retries(lambda: (_ for _ in ()).throw(answer("AccessDenied", 403)),
                             what="OUTPUT s3://b/o: cannot write data/x", budget_s=30)


_BARRIER = None


def _meet_at(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _probe_from_a_process(args: tuple[str, int]) -> list[str]:
    """One "run": wait until every process is ready, then probe OUTPUT `times` times."""
    from pipeline.job.run import check_output

    output, times = args
    _BARRIER.wait(timeout=120)
    failures = []
    for _ in range(times):
        try:
            check_output(output)
        except Exception as exc:  # noqa: BLE001 - returned and asserted by the test
            failures.append(str(exc))
    return failures


def _probe_together(output: str, times: int) -> list[str]:
    """8 processes probing at the same instant. Spawned, not forked: the test process holds
    Ray's and the test servers' threads, and a fork taken while one of them holds a lock
    hangs the child."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    with ctx.Pool(8, initializer=_meet_at, initargs=(barrier,)) as pool:
        parts = pool.map(_probe_from_a_process, [(output, times)] * 8, chunksize=1)
    return [f for part in parts for f in part]


def test_runs_probing_output_at_the_same_instant_never_trip_on_each_other(tmp_path):
    """Runs starting together used to delete each other's `_write_check` (`Cannot delete
    file`, exit 1 instead of 4: 2 of 800 probes from 8 processes failed so). Every probe now
    writes a name of its own: 8 processes x 40 probes of a new OUTPUT (probed at its root)
    and 8 x 20 of one with its folders, none fails, none is left behind."""
    output = str(tmp_path / "out")
    assert _probe_together(output, 40) == []
    assert list((tmp_path / "out").iterdir()) == []  # no probe left behind, no folder made
    (tmp_path / "out" / "data").mkdir()  # once the folders exist, they are what is probed
    (tmp_path / "out" / "_state").mkdir()
    assert _probe_together(output, 20) == []
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_a_probe_left_by_a_kill_is_cleaned_like_a_part_file():
    import uuid

    from pipeline.store.fs import PART_RE, PROBE_NAME

    assert PART_RE.match(PROBE_NAME.format(uuid.uuid4().hex))  # reconcile.clean_tmp removes it
