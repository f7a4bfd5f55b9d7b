"""The job's input as a Ray Dataset: listing and manifest reading stream, the driver plans.

The driver only decides how INPUT is listed (`pipeline.store.sources.plan_inputs`: a few
metadata calls) and asks the input's source for its listing units (the files directly
in a folder and each sub-folder, a Parquet file's row groups, a shard, a manifest). One
Ray task per unit lists it through `pipeline.store.sources.list_unit`, block by block. So
the driver's memory and the time to the first image do not grow with the number of
inputs, and no kind of input needs code here.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import pyarrow as pa

from pipeline.store.sources import INPUT_SCHEMA, InputPlan, list_unit, list_units

MANIFEST_BATCH_ROWS = 1024
"""Rows per block read from a Parquet manifest or embedded-bytes file (about 64 KB of short
URIs)."""

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


def rebundle(ds, rows: int):
    """`ds.repartition(target_num_rows_per_block=rows)` run as a planning stage.

    Dataset.repartition takes no remote arguments, so its task would reserve a CPU, and it
    streams a whole input block (a manifest's row group of a million rows) as long as the
    run reads it. On a 2-CPU node whose two predict workers hold half a CPU each, that left
    no CPU for decoding: the run waited for ever with 0 images labelled. Its logical
    operator is given the arguments of the other planning stages instead (Ray 2.60's
    StreamingRepartition keeps them in `ray_remote_args` and `compute`, as map_batches
    ops do); it then also fuses with the skip stage before it."""
    from ray.data import TaskPoolStrategy

    out = ds.repartition(target_num_rows_per_block=rows)
    op = out._logical_plan.dag
    object.__setattr__(op, "ray_remote_args", {"num_cpus": PLAN_TASK_CPUS})
    object.__setattr__(op, "compute", TaskPoolStrategy(size=PLAN_TASK_CONCURRENCY))
    return out


def _listed(batch: pa.Table, *, plan: InputPlan) -> Iterator[pa.Table]:
    for unit in batch.column("unit").to_pylist():
        yield from list_unit(plan, unit, block_rows=MANIFEST_BATCH_ROWS)


def _one_block_each(table: pa.Table) -> list[pa.Table]:
    """A block per row of `table`: one planning task per unit."""
    return [table.slice(i, 1) for i in range(table.num_rows)]


def input_dataset(plan: InputPlan):
    """A Ray Dataset of `image_id`, `uri`, `error` rows for `plan` (not yet executed)."""
    import ray

    units = list_units(plan)
    if not units:  # a Parquet file without row groups
        return ray.data.from_arrow(INPUT_SCHEMA.empty_table())
    return ray.data.from_arrow(_one_block_each(pa.table({"unit": units}))).map_batches(
        _listed, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan},
        **plan_map_args())
