"""New inputs labelled end to end on the session's real local Ray, each with its failures
becoming error rows: http(s) URLs (a loopback server that throttles, fails and serves bad
bytes), a Parquet file holding image bytes, a WebDataset shard, and gs:// (the GCS
emulator) for input, output and weights at once."""
from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import cli
from pipeline.store.output import SCHEMA, data_files
from tests.httpserver import ImageServer, image_server  # noqa: F401 - fixture
from tests.modelkit import authors_checkpoint
from tests.unit.test_web_sources import hf_image_table, png, write_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return authors_checkpoint(tmp_path_factory.mktemp("ckpt") / "drn_d_22_seg.pth", num_classes=5)


@pytest.fixture(scope="module")
def label(checkpoint, tmp_path_factory, cli_runner_module):
    """Run `drn-label run INPUT OUTPUT` (weights: the local checkpoint unless given); the
    rows of a local OUTPUT by image id."""
    classes = tmp_path_factory.mktemp("classes") / "classes.txt"
    classes.write_text("sky\nroad\ncar\ntree\nperson\n")

    def run(input_: str, output: str, weights: str | None = None) -> dict[str, dict]:
        res = cli_runner_module.invoke(cli, [
            "run", input_, output, "--weights", weights or str(checkpoint), "--classes",
            str(classes), "--retries", "2", "--batch-size", "4"])
        assert res.exit_code == 0, res.output
        if "://" in output:
            return {"output": res.output}
        table = pq.read_table(data_files(output), schema=SCHEMA)
        return {r["image_id"]: r for r in table.to_pylist()}
    return run


@pytest.fixture(scope="module")
def cli_runner_module():
    from click.testing import CliRunner

    return CliRunner()


def test_http_urls_in_a_manifest(image_server: ImageServer, label, tmp_path, ray_session):
    image_server.add("a.png", png(1, 24))
    image_server.add("bad.png", b"<html>not an image</html>")
    base = image_server.url
    manifest = tmp_path / "urls.csv"
    rows = {"ok": f"{base}/ok/a.png", "throttled": f"{base}/throttle/2/a.png",
            "flaky": f"{base}/flaky/1/a.png", "missing": f"{base}/status/404/a.png",
            "broken": f"{base}/status/500/a.png", "bad": f"{base}/ok/bad.png"}
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "uri"])
        writer.writerows(rows.items())
    got = label(str(manifest), str(tmp_path / "out"))
    assert {k: r["status"] for k, r in got.items()} == {
        "ok": "ok", "throttled": "ok", "flaky": "ok", "missing": "error", "broken": "error",
        "bad": "error"}
    assert got["ok"]["uri"] == rows["ok"] and (got["ok"]["height"], got["ok"]["width"]) == (24, 24)
    assert got["missing"]["error"] == (f"{rows['missing']}: could not read (HTTP 404 Not Found; "
                                       "1 attempt, permanent error, not retried)")
    assert "HTTP 500" in got["broken"]["error"] and "3 attempts" in got["broken"]["error"]
    assert "not a decodable image" in got["bad"]["error"]
    assert image_server.hits["/throttle/2/a.png"] == 3


def test_parquet_with_embedded_image_bytes(label, tmp_path, ray_session):
    path = tmp_path / "train-00000.parquet"
    pq.write_table(hf_image_table([png(2, 24), png(3, 32), b"garbage", None],
                                  ["p/2.png", "p/3.png", "p/4.png", "p/5.png"]), path)
    got = label(str(path), str(tmp_path / "out"))
    assert {k: r["status"] for k, r in got.items()} == {
        "p/2.png": "ok", "p/3.png": "ok", "p/4.png": "error", "p/5.png": "error"}
    assert got["p/3.png"]["uri"] == f"{path}#row=1" and got["p/3.png"]["width"] == 32
    assert "not a decodable image" in got["p/4.png"]["error"]
    assert "holds no bytes" in got["p/5.png"]["error"]


def test_webdataset_shard(label, tmp_path, ray_session):
    shard = tmp_path / "shard-000.tar"
    write_shard(shard, {"000.png": png(4, 24), "000.cls": b"1", "001.jpg": png(5, 24),
                        "002.png": b"\x89PNG truncated"})
    got = label(str(shard), str(tmp_path / "out"))
    assert {k: r["status"] for k, r in got.items()} == {"000": "ok", "001": "ok", "002": "error"}
    assert got["000"]["uri"].startswith(f"{shard}#000.png@")


def test_gs_input_output_and_weights(gcs_server, checkpoint, label, tmp_path, ray_session):
    from pipeline import read_masks

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(png(6, 24))
    (images / "sub" / "b.png").write_bytes(png(7, 40))
    (images / "broken.png").write_bytes(b"not a png")
    bucket = gcs_server.make_bucket("drn-e2e")
    source = gcs_server.upload_tree(images, bucket, "in")
    weights = gcs_server.upload_tree(checkpoint.parent, bucket, "models") + "/" + checkpoint.name
    output = f"gs://{bucket}/out"
    label(source, output, weights)
    rows = {r.image_id: r for r in read_masks(output, status=None)}
    assert {k: r.status for k, r in rows.items()} == {"a.png": "ok", "sub/b.png": "ok",
                                                      "broken.png": "error"}
    assert rows["sub/b.png"].mask.shape == (40, 40)
    assert all(f.startswith(f"{bucket}/out/data/part-") for f in data_files(output))
    again = label(source, output, weights)["output"]
    assert "0 ok, 0 errors, 3 already labelled (of 3 inputs)" in again  # resumes on gs:// too
