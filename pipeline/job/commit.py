"""Shard writers: the done set and the commits of one hash partition of image ids each.

Image ids are hashed into `shards` partitions (`pipeline.store.reconcile.shard_of`). The
writer of a shard is a Ray actor that

- holds the shard's done set (this identity's committed ids, read by Ray tasks from
  OUTPUT's files and handed over as object references, never through the driver), and
  answers the skip stage's "which of these are still to label?";
- buffers the shard's labelled rows and commits them as one Parquet file whenever
  `rows_per_file` rows are waiting or the oldest has waited `commit_interval_s`, so
  commits keep pace with labelling at any N and whatever else competes for the CPUs;
- drops a row whose image id this run already buffered or committed (a repeated input,
  a retried write task), so each image is committed once;
- checks OUTPUT's lease (run id and generation) before every commit: a run that lost it
  commits nothing more.

The uncommitted rows of a run are therefore at most one file's worth per shard plus the
batches in flight.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pyarrow as pa

from pipeline.store.fs import write_table_atomic
from pipeline.store.lease import LeaseLost, check_lease
from pipeline.store.output import data_file_name
from pipeline.store.reconcile import shard_of

COMMIT_INTERVAL_S = 15.0
"""A shard commits its buffered rows at the latest this long after the oldest arrived."""


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


class ShardWriter:
    """The actor body (see the module doc). Methods are called from several threads."""

    def __init__(self, *, output: str, run_id: str, generation: int | None, shard: int,
                 schema: pa.Schema, rows_per_file: int, commit_interval_s: float,
                 done_refs: list, skip_status: tuple[str, ...], counter=None) -> None:
        import ray

        self.output, self.run_id, self.generation, self.shard = output, run_id, generation, shard
        self.schema, self.rows_per_file = schema, rows_per_file
        self.commit_interval_s, self.counter = commit_interval_s, counter
        existing = skip = 0
        done: set[str] = set()
        self.skip: set[str] = set()
        for piece in ray.get(list(done_refs)) if done_refs else []:
            ids = piece.column("image_id").to_pylist()
            existing += len(ids)
            done.update(ids)
            if set(skip_status) == {"ok", "error"}:
                continue
            for image_id, status in zip(ids, piece.column("status").to_pylist()):
                if status in skip_status:
                    self.skip.add(image_id)
        if set(skip_status) == {"ok", "error"}:
            self.skip = done
        self.existing, self.existing_duplicates = existing, existing - len(done)
        del done, skip
        self.seen: set[str] = set()  # buffered or committed by this run
        self.repeated = 0  # rows dropped because this run already had their image id
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.first_t: float | None = None
        self.files: list[CommittedFile] = []
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._timer, name="drn-label-commit", daemon=True).start()

    # -- the skip stage ----------------------------------------------------------------------
    def to_label(self, image_ids: list[str]) -> list[bool]:
        return [i not in self.skip for i in image_ids]

    # -- the write stage ---------------------------------------------------------------------
    def add(self, table: pa.Table) -> int:
        """Buffer labelled rows (committing when a file's worth is waiting); returns how
        many were new to this run."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            ids = table.column("image_id").to_pylist()
            new = [k for k, i in enumerate(ids) if i not in self.seen]
            self.repeated += len(ids) - len(new)
            if len(new) < len(ids):
                table = table.take(pa.array(new, pa.int64()))
            self.seen.update(table.column("image_id").to_pylist())
            if table.num_rows:
                self.buffer.append(table)
                self.buffered += table.num_rows
                self.first_t = self.first_t or time.time()
            if self.buffered >= self.rows_per_file:
                self._commit()
            return table.num_rows

    def _timer(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                if self.buffered and not self.lost and \
                        time.time() - (self.first_t or 0) >= self.commit_interval_s:
                    try:
                        self._commit()
                    except LeaseLost:
                        pass

    def _commit(self) -> None:
        """Commit the buffer as one file (the caller holds the lock)."""
        table = pa.concat_tables(self.buffer).cast(self.schema).sort_by("image_id")
        self.buffer, self.buffered, self.first_t = [], 0, None
        try:
            check_lease(self.output, self.run_id, self.generation)
        except LeaseLost as exc:
            self.lost = str(exc)
            raise
        name = data_file_name(self.run_id, table.column("image_id").to_pylist())
        write_table_atomic(self.output, name, table)
        errors = sum(1 for s in table.column("status").to_pylist() if s != "ok")
        self.files.append(CommittedFile(file=name, rows=table.num_rows, ok=table.num_rows - errors,
                                        errors=errors))
        if self.counter is not None:
            try:
                self.counter.add_committed.remote(table.num_rows - errors, errors)
            except Exception:  # noqa: BLE001 - progress must never fail a commit
                pass

    def finish(self) -> ShardResult:
        """Commit what is left; what this shard did."""
        self._stop.set()
        with self._lock:
            if self.buffered and not self.lost:
                try:
                    self._commit()
                except LeaseLost:
                    pass
            return ShardResult(files=tuple(self.files), repeated=self.repeated, lost=self.lost,
                               existing=self.existing,
                               existing_duplicates=self.existing_duplicates)


def start_shard_writers(shards: int, **kwargs) -> list:
    """`shards` ShardWriter actors; `done_refs[k]` are the object references of shard k's
    pieces of the done set. They live on the driver's node: a worker node that dies takes
    its tasks with it (Ray retries them) but never a writer's buffered rows."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=16)(ShardWriter)
    done_refs = kwargs.pop("done_refs")
    here = driver_node()
    return [actor.options(scheduling_strategy=here).remote(shard=k, done_refs=done_refs[k], **kwargs)
            for k in range(shards)]


def driver_node():
    """A scheduling strategy that places an actor on the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                          soft=False)


def load_done_set(output: str, files: list[str], meta, shards: int,
                  files_per_task: int = 64) -> list[list]:
    """Object references of the done set's pieces, per shard: Ray tasks read OUTPUT's files
    (`files_per_task` each) and split their ids by shard; the driver holds references only."""
    import ray

    from pipeline.store.reconcile import done_pieces

    refs: list[list] = [[] for _ in range(shards)]
    if not files:
        return refs
    def pieces_of(paths: list[str]):
        pieces = done_pieces(output, paths, meta, shards)
        return pieces[0] if shards == 1 else tuple(pieces)

    task = ray.remote(num_cpus=0.5, num_returns=shards)(pieces_of)
    for i in range(0, len(files), files_per_task):
        pieces = task.remote(files[i:i + files_per_task])
        for k, ref in enumerate([pieces] if shards == 1 else pieces):
            refs[k].append(ref)
    return refs


def skip_done(batch: pa.Table, *, writers: list, counter=None) -> pa.Table:
    """The skip stage: drop the rows whose image id the shard's done set holds."""
    import ray

    ids = batch.column("image_id").to_pylist()
    parts = shard_of(ids, len(writers))
    keep = [True] * len(ids)
    by_shard: dict[int, list[int]] = {}
    for row, shard in enumerate(parts):
        by_shard.setdefault(shard, []).append(row)
    answers = {shard: writers[shard].to_label.remote([ids[r] for r in rows])
               for shard, rows in by_shard.items()}
    for shard, rows in by_shard.items():
        for row, label in zip(rows, ray.get(answers[shard])):
            keep[row] = label
    todo = batch.filter(pa.array(keep, pa.bool_()))
    if counter is not None:
        try:
            counter.add_listed.remote(batch.num_rows, batch.num_rows - todo.num_rows)
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
