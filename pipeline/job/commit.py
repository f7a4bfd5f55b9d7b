"""Shard writers: the done set and the commits of one hash partition of image ids each.

Image ids are hashed into `shards` partitions (`pipeline.store.reconcile.shard_of`). The
writer of a shard is a Ray actor that

- holds the shard's done set (this identity's committed ids, read by Ray tasks from
  OUTPUT's files and handed over as object references, never through the driver) as an
  `IdSet` of 128-bit digests, sorted and spilled to a mapped file (16 bytes an id, paged
  by the kernel, instead of ~100 bytes a Python string), and answers the skip stage's
  "which of these are still to label?";
- buffers the shard's labelled rows and commits them as one Parquet file whenever
  `rows_per_file` rows are waiting or the oldest has waited `commit_interval_s`, so
  commits keep pace with labelling at any N and whatever else competes for the CPUs;
- drops a row whose image id this run already has, so each image is committed once: the
  skip stage drops an id's later rows within one block of the input (its first row wins;
  they are never decoded), and the writer drops a row whose id it already buffered or
  committed (the same id further apart in the input, a retried write task: the row that
  reaches the writer first wins), and the rows of one table after an id's first;
- checks OUTPUT's lease (run id and generation) before every commit: a run that lost it
  commits nothing more;
- keeps its rows until their file is written: a storage error (a full disk, an I/O error,
  a failing object store) is retried with backoff for a bounded time
  (`pipeline.store.fs.with_storage_retries`), the rows staying in the buffer, and new rows
  wait meanwhile (so memory stays bounded); past the budget the writer fails and every
  later hand-over raises the `StorageError`, which fails the run with one line.

The uncommitted rows of a run are therefore at most one file's worth per shard plus the
batches in flight, and `finish` says how many rows the writer accepted and committed, so
the run can never report success with rows missing.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import JobError, StorageError
from pipeline.store.fs import storage_retry_s, with_storage_retries, write_table_atomic
from pipeline.store.idset import IdSet, digests
from pipeline.store.lease import LeaseLost, check_lease
from pipeline.store.output import data_file_name
from pipeline.store.reconcile import shard_of

COMMIT_INTERVAL_S = 15.0
"""A shard commits its buffered rows at the latest this long after the oldest arrived."""
LABEL, DONE, DUPLICATE = 0, 1, 2
"""What the skip stage does with an input row: label it, skip it (OUTPUT has it), drop it
(an earlier row of the same block has its image id)."""


def _wraps(exc: BaseException | None, classes: tuple[type, ...]) -> bool:
    """Whether `exc` is, or wraps (Ray's task errors, chained causes), one of `classes`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, classes):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return False


class _WriterFailures(logging.Filter):
    """Ray Data logs a failed write task's traceback (and calls it an internal error) before
    it raises the error; a writer's lost lease or storage failure is reported by the run as
    one line, so it is not logged too. Ray Data logs from inside its `except` block, so the
    exception is the record's, or the one being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not _wraps(exc, (LeaseLost, StorageError))


# Once, at import (as the planning stages' warning filter): the loggers that report it.
for _name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
    logging.getLogger(_name).addFilter(_WriterFailures())


@dataclass(frozen=True)
class CommittedFile:
    """One data file a shard writer committed."""

    file: str
    rows: int
    ok: int
    errors: int


@dataclass(frozen=True)
class ShardResult:
    """What one shard writer did in a run."""

    files: tuple[CommittedFile, ...]
    repeated: int  # rows dropped because this run already had their image id
    lost: str | None  # why the lease was lost, if it was
    existing: int  # this identity's rows found in OUTPUT at the start
    existing_duplicates: int  # of which repeat an image id (an earlier run was interrupted)
    failed: str | None = None  # a storage error that outlasted its retries
    accepted: int = 0  # rows new to this run that were handed over
    uncommitted: int = 0  # of which no file holds (a lost lease, a storage failure)


class ShardWriter:
    """The actor body (see the module doc). Methods are called from several threads."""

    def __init__(self, *, output: str, run_id: str, generation: int | None, shard: int,
                 schema: pa.Schema, rows_per_file: int, commit_interval_s: float,
                 done_refs: list, skip_status: tuple[str, ...], counter=None,
                 storage_retry_s: float | None = None) -> None:
        import ray

        self.output, self.run_id, self.generation, self.shard = output, run_id, generation, shard
        self.schema, self.rows_per_file = schema, rows_per_file
        self.commit_interval_s, self.counter = commit_interval_s, counter
        self.storage_retry_s = storage_retry_s
        # The sets' files live on this node's temp disk, removed when the writer finishes.
        self.ids_dir = os.path.join(tempfile.gettempdir(), "drn-label-ids", f"{run_id}-{shard}")
        done_parts, skip_parts, existing = [], [], 0
        for ref in done_refs or []:
            keys, skip = ray.get(ref)
            existing += len(keys)
            done_parts.append(keys)
            if skip is not None:
                skip_parts.append(skip)
        done = IdSet(self.ids_dir)
        repeats = done.add_sorted(done_parts)
        del done_parts
        if _skips_all(skip_status):
            self.skip = done
        else:  # --retry-errors: the ids of error rows are labelled again
            done.close()
            self.skip = IdSet(self.ids_dir)
            self.skip.add_sorted(skip_parts)
        del skip_parts
        self.existing, self.existing_duplicates = existing, repeats
        self.seen = IdSet(self.ids_dir)  # buffered or committed by this run
        self.repeated = 0  # rows dropped because this run already had their image id
        self.duplicates = 0  # input rows the skip stage dropped (an earlier row has the id)
        self._count_lock = threading.Lock()  # never held while committing
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.first_t: float | None = None
        self.files: list[CommittedFile] = []
        self.accepted = 0  # rows new to this run that were handed over
        self.lost: str | None = None
        self.failed: str | None = None  # a storage error that outlasted its retries
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._timer, name="drn-label-commit", daemon=True).start()

    # -- the skip stage ----------------------------------------------------------------------
    def to_label(self, image_ids: list[str]) -> list[int]:
        """LABEL, DONE or DUPLICATE for each id of one block (in the input's order): an id's
        first row is labelled unless OUTPUT has it; its later rows are duplicates."""
        answer, first = [], set()
        keys = digests(image_ids)
        for image_id, done in zip(image_ids, self.skip.contains(keys).tolist()):
            if done:
                answer.append(DONE)
            elif image_id in first:
                answer.append(DUPLICATE)
            else:
                first.add(image_id)
                answer.append(LABEL)
        duplicates = answer.count(DUPLICATE)
        if duplicates:
            with self._count_lock:
                self.duplicates += duplicates
        return answer

    # -- the write stage ---------------------------------------------------------------------
    def add(self, table: pa.Table) -> int:
        """Buffer labelled rows (committing when a file's worth is waiting); returns how
        many were new to this run."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            if self.failed:
                raise StorageError(self.failed)
            ids = table.column("image_id").to_pylist()
            keys = digests(ids)
            new, first = [], set()
            for k, had in enumerate(self.seen.contains(keys).tolist()):
                if not had and ids[k] not in first:  # an id's first row wins, in table order
                    first.add(ids[k])
                    new.append(k)
            self.seen.add(keys[new])
            self.repeated += len(ids) - len(new)
            if len(new) < len(ids):
                table = table.take(pa.array(new, pa.int64()))
            if table.num_rows:
                self.buffer.append(table)
                self.buffered += table.num_rows
                self.accepted += table.num_rows
                self.first_t = self.first_t or time.time()
            if self.buffered >= self.rows_per_file:
                self._commit()
            return table.num_rows

    def _timer(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                if self.buffered and not (self.lost or self.failed) and \
                        time.time() - (self.first_t or 0) >= self.commit_interval_s:
                    try:
                        self._commit()
                    except (LeaseLost, StorageError):
                        pass  # recorded in self.lost / self.failed; the run reports it

    def _commit(self) -> None:
        """Commit the buffer as one file (the caller holds the lock). The rows leave the
        buffer only once the file is written; the lease is checked before every attempt."""
        table = pa.concat_tables(self.buffer).cast(self.schema).sort_by("image_id")
        name = data_file_name(self.run_id, table.column("image_id").to_pylist())

        def attempt() -> None:
            check_lease(self.output, self.run_id, self.generation)
            write_table_atomic(self.output, name, table)

        try:
            with_storage_retries(attempt, what=f"OUTPUT {self.output}: cannot write {name}",
                                 budget_s=self.storage_retry_s)
        except LeaseLost as exc:
            self.lost = str(exc)
            raise
        except StorageError as exc:
            self.failed = str(exc)
            raise
        self.buffer, self.buffered, self.first_t = [], 0, None
        errors = sum(1 for s in table.column("status").to_pylist() if s != "ok")
        self.files.append(CommittedFile(file=name, rows=table.num_rows, ok=table.num_rows - errors,
                                        errors=errors))
        if self.counter is not None:
            try:
                self.counter.add_committed.remote(table.num_rows - errors, errors)
            except Exception:  # noqa: BLE001 - progress must never fail a commit
                pass

    def finish(self) -> ShardResult:
        """Commit what is left; what this shard did. ``uncommitted`` counts the rows it
        accepted and could not commit (a lost lease, a storage failure): never silently 0."""
        self._stop.set()
        with self._lock:
            if self.buffered and not (self.lost or self.failed):
                try:
                    self._commit()
                except (LeaseLost, StorageError):
                    pass
            committed = sum(f.rows for f in self.files)
            self.close_sets()
            return ShardResult(files=tuple(self.files), repeated=self.repeated + self.duplicates,
                               lost=self.lost, existing=self.existing,
                               existing_duplicates=self.existing_duplicates, failed=self.failed,
                               accepted=self.accepted, uncommitted=self.accepted - committed)


    def close_sets(self) -> None:
        """Remove the done set's and the seen set's files (the run is over for this shard)."""
        for ids in {id(self.skip): self.skip, id(self.seen): self.seen}.values():
            ids.close()
        shutil.rmtree(self.ids_dir, ignore_errors=True)


def _skips_all(skip_status) -> bool:
    return set(skip_status) >= {"ok", "error"}


def digest_piece(piece: pa.Table, skip_status) -> tuple[np.ndarray, np.ndarray | None]:
    """One piece of a shard's done set as sorted digests (`pipeline.store.idset`): every
    committed id, and (unless every status is skipped) the ids whose status is skipped."""
    ids = piece.column("image_id").to_pylist()
    keys = digests(ids)
    skip = None
    if not _skips_all(skip_status):
        wanted = np.isin(np.asarray(piece.column("status").to_pylist(), dtype=object),
                         list(skip_status))
        skip = np.sort(keys[wanted])
    return np.sort(keys), skip


def uncommitted_error(cause: str, committed_ok: int, committed_errors: int, committed_files: int,
                      uncommitted: int | None = None) -> JobError:
    """The one line a run ends with when labelled rows could not be committed: the cause
    (which names OUTPUT), what this run committed there, and what to do."""
    missing = f"{uncommitted} labelled rows were not committed; " if uncommitted else ""
    return JobError(f"{cause}; OUTPUT holds {committed_ok + committed_errors} rows of this run "
                    f"({committed_ok} ok, {committed_errors} errors) in {committed_files} file(s), "
                    f"each complete; {missing}rerun the same command once the storage works again "
                    "to label the rest")


def start_shard_writers(shards: int, **kwargs) -> list:
    """`shards` ShardWriter actors; `done_refs[k]` are the object references of shard k's
    pieces of the done set. They live on the driver's node: a worker node that dies takes
    its tasks with it (Ray retries them) but never a writer's buffered rows."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=16)(ShardWriter)
    done_refs = kwargs.pop("done_refs")
    kwargs.setdefault("storage_retry_s", storage_retry_s())  # the driver's setting, not the actor's
    here = driver_node()
    return [actor.options(scheduling_strategy=here).remote(shard=k, done_refs=done_refs[k], **kwargs)
            for k in range(shards)]


def driver_node():
    """A scheduling strategy that places an actor on the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                          soft=False)


def load_done_set(output: str, files: list[str], meta, shards: int, skip_status: tuple[str, ...],
                  files_per_task: int = 64) -> list[list]:
    """Object references of the done set's pieces, per shard: Ray tasks read OUTPUT's files
    (`files_per_task` each), split their ids by shard and digest them (`digest_piece`); the
    driver holds references only."""
    import ray

    from pipeline.store.reconcile import done_pieces

    refs: list[list] = [[] for _ in range(shards)]
    if not files:
        return refs
    def pieces_of(paths: list[str]):
        pieces = [digest_piece(p, skip_status) for p in done_pieces(output, paths, meta, shards)]
        return pieces[0] if shards == 1 else tuple(pieces)

    task = ray.remote(num_cpus=0.5, num_returns=shards)(pieces_of)
    for i in range(0, len(files), files_per_task):
        pieces = task.remote(files[i:i + files_per_task])
        for k, ref in enumerate([pieces] if shards == 1 else pieces):
            refs[k].append(ref)
    return refs


def skip_done(batch: pa.Table, *, writers: list, counter=None) -> pa.Table:
    """The skip stage: drop the rows whose image id the shard's done set holds, and the
    later rows of an id within this block (its first row wins). Inputs are counted once
    per image id: a duplicate row is neither listed nor skipped (the writers count it)."""
    import ray

    ids = batch.column("image_id").to_pylist()
    parts = shard_of(ids, len(writers))
    answer = [LABEL] * len(ids)
    by_shard: dict[int, list[int]] = {}
    for row, shard in enumerate(parts):
        by_shard.setdefault(shard, []).append(row)
    answers = {shard: writers[shard].to_label.remote([ids[r] for r in rows])
               for shard, rows in by_shard.items()}
    for shard, rows in by_shard.items():
        for row, code in zip(rows, ray.get(answers[shard])):
            answer[row] = code
    todo = batch.filter(pa.array([code == LABEL for code in answer], pa.bool_()))
    if counter is not None:
        try:
            duplicates = answer.count(DUPLICATE)
            counter.add_listed.remote(batch.num_rows - duplicates,
                                       batch.num_rows - duplicates - todo.num_rows)
        except Exception:  # noqa: BLE001
            pass
    return todo


def commit_rows(table: pa.Table, writers: list) -> int:
    """Hand labelled rows to their shards' writers; returns how many were new to this run."""
    import ray

    parts = pa.array(shard_of(table.column("image_id").to_pylist(), len(writers)), pa.int32())
    import pyarrow.compute as pc

    refs = []
    for shard in range(len(writers)):
        piece = table if len(writers) == 1 else table.filter(pc.equal(parts, shard))
        if piece.num_rows:
            refs.append(writers[shard].add.remote(piece))
    return sum(ray.get(refs))
