"""New sources without Ray: http(s) URLs against a loopback server that throttles, fails,
hangs and serves bad bytes; Parquet files holding image bytes; WebDataset tar shards."""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.store.sources import ReadError, list_inputs, read_all, read_bytes
from pipeline.store.sources.web import address_kind
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
    assert read_all(uris, retries=3, allow_private_urls=True) == [png(1)] * 3
    assert image_server.hits["/throttle/2/a.png"] == 3 and image_server.hits["/flaky/1/a.png"] == 2


def test_http_errors_name_the_status_and_only_5xx_and_429_are_retried(image_server: ImageServer):
    image_server.add("b.png", png(2))
    base = image_server.url
    missing, broken, gone = read_all(
        [f"{base}/status/404/b.png", f"{base}/status/500/b.png", f"{base}/status/410/b.png"],
        retries=2, allow_private_urls=True)
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
        read_bytes(f"{image_server.url}/hang/2/c.png", retries=0, allow_private_urls=True)


def test_http_requests_per_host_are_limited(monkeypatch):
    monkeypatch.setenv("DRN_LABEL_HTTP_PER_HOST", "2")
    server = ImageServer().start()  # its own host:port, so its own limit
    try:
        server.add("d.png", png(4))
        results = read_all([f"{server.url}/slow/d.png?{k}" for k in range(8)], retries=0,
                           allow_private_urls=True)
        assert results == [png(4)] * 8
        assert server.max_in_flight == 2
    finally:
        server.stop()


def test_bad_urls_and_answers_that_are_not_http_are_error_rows(image_server: ImageServer):
    """Nothing a URL or a server does fails the batch: each bad one is its own ReadError,
    and the good URL in the same batch is read."""
    image_server.add("e.png", png(5))
    base = image_server.url
    uris = ["http://host:abc/x.png", "http://[::1/x.png", "http:///x.png", f"{base}/notHTTP/e.png",
            f"{base}/ok/e.png", "http://127.0.0.1:99999/x.png"]
    port, bracket, hostless, not_http, good, big_port = read_all(uris, retries=2,
                                                                 allow_private_urls=True)
    assert good == png(5)
    assert str(port) == ("http://host:abc/x.png: could not read (malformed URL (Port could not be "
                         "cast to integer value as 'abc'); 1 attempt, permanent error, not retried)")
    assert "malformed URL" in str(bracket) and "malformed URL (no host)" in str(hostless)
    assert "malformed URL" in str(big_port) and not big_port.transient
    assert isinstance(not_http, ReadError) and not not_http.transient
    assert "not an HTTP answer (BadStatusLine" in str(not_http)


def test_one_deadline_covers_the_whole_fetch(image_server: ImageServer, monkeypatch):
    """A server that sends one byte a second (the body would take 1,000 s) becomes a ReadError
    at the deadline, retries included; the good URL beside it is read."""
    image_server.add("f.png", png(6))
    monkeypatch.setenv("DRN_LABEL_HTTP_TIMEOUT", "1.5")
    start = time.monotonic()
    drip, good = read_all([f"{image_server.url}/drip/1/slow.png", f"{image_server.url}/ok/f.png"],
                          retries=3, allow_private_urls=True)
    elapsed = time.monotonic() - start
    assert good == png(6)
    assert str(drip) == (f"{image_server.url}/drip/1/slow.png: could not read (timed out: no "
                         "complete answer within 1.5 s (DRN_LABEL_HTTP_TIMEOUT covers the whole "
                         "fetch); 1 attempt, transient error, no time left before the deadline)")
    assert elapsed < 6, elapsed  # a bound, not a speed: per-read timeouts never end here


def test_redirects_only_to_http_and_only_a_few(image_server: ImageServer):
    image_server.add("g.png", png(7))
    base = image_server.url
    two, six, ftp, file_, bad = read_all(
        [f"{base}/redirect/2/g.png", f"{base}/redirect/6/g.png", f"{base}/to?url=ftp://x.org/g.png",
         f"{base}/to?url=file:///etc/passwd", f"{base}/to?url=http://h:x/g.png"],
        retries=0, allow_private_urls=True)
    assert two == png(7) and image_server.hits["/redirect/0/g.png"] == 1
    assert "(more than 5 redirects;" in str(six)
    assert "(redirected to ftp://x.org/g.png: only http(s) URLs are fetched;" in str(ftp)
    assert "(redirected to file:///etc/passwd: only http(s) URLs are fetched;" in str(file_)
    assert "malformed URL" in str(bad)


