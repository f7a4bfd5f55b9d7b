"""Planning stages reserve no CPU, the rebundling of large input blocks included."""
from __future__ import annotations

import pyarrow as pa
import pytest

pytestmark = pytest.mark.e2e


def _passthrough(batch: pa.Table) -> pa.Table:
    return batch


def test_large_input_blocks_are_split_by_a_stage_that_holds_no_cpu(ray_session):
    """A manifest's row group arrives as one large block, split into decode-sized blocks
    by a task that streams as long as the input lasts. Dataset.repartition gives that
    task a CPU of its own: on a 2-CPU node with two predict workers of half a CPU, a
    1,000,000-row manifest then waited with 0 images labelled (bench/scale.py). `rebundle`
    runs it as a planning stage: no CPU, fused with the skip stage before it."""
    import ray.data

    from pipeline.job.plan import plan_map_args, rebundle

    rows = 5000
    ds = ray.data.from_arrow(pa.table({"uri": [f"img-{i}" for i in range(rows)]}))  # one block
    ds = ds.map_batches(_passthrough, batch_format="pyarrow", batch_size=None, **plan_map_args())
    ds = rebundle(ds, 8)
    assert ds._logical_plan.dag.ray_remote_args == {"num_cpus": 0}
    sizes = [b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert sum(sizes) == rows and max(sizes) <= 8 and len(sizes) >= rows // 8
    # One task does both (no separate repartition task that could wait for a CPU).
    assert "MapBatches(_passthrough)->StreamingRepartition" in ds.stats()
