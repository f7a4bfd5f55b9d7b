"""The job's input as a Ray Dataset: listing and manifest reading stream, the driver plans.

The driver only decides how INPUT is listed (`pipeline.store.sources.plan_inputs`: a few
metadata calls). A Parquet manifest is read by one streaming task per row group (the
footer, read once on the driver, says how many), page by page; CSV and text manifests by
Ray Data's own readers; each block becomes `image_id`/`uri` rows. A directory or glob is
listed by one Ray task per listing unit (the files directly in the folder, and each
sub-folder), each calling `pipeline.store.sources.list_unit`. So the driver's memory and
the time to the first image do not grow with the number of inputs.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import pyarrow as pa

from pipeline.store.sources import (INPUT_SCHEMA, InputPlan, csv_convert_options, list_unit,
                                    manifest_rows, parquet_row_groups, read_row_group)

MANIFEST_BATCH_ROWS = 1024
"""Rows per block read from a Parquet manifest (about 64 KB of short URIs)."""

PLAN_TASK_CPUS = 0
PLAN_TASK_CONCURRENCY = 4
"""Listing, manifest-reading and skip tasks wait on storage and on backpressure most of the
time (a manifest's single row group of a million rows is read by one streaming task that
lives as long as the run's input), so they reserve no CPU that decoding needs; at most
PLAN_TASK_CONCURRENCY of each run at once instead."""

# An input of fewer units than the cap (a manifest of one file, a folder without
# sub-folders) makes Ray Data warn that the cap is more than it can use; that is intended.
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks",
                        category=UserWarning)


def plan_map_args() -> dict:
    """Ray Data map_batches arguments of a planning stage (see PLAN_TASK_CPUS)."""
    from ray.data import TaskPoolStrategy

    return {"num_cpus": PLAN_TASK_CPUS, "compute": TaskPoolStrategy(size=PLAN_TASK_CONCURRENCY)}


def _read_args() -> dict:
    """The same for Ray Data's file readers, which take the cap as `concurrency`."""
    return {"num_cpus": PLAN_TASK_CPUS, "concurrency": PLAN_TASK_CONCURRENCY}


def _listed(batch: pa.Table, *, plan: InputPlan) -> pa.Table:
    tables = [list_unit(plan, unit) for unit in batch.column("unit").to_pylist()]
    return pa.concat_tables(tables) if tables else INPUT_SCHEMA.empty_table()


def _manifest_block(batch: pa.Table, *, plan: InputPlan) -> pa.Table:
    return manifest_rows(plan, batch)


def _row_groups(batch: pa.Table, *, plan: InputPlan) -> Iterator[pa.Table]:
    for row_group, first_row in zip(batch.column("row_group").to_pylist(),
                                    batch.column("first_row").to_pylist()):
        yield from read_row_group(plan, row_group, first_row, MANIFEST_BATCH_ROWS)


def _one_block_each(table: pa.Table) -> list[pa.Table]:
    """A block per row of `table`: one planning task per unit."""
    return [table.slice(i, 1) for i in range(table.num_rows)]


def input_dataset(plan: InputPlan):
    """A Ray Dataset of `image_id`, `uri` rows for `plan` (not yet executed)."""
    import ray

    from pipeline.store.fs import resolve

    fs, _ = resolve(plan.input)
    if plan.kind == "image":
        import posixpath

        from pipeline.store.sources import to_uri

        return ray.data.from_arrow(pa.table(
            {"image_id": [posixpath.basename(plan.path)], "uri": [to_uri(plan.scheme, plan.path)],
             "error": [None]},
            schema=INPUT_SCHEMA))
    if plan.kind == "parquet":  # one streaming task per row group, read page by page
        groups = parquet_row_groups(plan)
        if not groups:
            return ray.data.from_arrow(INPUT_SCHEMA.empty_table())
        units = pa.table({"row_group": [g for g, _ in groups], "first_row": [r for _, r in groups]})
        return ray.data.from_arrow(_one_block_each(units)).map_batches(
            _row_groups, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan},
            **plan_map_args())
    if plan.kind == "csv":
        ds = ray.data.read_csv(plan.path, filesystem=fs, convert_options=csv_convert_options(plan),
                               **_read_args())
    elif plan.kind == "txt":
        ds = ray.data.read_text(plan.path, filesystem=fs, encoding="utf-8", **_read_args())
    else:  # directory or glob: one listing task per unit
        units = pa.table({"unit": list(plan.units)})
        return ray.data.from_arrow(_one_block_each(units)).map_batches(
            _listed, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan},
            **plan_map_args())
    return ds.map_batches(_manifest_block, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"plan": plan}, **plan_map_args())