def test_loopback_and_private_addresses_are_refused_by_default(image_server: ImageServer):
    """Refused before any connection (the server sees no request); --allow-private-urls
    (allow_private_urls) lets them through."""
    image_server.add("h.png", png(8))
    port = image_server.url.rsplit(":", 1)[1]
    by_ip, by_name = read_all([f"{image_server.url}/ok/h.png", f"http://localhost:{port}/ok/h.png"])
    assert str(by_ip) == (
        f"{image_server.url}/ok/h.png: could not read (refused: 127.0.0.1 is a loopback address; "
        "private, loopback and link-local addresses are fetched only with --allow-private-urls; "
        "1 attempt, permanent error, not retried)")
    assert "(refused: localhost resolves to " in str(by_name) and "a loopback address" in str(by_name)
    assert image_server.hits["/ok/h.png"] == 0
    assert read_all([f"{image_server.url}/ok/h.png"], allow_private_urls=True) == [png(8)]


@pytest.mark.parametrize("address, kind", [
    ("169.254.169.254", "a link-local address (where cloud metadata services answer)"),
    ("fe80::1%eth0", "a link-local address (where cloud metadata services answer)"),
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
    ("::ffff:127.0.0.1", "a loopback address"),
    ("10.1.2.3", "a private address"), ("172.16.0.1", "a private address"),
    ("192.168.1.1", "a private address"), ("fd00::1", "a private address"),
    ("100.64.0.1", "not a public address"), ("0.0.0.0", "a private address"),
    ("224.0.0.1", "not a public address"),
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("151.101.1.69", None),
])
def test_address_kinds(address, kind):
    assert address_kind(address) == kind


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
    assert rows["k"]["error"] == ("the shard holds 2 images for key 'k' (k.png, k.jpg); "
                                  "WebDataset shards need one image member per key")


def test_damaged_shards_in_a_glob_keep_the_good_ones(tmp_path: Path):
    """A shard cut inside a member, one cut inside a header, and one that is no tar at
    all: every readable key is listed, each damaged shard adds one error row, nothing
    raises; the member whose bytes are cut off is an error when read."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "a.tar", {"k.png": png(14)})
    write_shard(tmp_path / "whole.tar", {f"{k}.png": png(20 + k, 32) for k in range(3)})
    whole = (tmp_path / "whole.tar").read_bytes()
    first_data = 512 + len(png(20, 32))
    (folder / "b.tar").write_bytes(whole[:first_data - 100])          # inside member 0's bytes
    second_header = 512 + -(-len(png(20, 32)) // 512) * 512
    (folder / "c.tar").write_bytes(whole[:second_header + 100])       # inside member 1's header
    (folder / "d.tar").write_bytes(b"hello, not a tar file" * 40)
    rows = {r["image_id"]: r for r in list_inputs(str(folder / "*.tar")).to_pylist()}
    assert sorted(rows) == ["a.tar/k", "b.tar", "b.tar/0", "c.tar", "c.tar/0", "d.tar"]
    assert rows["a.tar/k"]["error"] is None and rows["c.tar/0"]["error"] is None
    assert rows["b.tar"]["error"] == (
        "not a readable tar file (ReadError: unexpected end of data); the members after its "
        "first 1 images were not listed")
    assert rows["b.tar"]["uri"] == f"{folder}/b.tar"
    assert rows["c.tar"]["error"].endswith(f"(ReadError: bytes at offset {second_header} are not "
                                           "a tar header); the members after its first 1 images "
                                           "were not listed")
    assert rows["d.tar"]["error"].endswith("none of its images were listed")
    assert rows["d.tar"]["uri"] == f"{folder}/d.tar"
    good, cut, whole_member = read_all([rows["a.tar/k"]["uri"], rows["b.tar/0"]["uri"],
                                        rows["c.tar/0"]["uri"]], retries=0)
    assert good == png(14) and whole_member == png(20, 32)
    assert "the shard ends before the member's" in str(cut)


def _corrupt_column_chunk(path: Path, row_group: int, column: str) -> None:
    """Overwrite the middle of one column chunk with garbage (the footer stays valid)."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = next(meta.column(k) for k in range(meta.num_columns)
                 if meta.column(k).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def test_unreadable_row_groups_become_error_rows(tmp_path: Path):
    """Embedded-bytes Parquet: a row group whose ids cannot be read is one error row; one
    whose image bytes cannot be read gives its rows' errors; the other groups are read."""
    path = tmp_path / "train.parquet"
    pq.write_table(hf_image_table([png(k) for k in range(6)], [f"{k}.png" for k in range(6)]),
                   path, row_group_size=2)
    _corrupt_column_chunk(path, 1, "image.path")
    _corrupt_column_chunk(path, 2, "image.bytes")
    table = list_inputs(str(path))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["0.png", "1.png", "4.png", "5.png", "train.parquet#row-group=1"]
    assert rows["train.parquet#row-group=1"]["uri"] == f"{path}#row-group=1"
    assert rows["train.parquet#row-group=1"]["error"].startswith("row group 1 could not be read (")
    assert rows["train.parquet#row-group=1"]["error"].endswith("its images were not listed")
    zero, five = read_all([rows["0.png"]["uri"], rows["5.png"]["uri"]], retries=1)
    assert zero == png(0)
    assert isinstance(five, ReadError) and str(five).startswith(f"{path}#row=5: could not read (")


