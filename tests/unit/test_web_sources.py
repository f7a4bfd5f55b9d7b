"""New sources without Ray: http(s) URLs against a loopback server that throttles, fails,
hangs and serves bad bytes; Parquet files holding image bytes; WebDataset tar shards."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.store.sources import InputError, ReadError, list_inputs, read_all, read_bytes
from tests.httpserver import ImageServer, image_server  # noqa: F401 - fixture


def png(seed: int, size: int = 16) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- http(s) ---------------------------------------------------------------------------------
def test_http_ok_throttled_and_flaky_urls_are_read(image_server: ImageServer):
    image_server.add("a.png", png(1))
    base = image_server.url
    uris = [f"{base}/ok/a.png", f"{base}/throttle/2/a.png", f"{base}/flaky/1/a.png"]
    assert read_all(uris, retries=3) == [png(1)] * 3
    assert image_server.hits["/throttle/2/a.png"] == 3 and image_server.hits["/flaky/1/a.png"] == 2


def test_http_errors_name_the_status_and_only_5xx_and_429_are_retried(image_server: ImageServer):
    image_server.add("b.png", png(2))
    base = image_server.url
    missing, broken, gone = read_all(
        [f"{base}/status/404/b.png", f"{base}/status/500/b.png", f"{base}/status/410/b.png"],
        retries=2)
    assert isinstance(missing, ReadError) and not missing.transient and missing.attempts == 1
    assert str(missing) == (f"{base}/status/404/b.png: could not read (HTTP 404 Not Found; "
                            "1 attempt, permanent error, not retried)")
    assert isinstance(broken, ReadError) and broken.transient and broken.attempts == 3
    assert "HTTP 500" in str(broken) and image_server.hits["/status/500/b.png"] == 3
    assert isinstance(gone, ReadError) and "HTTP 410" in str(gone) and gone.attempts == 1


def test_http_timeout_becomes_a_read_error(image_server: ImageServer, monkeypatch):
    image_server.add("c.png", png(3))
    monkeypatch.setenv("DRN_LABEL_HTTP_TIMEOUT", "0.3")
    with pytest.raises(ReadError, match="timed out"):
        read_bytes(f"{image_server.url}/hang/2/c.png", retries=0)


def test_http_requests_per_host_are_limited(monkeypatch):
    monkeypatch.setenv("DRN_LABEL_HTTP_PER_HOST", "2")
    server = ImageServer().start()  # its own host:port, so its own limit
    try:
        server.add("d.png", png(4))
        results = read_all([f"{server.url}/slow/d.png?{k}" for k in range(8)], retries=0)
        assert results == [png(4)] * 8
        assert server.max_in_flight == 2
    finally:
        server.stop()


# -- Parquet with embedded bytes -------------------------------------------------------------
def hf_image_table(images: list[bytes | None], paths: list[str | None]) -> pa.Table:
    """The layout Hugging Face `datasets` writes for an Image column."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": b, "path": p} for b, p in zip(images, paths)]
    return pa.table({"image": pa.array(cells, image_type), "label": list(range(len(images)))})


def test_embedded_parquet_lists_and_reads_rows(tmp_path: Path):
    path = tmp_path / "train.parquet"
    pq.write_table(hf_image_table([png(5), png(6), None], ["x/5.png", "x/6.png", "x/7.png"]),
                   path, row_group_size=2)
    table = list_inputs(str(path))
    assert table.column("image_id").to_pylist() == ["x/5.png", "x/6.png", "x/7.png"]
    assert table.column("uri").to_pylist() == [f"{path}#row={k}" for k in range(3)]
    five, six, empty = read_all(table.column("uri").to_pylist(), retries=0)
    assert (five, six) == (png(5), png(6))
    assert isinstance(empty, ReadError) and "holds no bytes" in str(empty)


def test_embedded_parquet_without_paths_uses_row_numbers(tmp_path: Path):
    path = tmp_path / "shard.parquet"
    pq.write_table(hf_image_table([png(7), png(8)], [None, None]), path)
    assert list_inputs(str(path)).column("image_id").to_pylist() == ["shard.parquet#0",
                                                                     "shard.parquet#1"]


# -- WebDataset ------------------------------------------------------------------------------
def write_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shard_one_row_per_key(tmp_path: Path):
    shard = tmp_path / "shard-000.tar"
    write_shard(shard, {"000.jpg.png": png(9), "000.cls": b"3", "001.png": png(10),
                        "001.json": b"{}", "d/002.webp": png(11)})
    table = list_inputs(str(shard))
    assert table.column("image_id").to_pylist() == ["000", "001", "d/002"]
    assert read_all(table.column("uri").to_pylist(), retries=0) == [png(9), png(10), png(11)]


def test_webdataset_glob_of_shards_and_two_images_per_key(tmp_path: Path):
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "a.tar", {"k.png": png(12)})
    write_shard(tmp_path / "shards" / "b.tar", {"k.png": png(13)})
    table = list_inputs(str(tmp_path / "shards" / "*.tar"))
    assert table.column("image_id").to_pylist() == ["a.tar/k", "b.tar/k"]
    write_shard(tmp_path / "two.tar", {"k.png": png(1), "k.jpg": png(2), "m.png": png(3)})
    rows = {r["image_id"]: r for r in list_inputs(str(tmp_path / "two.tar")).to_pylist()}
    assert rows["m"]["error"] is None  # the shard's other keys are labelled as usual
    assert rows["k"]["error"] == (f"shard {tmp_path}/two.tar holds 2 images for key 'k' (k.png, "
                                  "k.jpg); WebDataset shards need one image member per key")
