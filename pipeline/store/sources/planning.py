"""Deciding what INPUT is (`plan_inputs`) and listing it, unit by unit or whole.

The decision takes a few metadata calls; the listing streams (pipeline.job.plan runs one
task per unit), so the driver never holds the whole input list. A unit that cannot be
listed (after the retry rule) becomes one error row naming it; only a problem with INPUT
as a whole (no such path, a manifest without a `uri` column) stops a run.
"""
from __future__ import annotations

import re
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.store.fs import resolve, split_uri, to_uri
from pipeline.store.sources.base import (IMAGE_EXTENSIONS, INPUT_SCHEMA, LIST_BLOCK_ROWS,
                                         InputError, InputPlan, Target)
from pipeline.store.sources.registry import SOURCES, source_of
from pipeline.store.sources.retry import backoff_delay, is_transient, reason

LIST_RETRIES = 3
"""Retries of a listing unit whose first block failed transiently."""

_GLOB_CHARS = re.compile(r"[*?\[]")


def plan_inputs(input: str) -> InputPlan:  # noqa: A002 - the CLI's name for it
    """Decide how to list INPUT: the first source in the table that recognises it; raise
    InputError, naming INPUT and the fix, when it cannot be listed at all."""
    try:
        scheme, path = split_uri(input)
        fs, _ = resolve(input)
    except ValueError as exc:
        raise InputError(f"input {exc}") from None
    info = fs.get_file_info(path)
    target = Target(input, scheme, path, fs, info)
    if info.type == pafs.FileType.NotFound and _GLOB_CHARS.search(path):
        parts = path.split("/")
        first = next(k for k, part in enumerate(parts) if _GLOB_CHARS.search(part))
        if scheme != "local" and first == 0:
            raise InputError(f"input {input}: the bucket name cannot hold a wildcard")
        base = "/".join(parts[:first]) or "/"
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise InputError(f"input {input}: the glob's folder {to_uri(scheme, base)} does not "
                             "exist; check the path before the first wildcard")
        target = Target(input, scheme, path, fs, info, base, "/".join(parts[first:]))
    elif info.type == pafs.FileType.NotFound:
        raise InputError(
            f"input {input}: no such file or directory; give an existing directory, a glob "
            "(e.g. 'photos/**/*.jpg') or a manifest (.txt, .csv, .parquet)")
    for source in SOURCES:
        plan = source.plan(target)
        if plan is not None:
            return plan
    raise InputError(
        f"input {input}: not a directory, glob, manifest or image; manifests end in "
        f".txt, .csv or .parquet, images in .{', .'.join(IMAGE_EXTENSIONS)}")


def list_units(plan: InputPlan) -> list[str]:
    """The listing units of `plan` (see `Source.units`)."""
    return source_of(plan.kind).units(plan)


def list_unit(plan: InputPlan, unit: str, *, block_rows: int = LIST_BLOCK_ROWS) -> Iterator[pa.Table]:
    """The rows of one listing unit, block by block. A failure before the first block is
    retried by the retry rule when transient; a unit that still cannot be listed (or
    fails half way) ends with one error row naming it. InputError (INPUT itself is
    wrong) goes up."""
    source = source_of(plan.kind)
    attempts = 0
    while True:
        attempts += 1
        yielded = False
        try:
            for block in source.list(plan, unit, block_rows=block_rows):
                yielded = True
                yield block
            return
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - the unit becomes an error row
            if yielded or not is_transient(exc) or attempts > LIST_RETRIES:
                yield source.unit_failed(plan, unit, reason(exc))
                return
        time.sleep(backoff_delay(attempts, 0.2))


def no_inputs_error(plan: InputPlan) -> InputError:
    """The error for a directory or glob that listed nothing."""
    if plan.kind in ("glob", "shards"):
        return InputError(f"input {plan.input}: the glob matched no files; check the pattern "
                          "(matching is case-sensitive; '**' spans folders)")
    return InputError(
        f"input {plan.input}: no images in this directory or its subfolders (looked for "
        f".{', .'.join(IMAGE_EXTENSIONS)} in any letter case); point INPUT at the folder "
        "that holds the images, or use a glob or a manifest")


def must_list_something(plan: InputPlan) -> bool:
    """Whether listing nothing means INPUT was wrong (a folder or glob with no images),
    rather than an empty manifest."""
    return plan.kind in ("directory", "glob", "shards")


def list_inputs(input: str) -> pa.Table:  # noqa: A002 - the CLI's name for it
    """The images INPUT names, as one table of `image_id` and `uri` (strings), sorted by
    image_id: the whole list in memory, for tools and small inputs (a job streams the
    same units instead, see pipeline.job.plan). Raises InputError, naming INPUT and the
    fix, when nothing can be listed or an image_id repeats."""
    plan = plan_inputs(input)
    blocks = [block for unit in list_units(plan) for block in list_unit(plan, unit)]
    table = pa.concat_tables(blocks) if blocks else INPUT_SCHEMA.empty_table()
    if table.num_rows == 0 and must_list_something(plan):
        raise no_inputs_error(plan)
    table = table.sort_by("image_id")
    _check_unique(input, table.column("image_id"))
    return table


def _check_unique(input: str, image_ids: pa.ChunkedArray) -> None:  # noqa: A002
    """image_ids are sorted: a duplicate sits next to its twin."""
    ids = image_ids.combine_chunks()
    if len(ids) < 2:
        return
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    if not pc.any(same).as_py():
        return
    first = ids[pc.index(same, True).as_py()].as_py()
    times = pc.sum(pc.equal(ids, first)).as_py()
    raise InputError(f"input {input}: image_id {first!r} appears {times} times; image_ids must "
                     "be unique (remove the repeated entries or give each row its own "
                     "image_id)")
