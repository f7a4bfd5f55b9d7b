"""Scheduled runs are incremental: a second run over N + M images labels only the M new ones."""
from __future__ import annotations

from pathlib import Path

import cv2
import pyarrow.compute as pc
import pytest

from pipeline import spec as specmod


def _write_images(folder: Path, seeds: range) -> None:

    from tests.imagegen import scene

    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        cv2.imwrite(str(folder / f"img{seed:03d}.png"), scene(40, 56, seed)[..., ::-1])


@pytest.mark.slow
def test_a_second_run_labels_only_the_new_images(ray_session, tmp_path):
    from pipeline.store.reader import read_runs
    from pipeline.store.output import SCHEMA, data_files
    from pipeline.job.run import run_job

    import pyarrow.parquet as pq

    n, m = 4, 3
    images, out = tmp_path / "in", tmp_path / "out"
    spec = specmod.JobSpec(input=str(images), output=str(out), model="drn_d_22", num_classes=3,
                           workers=1, batch_size=2, max_side=64)
    _write_images(images, range(n))
    first = run_job(spec, echo=lambda _: None)
    assert (first.state, first.to_label, first.ok) == ("finished", n, n)

    _write_images(images, range(n, n + m))  # the night's new images
    second = run_job(spec, echo=lambda _: None)
    assert (second.state, second.inputs, second.skipped, second.to_label, second.ok) == (
        "finished", n + m, n, m, m)

    runs = {r["run_id"]: r for r in read_runs(str(out))}
    assert runs[second.run_id]["counts"]["skipped_existing"] == n
    assert runs[second.run_id]["counts"]["to_label"] == m
    table = pq.read_table(data_files(str(out)), schema=SCHEMA)
    ids = table["image_id"].to_pylist()
    assert sorted(ids) == [f"img{i:03d}.png" for i in range(n + m)]  # each image once
    new_rows = pc.equal(table["run_id"], second.run_id)
    assert sorted(pc.filter(table["image_id"], new_rows).to_pylist()) == [
        f"img{i:03d}.png" for i in range(n, n + m)]
