"""The job's input as a Ray Dataset: listing and manifest reading stream, the driver plans.

The driver only decides how INPUT is listed (`pipeline.store.sources.plan_inputs`: a few
metadata calls). Manifests are read by Ray Data's own readers (Parquet and CSV sharded by
file and row group, text by file) and turned into `image_id`/`uri` rows block by block;
a directory or glob is listed by one Ray task per listing unit (the files directly in
the folder, and each sub-folder), each calling `pipeline.store.sources.list_unit`. So the
driver's memory and the time to the first image do not grow with the number of inputs.
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.store.sources import (INPUT_SCHEMA, InputPlan, csv_convert_options, list_unit,
                                    manifest_columns, manifest_rows)


def _listed(batch: pa.Table, *, plan: InputPlan) -> pa.Table:
    tables = [list_unit(plan, unit) for unit in batch.column("unit").to_pylist()]
    return pa.concat_tables(tables) if tables else INPUT_SCHEMA.empty_table()


def _manifest_block(batch: pa.Table, *, plan: InputPlan) -> pa.Table:
    return manifest_rows(plan, batch)


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
    if plan.kind == "parquet":
        ds = ray.data.read_parquet(plan.path, filesystem=fs, columns=list(manifest_columns(plan)))
    elif plan.kind == "csv":
        ds = ray.data.read_csv(plan.path, filesystem=fs, convert_options=csv_convert_options(plan))
    elif plan.kind == "txt":
        ds = ray.data.read_text(plan.path, filesystem=fs, encoding="utf-8")
    else:  # directory or glob: one listing task per unit
        units = pa.table({"unit": list(plan.units)})
        return ray.data.from_arrow([units.slice(i, 1) for i in range(units.num_rows)]).map_batches(
            _listed, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
            fn_kwargs={"plan": plan})
    return ds.map_batches(_manifest_block, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                          fn_kwargs={"plan": plan})
