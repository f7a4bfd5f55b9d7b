"""Fast when there is nothing to do (issue 21): before Ray starts, a run sees from bounded
look-ups that every input already has its row, or that a folder has no image, and gives
up (None: the job streams as usual) whenever the look-ups would grow past their limit.

OUTPUTs here are real Parquet files, named and written as the shard writers write them
(pipeline.store.output); the inputs are real files in real folders and manifests."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import drn
from pipeline.errors import JobError
from pipeline.job.precheck import NothingToDo, check_inputs, nothing_to_do
from pipeline.spec import JobSpec
from pipeline.store.fs import write_table_atomic
from pipeline.store.output import OutputMetadata, data_file_name, schema_with_metadata
from pipeline.store.pending import listed_ids
from pipeline.store.sources import list_inputs, plan_inputs

LS = drn.get_preset("cityscapes")


def identity(sha: str = "a" * 64) -> OutputMetadata:
    return OutputMetadata(model="drn_d_22", weights="ckpt.pth", weights_sha256=sha, num_classes=19,
                          classes=tuple(LS.class_names), palette=tuple(map(tuple, LS.palette)),
                          mean=tuple(LS.mean), std=tuple(LS.std))


def commit(output, meta: OutputMetadata, rows: dict[str, str], run_id: str = "run1") -> None:
    """One data file of `rows` (image_id -> status), as a shard writer commits it."""
    now = dt.datetime.now(dt.timezone.utc)
    table = pa.Table.from_pylist(
        [{"image_id": i, "uri": f"/in/{i}", "status": s, "error": None if s == "ok" else "bad",
          "model": meta.model, "weights_sha256": meta.weights_sha256, "run_id": run_id,
          "labelled_at": now} for i, s in sorted(rows.items())],
        schema=schema_with_metadata(meta))
    write_table_atomic(str(output), data_file_name(run_id, sorted(rows)), table)


def folder(root, names) -> str:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not decoded here")
    return str(root)


IMAGES = ["a.png", "b.jpg", "street/c.PNG", "street/day/d.webp", "e.tif"]


@pytest.fixture
def finished(tmp_path):
    """A folder of 5 images (plus files that are not inputs) and an OUTPUT holding a row of
    each for one identity: 4 ok, 1 error."""
    inputs = folder(tmp_path / "in", [*IMAGES, "notes.txt", ".hidden/x.png", "street/.y.png"])
    output = tmp_path / "out"
    commit(output, identity(), {"a.png": "ok", "b.jpg": "ok", "street/c.PNG": "ok"})
    commit(output, identity(), {"street/day/d.webp": "ok", "e.tif": "error"}, run_id="run2")
    return inputs, str(output)


def check(inputs: str, output: str, meta=None, limit: int = 1_000_000, **spec):
    return nothing_to_do(JobSpec(input=inputs, output=output, **spec), plan_inputs(inputs), output,
                         meta or identity(), limit=limit)


def test_a_finished_folder_has_nothing_to_do(finished):
    assert check(*finished) == NothingToDo(inputs=5)


@pytest.mark.parametrize("why", ["a new image", "--retry-errors", "--overwrite", "another model",
                                 "an image twice", "over the limit"])
def test_anything_left_to_do_falls_through_to_the_job(finished, why):
    inputs, output = finished
    kwargs: dict = {}
    if why == "a new image":
        folder(Path(inputs), ["street/new.png"])
    elif why == "--retry-errors":
        kwargs["retry_errors"] = True  # the error row of e.tif is work
    elif why == "--overwrite":
        kwargs["overwrite"] = True
    elif why == "another model":
        kwargs["meta"] = identity("b" * 64)
    elif why == "an image twice":  # a killed --retry-errors run left two rows: the job reconciles
        commit(output, identity(), {"e.tif": "ok"}, run_id="run3")
    else:
        kwargs["limit"] = 4
    assert check(inputs, output, **kwargs) is None


def test_listed_ids_are_the_ids_the_job_gives(tmp_path):
    """The look-up names inputs exactly as the listing of a job (and of the tools) does:
    a folder, a glob, and .txt/.csv/.parquet manifests with relative URIs and ids."""
    inputs = folder(tmp_path / "in", [*IMAGES, "notes.txt", ".hidden/x.png", "street/.y.png"])
    (tmp_path / "list.txt").write_text("# a comment\nin/a.png\n\nin/street/c.PNG\n")
    (tmp_path / "list.csv").write_text("uri,image_id\nin/a.png,first\nin/b.jpg,\n")
    pq.write_table(pa.table({"uri": ["in/e.tif", "in/a.png"], "image_id": ["x", None]}),
                   tmp_path / "list.parquet", row_group_size=1)
    for source in (inputs, f"{inputs}/**/*.PNG", f"{inputs}/*.png", str(tmp_path / "list.txt"),
                   str(tmp_path / "list.csv"), str(tmp_path / "list.parquet"),
                   f"{inputs}/street/c.PNG"):
        plan = plan_inputs(source)
        ids = [i for chunk in listed_ids(plan) for i in chunk.to_pylist()]
        assert sorted(ids) == list_inputs(source).column("image_id").to_pylist(), source


def test_manifests_and_their_limits(tmp_path):
    output = tmp_path / "out"
    commit(output, identity(), {"first": "ok", "in/b.jpg": "ok"})
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,image_id\nin/a.png,first\nin/b.jpg,\n")
    assert check(str(manifest), str(output)) == NothingToDo(inputs=2)
    assert check(str(manifest), str(output), limit=1) is None
    big = tmp_path / "big.parquet"  # the footer says 5 rows: nothing is read at limit 4
    pq.write_table(pa.table({"uri": [f"x{i}.png" for i in range(5)]}), big)
    assert check(str(big), str(output), limit=4) is None
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    assert check(str(empty), str(output)) == NothingToDo(inputs=0)


def test_an_output_too_large_to_look_up_falls_through(finished):
    inputs, output = finished
    assert check(inputs, output, limit=4) is None  # 5 rows in OUTPUT


def test_object_stores_are_left_to_the_job(finished, s3_server, s3_bucket):
    s3_server.put(s3_bucket, "in/a.png", b"x")
    inputs, output = finished
    plan = plan_inputs(f"s3://{s3_bucket}/in")
    assert listed_ids(plan) is None
    assert nothing_to_do(JobSpec(input=plan.input, output=output), plan, output, identity()) is None


def test_a_folder_without_images_fails_before_ray(tmp_path):
    empty = folder(tmp_path / "empty", ["readme.txt", ".hidden/a.png"])
    with pytest.raises(JobError) as exc:
        check_inputs(plan_inputs(empty))
    assert str(exc.value) == (
        f"input {empty}: no images in this directory or its subfolders (looked for .bmp, .jpeg, "
        ".jpg, .png, .tif, .tiff, .webp in any letter case); point INPUT at the folder that holds "
        "the images, or use a glob or a manifest")
    with pytest.raises(JobError, match="the glob matched no files"):
        check_inputs(plan_inputs(f"{empty}/**/*.jpg"))
    check_inputs(plan_inputs(folder(tmp_path / "some", ["deep/down/a.png"])))  # no error
    (tmp_path / "empty.txt").write_text("")
    check_inputs(plan_inputs(str(tmp_path / "empty.txt")))  # a manifest: nothing_to_do's answer
