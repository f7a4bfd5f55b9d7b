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

    def run(input_: str, output: str, weights: str | None = None, *extra: str) -> dict[str, dict]:
        res = cli_runner_module.invoke(cli, [
            "run", input_, output, "--weights", weights or str(checkpoint), "--classes",
            str(classes), "--retries", "2", "--batch-size", "4", *extra])
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


def _csv_manifest(path: Path, rows: dict[str, str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "uri"])
        writer.writerows(rows.items())
    return path


def test_http_urls_in_a_manifest(image_server: ImageServer, label, tmp_path, ray_session):
    """Every kind of bad URL or server is its own error row and the job goes on: statuses,
    a malformed URL, an answer that is not HTTP, a server sending one byte a second (cut
    off at the per-image deadline, DRN_LABEL_HTTP_TIMEOUT=4 in tests/conftest.py),
    redirects (followed between http URLs, refused to ftp://). --allow-private-urls lets
    the loopback server be fetched at all."""
    image_server.add("a.png", png(1, 24))
    image_server.add("bad.png", b"<html>not an image</html>")
    base = image_server.url
    rows = {"ok": f"{base}/ok/a.png", "throttled": f"{base}/throttle/2/a.png",
            "flaky": f"{base}/flaky/1/a.png", "missing": f"{base}/status/404/a.png",
            "broken": f"{base}/status/500/a.png", "bad": f"{base}/ok/bad.png",
            "malformed": "http://host:abc/x.png", "not-http": f"{base}/notHTTP/a.png",
            "one-byte-a-second": f"{base}/drip/1/a.png", "redirected": f"{base}/redirect/2/a.png",
            "to-ftp": f"{base}/to?url=ftp://example.org/a.png"}
    got = label(str(_csv_manifest(tmp_path / "urls.csv", rows)), str(tmp_path / "out"), None,
                "--allow-private-urls")
    assert {k: r["status"] for k, r in got.items()} == {
        "ok": "ok", "throttled": "ok", "flaky": "ok", "missing": "error", "broken": "error",
        "bad": "error", "malformed": "error", "not-http": "error", "one-byte-a-second": "error",
        "redirected": "ok", "to-ftp": "error"}
    assert got["ok"]["uri"] == rows["ok"] and (got["ok"]["height"], got["ok"]["width"]) == (24, 24)
    assert got["missing"]["error"] == (f"{rows['missing']}: could not read (HTTP 404 Not Found; "
                                       "1 attempt, permanent error, not retried)")
    assert "HTTP 500" in got["broken"]["error"] and "3 attempts" in got["broken"]["error"]
    assert "not a decodable image" in got["bad"]["error"]
    assert "(malformed URL (Port could not be cast" in got["malformed"]["error"]
    assert "(not an HTTP answer (BadStatusLine" in got["not-http"]["error"]
    assert "(timed out: no complete answer within 4 s" in got["one-byte-a-second"]["error"]
    assert "redirected to ftp://example.org/a.png: only http(s) URLs" in got["to-ftp"]["error"]
    assert image_server.hits["/throttle/2/a.png"] == 3


def test_internal_addresses_are_refused_by_default(image_server: ImageServer, label, tmp_path,
                                                  ray_session):
    image_server.add("c.png", png(3, 24))
    port = image_server.url.rsplit(":", 1)[1]
    rows = {"by-ip": f"{image_server.url}/ok/c.png?refused",
            "by-name": f"http://localhost:{port}/ok/c.png?refused"}
    got = label(str(_csv_manifest(tmp_path / "urls.csv", rows)), str(tmp_path / "out"))
    assert got["by-ip"]["error"] == (
        f"{rows['by-ip']}: could not read (refused: 127.0.0.1 is a loopback address; private, "
        "loopback and link-local addresses are fetched only with --allow-private-urls; "
        "1 attempt, permanent error, not retried)")
    assert "(refused: localhost resolves to" in got["by-name"]["error"]
    assert not [path for path in image_server.hits if path.endswith("?refused")]  # never asked


def test_parquet_with_embedded_image_bytes(label, tmp_path, ray_session):
    """Rows of a Parquet file holding the images, in row groups of two: a row group whose
    ids cannot be read is one error row, a cell above --max-bytes an error row (never
    copied out), the rest labelled."""
    from tests.unit.test_web_sources import _corrupt_column_chunk

    path = tmp_path / "train-00000.parquet"
    big = png(9, 24) + b"\0" * 60_000  # a PNG with trailing bytes, above the cap below
    pq.write_table(hf_image_table([png(2, 24), png(3, 32), b"garbage", None, png(4, 24),
                                   png(5, 24), big],
                                  [f"p/{k}.png" for k in range(2, 9)]), path, row_group_size=2)
    _corrupt_column_chunk(path, 2, "image.path")  # rows 4 and 5: p/6.png, p/7.png
    got = label(str(path), str(tmp_path / "out"), None, "--max-bytes", "50000")
    assert {k: r["status"] for k, r in got.items()} == {
        "p/2.png": "ok", "p/3.png": "ok", "p/4.png": "error", "p/5.png": "error",
        "train-00000.parquet#row-group=2": "error", "p/8.png": "error"}
    assert got["p/3.png"]["uri"] == f"{path}#row=1" and got["p/3.png"]["width"] == 32
    assert "not a decodable image" in got["p/4.png"]["error"]
    assert "holds no bytes" in got["p/5.png"]["error"]
    assert got["train-00000.parquet#row-group=2"]["error"].startswith(
        f"{path}#row-group=2: row group 2 could not be read (")
    assert "larger than the byte cap of 50,000 bytes (--max-bytes)" in got["p/8.png"]["error"]


def test_webdataset_shards_one_cut_short(label, tmp_path, ray_session):
    """A glob of shards where one shard is cut inside a member: the good shards' images
    are labelled, the cut member and the damaged shard are error rows."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a.tar", {"000.png": png(4, 24), "000.cls": b"1", "001.jpg": png(5, 24),
                                   "002.png": b"\x89PNG truncated"})
    write_shard(tmp_path / "whole.tar", {"k0.png": png(6, 24), "k1.png": png(7, 24)})
    whole = (tmp_path / "whole.tar").read_bytes()
    (shards / "b.tar").write_bytes(whole[:512 + len(png(6, 24)) // 2])  # inside k0's bytes
    got = label(str(shards / "*.tar"), str(tmp_path / "out"))
    assert {k: r["status"] for k, r in got.items()} == {
        "a.tar/000": "ok", "a.tar/001": "ok", "a.tar/002": "error", "b.tar/k0": "error",
        "b.tar": "error"}
    assert got["a.tar/000"]["uri"].startswith(f"{shards}/a.tar#000.png@")
    assert "the shard ends before the member's" in got["b.tar/k0"]["error"]
    assert got["b.tar"]["error"].startswith(f"{shards}/b.tar: not a readable tar file")


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