def test_a_manifest_row_group_that_cannot_be_read_is_one_error_row(tmp_path: Path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [f"/x/{k}.png" for k in range(6)]}), path, row_group_size=2)
    _corrupt_column_chunk(path, 1, "uri")
    rows = {r["image_id"]: r for r in list_inputs(str(path)).to_pylist()}
    assert sorted(rows) == ["/x/0.png", "/x/1.png", "/x/4.png", "/x/5.png", "m.parquet#row-group=1"]
    assert rows["m.parquet#row-group=1"]["error"].endswith("its manifest rows were not listed")


_PEAK = """
import sys, tracemalloc
import pyarrow as pa
import pyarrow.parquet as pq
from pipeline.store.sources import read_all
tracemalloc.start()  # Python objects made by the read, not by the imports
if sys.argv[1] == "read_all":
    got = read_all(sys.argv[3:], retries=0, max_bytes=int(sys.argv[2]))
else:
    got = [pq.ParquetFile(sys.argv[3]).read_row_group(0, columns=["image.bytes"]).num_rows]
python_peak = tracemalloc.get_traced_memory()[1]
print([len(g) if isinstance(g, bytes) else str(g) for g in got])
print(pa.default_memory_pool().max_memory(), python_peak)
"""


def peak_of(*args: str) -> tuple[list, int, int]:
    """(what a fresh process read, the peak bytes Arrow allocated in it, the peak bytes of
    Python objects): memory bounds that are not timings."""
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout.splitlines()
    arrow, python = (int(v) for v in out[-1].split())
    return ast.literal_eval(out[-2]), arrow, python


def test_embedded_reads_hold_a_page_not_the_row_group(tmp_path: Path):
    """A 50 MiB row group of 95 half-MiB images, written in pages of two images: reading
    two rows from its middle holds about a page and a cell (read_row_group holds all of it);
    a 3 MiB cell above the byte cap becomes an error without being copied out."""
    cells = [np.random.default_rng(k).bytes(512 << 10) for k in range(95)] + [b"\0" * (3 << 20)]
    path = tmp_path / "big.parquet"
    pq.write_table(hf_image_table(cells, [f"{k}.bin" for k in range(96)]), path,
                   use_dictionary=False, write_batch_size=2, data_page_size=256 << 10,
                   compression="none")
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    got, arrow, python = peak_of("read_all", str(1 << 20), f"{path}#row=30", f"{path}#row=31",
                                 f"{path}#row=95")
    assert got[:2] == [512 << 10] * 2
    assert got[2] == (f"{path}#row=95: could not read (larger than the byte cap of 1,048,576 "
                      "bytes (--max-bytes); 1 attempt, permanent error, not retried)")
    _, whole, _ = peak_of("read_row_group", "0", str(path))
    assert whole > 50 << 20, whole  # the measure sees a whole row group when one is held
    assert arrow < 12 << 20, f"{arrow / 2**20:.1f} MiB"  # ~ the 3 MiB page, a cell, the footer
    assert python < 2 << 20, f"{python / 2**20:.1f} MiB"  # the two cells, not the 3 MiB one


def test_fuzzed_shards_never_fail_a_listing(tmp_path: Path):
    """60 shards from a fixed seed (tests/fuzz.py), about half damaged: the glob lists,
    every row is readable or an error row, and every read is bytes or a ReadError."""
    from tests.fuzz import make_shards

    make_shards(tmp_path / "shards", 60, seed=0)
    table = list_inputs(str(tmp_path / "shards" / "*.tar"))
    listed = table.filter(pa.compute.is_null(table["error"]))
    damaged = table.num_rows - listed.num_rows
    assert listed.num_rows > 60 and damaged > 10  # both kinds really happen
    results = read_all(listed["uri"].to_pylist(), retries=0)
    assert all(isinstance(r, (bytes, ReadError)) for r in results)
    assert any(isinstance(r, ReadError) for r in results) and any(isinstance(r, bytes) for r in results)


def test_an_embedded_row_past_the_end_fails_only_itself(tmp_path: Path):
    path = tmp_path / "two.parquet"
    pq.write_table(hf_image_table([png(1), png(2)], ["a", "b"]), path)
    first, past = read_all([f"{path}#row=0", f"{path}#row=7"], retries=0)
    assert first == png(1)
    assert str(past) == (f"{path}#row=7: could not read (past the end of the file (2 rows); "
                         "1 attempt, permanent error, not retried)")
