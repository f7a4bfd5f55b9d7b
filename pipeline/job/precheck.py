"""Before Ray starts: does this run have anything to do?

A rerun of a finished job, or a folder with no images, would otherwise pay for a whole
start (an embedded Ray, actors, the done set read by tasks) to find out. `check_inputs`
and `nothing_to_do` answer from bounded look-ups (pipeline.store.pending: a local INPUT
and OUTPUT's ids of this model identity, up to a million rows each) and answer None
("cannot tell cheaply") otherwise, so that the run goes on as usual and nothing is
decided here that the job would decide differently.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import JobError
from pipeline.spec import JobSpec
from pipeline.store.output import OutputMetadata
from pipeline.store.pending import LIMIT, TooMany, done_ids, listed_ids
from pipeline.store.sources import InputPlan, no_inputs_error

# What makes a look-up give up (the job reports the same problem properly, or streams).
_GIVE_UP = (TooMany, OSError, ValueError, pa.ArrowException)


@dataclass(frozen=True)
class NothingToDo:
    inputs: int   # images INPUT lists, every one already labelled for this model identity


def check_inputs(plan: InputPlan, limit: int = LIMIT) -> None:
    """Raise the job's own JobError when a local folder or glob holds no image (the listing
    stops at the first image it finds); return otherwise, also when it cannot tell cheaply.
    (A manifest without rows is no error: `nothing_to_do` finds nothing to do.)"""
    if plan.kind not in ("directory", "glob"):
        return
    try:
        chunks = listed_ids(plan, limit)
        empty = chunks is not None and not any(len(ids) for ids in chunks)
    except _GIVE_UP:
        return
    if empty:
        raise JobError(str(no_inputs_error(plan)))


def nothing_to_do(spec: JobSpec, plan: InputPlan, output: str, meta: OutputMetadata,
                  limit: int = LIMIT) -> NothingToDo | None:
    """NothingToDo when every image INPUT lists already has the row this run would skip
    (ok rows, and error rows unless --retry-errors); None as soon as one has not, or when
    INPUT or OUTPUT is beyond the cheap look-ups. --overwrite always has work."""
    if spec.overwrite:
        return None
    statuses = ("ok",) if spec.retry_errors else ("ok", "error")
    try:
        done = done_ids(output, meta, statuses, limit)
        chunks = listed_ids(plan, limit)
        if done is None or chunks is None:
            return None
        listed, batch, size = 0, [], FIRST_BATCH
        for ids in chunks:
            listed += len(ids)
            batch.append(ids)
            if listed >= size:  # batches grow 16-fold: one new image stops the listing early,
                if not _all_done(batch, done):  # and a million rows cost a few look-ups
                    return None  # work to do: the job lists as it labels
                batch, size = [], size * 16
        if not _all_done(batch, done):
            return None
    except _GIVE_UP:
        return None
    return NothingToDo(inputs=listed)


FIRST_BATCH = 4096
"""Ids checked first; each later check covers 16 times more (each builds a hash table of
the done ids, so they are few)."""


def _all_done(batch: list[pa.Array], done: pa.Array) -> bool:
    ids = pa.chunked_array(batch, pa.string())
    return len(ids) == 0 or bool(pc.all(pc.is_in(ids, value_set=done)).as_py())
