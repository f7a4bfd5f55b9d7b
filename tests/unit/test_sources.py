"""pipeline.store.sources: listing inputs (local and on a real local S3 server) and reading
bytes with retries, faults injected at the filesystem layer (no mocks of pyarrow)."""
from __future__ import annotations

import errno
import os
import pickle
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.store.sources import (
    IMAGE_EXTENSIONS, INPUT_SCHEMA, InputError, ReadError, glob_to_regex, is_transient,
    list_inputs, list_unit, list_units, plan_inputs, read_bytes, resolve,
)
from tests.imagegen import make_collection
from tests.s3server import FlakyHandler

EXTS = ".bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The image collection plus files a listing must skip."""
    root = tmp_path_factory.mktemp("inputs") / "images"
    make_collection(root)
    (root / "notes.txt").write_text("not an image\n")
    (root / "street" / "labels.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "street" / "._photo_200x120.jpg").write_bytes(b"\0\5\26\7")  # AppleDouble
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(b"\xff\xd8")
    return root


def _image_ids(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))


def _error(input: str) -> str:
    with pytest.raises(InputError) as info:
        list_inputs(input)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- resolve ---------------------------------------------------------------------------------
def test_resolve_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri, path in [("a/b.jpg", f"{tmp_path}/a/b.jpg"), ("./a/", f"{tmp_path}/a"),
                      (f"{tmp_path}/x", f"{tmp_path}/x"), (f"file://{tmp_path}/y%20z.png",
                                                           f"{tmp_path}/y z.png")]:
        fs, got = resolve(uri)
        assert fs.type_name == "local" and got == path, uri
    with pytest.raises(ValueError, match=r"^ftp://b/k: unsupported scheme 'ftp://' "):
        resolve("ftp://b/k")


def test_resolve_s3_uses_the_environment(s3_server):
    fs, path = resolve("s3://bucket/some/key.jpg/")
    assert fs.type_name == "s3" and path == "bucket/some/key.jpg"
    assert fs.region == "us-east-1"
    assert resolve("s3://other/x")[0] is fs  # cached per endpoint and credentials


# -- directories -----------------------------------------------------------------------------
def test_directory_lists_images_recursively(images):
    table = list_inputs(str(images))
    assert table.schema == INPUT_SCHEMA
    expected = _image_ids(images)
    assert len(expected) == 43
    assert _rows(table) == [(i, f"{images}/{i}") for i in expected]
    ids = table.column("image_id").to_pylist()
    assert "upper/CAMERA_70x45.JPG" in ids and "upper/mixed_50x50.Jpeg" in ids
    assert "fields/a/b/c/deep_41x29.png" in ids
    assert not any(i.endswith((".txt", ".json", ".DS_Store")) or "/." in i for i in ids)


def test_directory_forms_agree(images, monkeypatch):
    expected = _rows(list_inputs(str(images)))
    assert _rows(list_inputs(f"{images}/")) == expected
    assert _rows(list_inputs(f"file://{images}")) == expected
    monkeypatch.chdir(images.parent)
    assert _rows(list_inputs("images")) == expected


def test_single_image_file(images):
    table = list_inputs(f"{images}/street/rgb_200x120.png")
    assert _rows(table) == [("rgb_200x120.png", f"{images}/street/rgb_200x120.png")]


def test_directory_without_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.md").write_text("hi")
    assert _error(str(tmp_path)) == (
        f"input {tmp_path}: no images in this directory or its subfolders (looked for "
        f"{EXTS} in any letter case); point INPUT at the folder that holds the images, "
        "or use a glob or a manifest")


def test_missing_input(tmp_path):
    missing = tmp_path / "nope"
    assert _error(str(missing)) == (
        f"input {missing}: no such file or directory; give an existing directory, a glob "
        "(e.g. 'photos/**/*.jpg') or a manifest (.txt, .csv, .parquet)")


def test_unknown_file_kind(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    assert _error(str(tmp_path / "list.json")) == (
        f"input {tmp_path}/list.json: not a directory, glob, manifest or image; manifests "
        f"end in .txt, .csv or .parquet, images in {EXTS}")


def test_unsupported_scheme():
    assert _error("abfs://bucket/images") == (
        "input abfs://bucket/images: unsupported scheme 'abfs://' "
        "(use a local path, file://, s3:// or gs://)")


# -- globs ----------------------------------------------------------------------------------
def test_glob_recursive_is_case_sensitive(images):
    table = list_inputs(f"{images}/**/*.png")
    expected = [i for i in _image_ids(images) if i.endswith(".png")]
    assert _rows(table) == [(i, f"{images}/{i}") for i in expected]
    assert "rgb_64x64.png" in expected  # '**/' matches zero folders too
    assert "upper/SCAN_66x33.PNG" not in table.column("image_id").to_pylist()


def test_glob_image_ids_are_relative_to_the_prefix(images):
    table = list_inputs(f"{images}/street/*/*.png")
    assert _rows(table) == [
        ("day/rgb_8x8.png", f"{images}/street/day/rgb_8x8.png"),
        ("night/wide_300x16.png", f"{images}/street/night/wide_300x16.png"),
    ]
    table = list_inputs(f"{images}/street/*.jpg")  # one folder only
    assert table.column("image_id").to_pylist() == ["photo_200x120.jpg"]
    table = list_inputs(f"{images}/exif/orientation[!1]_*.?pg")
    assert [i[:12] for i in table.column("image_id").to_pylist()] == [
        "orientation3", "orientation5", "orientation6", "orientation8"]


def test_glob_errors(images, tmp_path):
    assert _error(f"{images}/**/*.gif") == (
        f"input {images}/**/*.gif: the glob matched no files; check the pattern "
        "(matching is case-sensitive; '**' spans folders)")
    assert _error(f"{tmp_path}/nope/*.jpg") == (
        f"input {tmp_path}/nope/*.jpg: the glob's folder {tmp_path}/nope does not exist; "
        "check the path before the first wildcard")


@pytest.mark.parametrize("pattern, matches, misses", [
    ("*.jpg", ["a.jpg", ".jpg"], ["d/a.jpg", "a.jpeg", "a.JPG"]),
    ("**/*.jpg", ["a.jpg", "d/a.jpg", "d/e/f/a.jpg"], ["d/a.png"]),
    ("d/**", ["d/a", "d/e/f"], ["e/a"]),
    ("cam?/[ab]-[!x].png", ["cam1/a-y.png", "camZ/b-1.png"], ["cam1/c-y.png", "cam1/a-x.png",
                                                               "cam12/a-y.png"]),
    ("x+y (1).png", ["x+y (1).png"], ["xxy (1).png", "x+y 1.png"]),
])
def test_glob_to_regex(pattern, matches, misses):
    import pyarrow.compute as pc

    regex = glob_to_regex(pattern)
    got = pc.match_substring_regex(pa.array(matches + misses), regex).to_pylist()
    assert got == [True] * len(matches) + [False] * len(misses), regex


# -- manifests -------------------------------------------------------------------------------
def test_txt_manifest(images, tmp_path):
    lists = images / "lists"
    lists.mkdir(exist_ok=True)
    manifest = lists / "batch.txt"
    manifest.write_text(
        "# images for tonight\n"
        "\n"
        "../street/rgb_200x120.png\n"
        f"  {images}/rgb_64x64.png  \n"
        "   # indented comment\n"
        "./local.jpg\n"
        "nested/x.JPG\n"
        "s3://bucket/remote.jpg\n"
        "missing.png\n")
    table = list_inputs(str(manifest))
    assert _rows(table) == sorted([
        ("../street/rgb_200x120.png", f"{images}/street/rgb_200x120.png"),
        (f"{images}/rgb_64x64.png", f"{images}/rgb_64x64.png"),
        ("./local.jpg", f"{lists}/local.jpg"),
        ("nested/x.JPG", f"{lists}/nested/x.JPG"),
        ("s3://bucket/remote.jpg", "s3://bucket/remote.jpg"),
        ("missing.png", f"{lists}/missing.png"),  # existence is checked when reading
    ])


def test_csv_manifest(tmp_path):
    (tmp_path / "m.csv").write_text(
        "uri,image_id,label\n"
        "a.jpg,001,cat\n"
        "sub/b.png,,dog\n"
        "\"c, d.png\",0042,x\n")
    table = list_inputs(str(tmp_path / "m.csv"))
    assert _rows(table) == [
        ("001", f"{tmp_path}/a.jpg"), ("0042", f"{tmp_path}/c, d.png"),
        ("sub/b.png", f"{tmp_path}/sub/b.png"),  # empty image_id: the URI as written
    ]
    (tmp_path / "uri_only.CSV").write_text("uri\n/abs/x.jpg\ny.jpg\n")
    assert _rows(list_inputs(str(tmp_path / "uri_only.CSV"))) == [
        ("/abs/x.jpg", "/abs/x.jpg"), ("y.jpg", f"{tmp_path}/y.jpg")]


def test_parquet_manifest(tmp_path):
    pq.write_table(pa.table({"image_id": pa.array([3, 1, 2], pa.int64()),
                             "uri": ["c.jpg", "s3://b/a.jpg", "/x/b.jpg"],
                             "extra": [1.0, 2.0, 3.0]}), tmp_path / "m.parquet")
    assert _rows(list_inputs(str(tmp_path / "m.parquet"))) == [
        ("1", "s3://b/a.jpg"), ("2", "/x/b.jpg"), ("3", f"{tmp_path}/c.jpg")]


def test_parquet_manifest_streams_by_row_group(tmp_path):
    """A run reads a Parquet manifest row group by row group, a block at a time: the rows
    are list_inputs' rows, and a bad row is named by its row number in the file."""
    uris = [f"img{i}.png" if i % 3 else f"/abs/img{i}.png" for i in range(7)]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "m.parquet", row_group_size=3)
    plan = plan_inputs(str(tmp_path / "m.parquet"))
    assert list_units(plan) == ["0:0", "1:3", "2:6"]
    blocks = [block for unit in list_units(plan) for block in list_unit(plan, unit, block_rows=2)]
    assert [b.num_rows for b in blocks] == [2, 1, 2, 1, 1]
    streamed = pa.concat_tables(blocks).sort_by("image_id")
    assert _rows(streamed) == _rows(list_inputs(str(tmp_path / "m.parquet")))
    assert ("img4.png", f"{tmp_path}/img4.png") in _rows(streamed)

    pq.write_table(pa.table({"uri": ["a.png", "b.png", "c.png", "d.png", " "]}),
                   tmp_path / "bad.parquet", row_group_size=2)
    plan = plan_inputs(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError) as err:
        for unit in list_units(plan):
            list(list_unit(plan, unit, block_rows=8))
    assert str(err.value) == (f"input {tmp_path}/bad.parquet: row 5 has an empty uri; every "
                              "row needs the path or URI of one image")


def test_manifest_without_uri_column(tmp_path):
    (tmp_path / "m.csv").write_text("path,id\na.jpg,1\n")
    assert _error(str(tmp_path / "m.csv")) == (
        f"input {tmp_path}/m.csv: manifest has no 'uri' column (its columns: path, id); "
        "add a 'uri' column with one image path or URI per row")
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "m.parquet")
    assert _error(str(tmp_path / "m.parquet")) == (
        f"input {tmp_path}/m.parquet: manifest has no 'uri' column (its columns: file); "
        "add a 'uri' column with one image path or URI per row")


def test_manifest_with_an_empty_uri(tmp_path):
    (tmp_path / "m.csv").write_text("uri,image_id\na.jpg,a\n,b\n")
    assert _error(str(tmp_path / "m.csv")) == (
        f"input {tmp_path}/m.csv: row 2 has an empty uri; every row needs the path or URI "
        "of one image")


def test_duplicate_image_ids(tmp_path):
    (tmp_path / "m.txt").write_text("a.jpg\nb.jpg\na.jpg\nc.jpg\na.jpg\n")
    assert _error(str(tmp_path / "m.txt")) == (
        f"input {tmp_path}/m.txt: image_id 'a.jpg' appears 3 times; image_ids must be unique "
        "(remove the repeated entries or give each row its own image_id)")
    (tmp_path / "m.csv").write_text("uri,image_id\nx/1.jpg,same\ny/1.jpg,same\n")
    assert "image_id 'same' appears 2 times" in _error(str(tmp_path / "m.csv"))


def test_empty_manifest_lists_nothing(tmp_path):
    (tmp_path / "m.txt").write_text("# nothing new today\n\n")
    table = list_inputs(str(tmp_path / "m.txt"))
    assert table.num_rows == 0 and table.schema == INPUT_SCHEMA


def test_large_manifest_is_vectorised(tmp_path):
    n = 200_000
    (tmp_path / "m.txt").write_text("".join(f"img/{i:07d}.jpg\n" for i in range(n)))
    start = time.perf_counter()
    table = list_inputs(str(tmp_path / "m.txt"))
    elapsed = time.perf_counter() - start
    assert table.num_rows == n
    assert table.column("uri")[n - 1].as_py() == f"{tmp_path}/img/{n - 1:07d}.jpg"
    assert elapsed < 5, elapsed  # about 0.1 s here; a per-row Python loop is far slower


# -- S3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_images(s3_server, images) -> str:
    """The collection uploaded under s3://<bucket>/photos (hidden and non-image files too)."""
    bucket = s3_server.make_bucket("drn-inputs")
    return s3_server.upload_tree(images, bucket, "photos")


def test_s3_directory(s3_images, images):
    table = list_inputs(s3_images)
    assert _rows(table) == [(i, f"{s3_images}/{i}") for i in _image_ids(images)]
    assert _rows(list_inputs(s3_images + "/")) == _rows(table)


def test_s3_glob_and_manifests(s3_server, s3_images, images):
    table = list_inputs(f"{s3_images}/**/*.png")
    assert table.column("image_id").to_pylist() == [
        i for i in _image_ids(images) if i.endswith(".png")]
    table = list_inputs(f"{s3_images}/upper/*")
    assert _rows(table) == [(i, f"{s3_images}/upper/{i}") for i in
                            ["CAMERA_70x45.JPG", "SCAN_66x33.PNG", "gray_59x31.TIFF",
                             "mixed_50x50.Jpeg"]]
    bucket = s3_images.split("/")[2]
    s3_server.put(bucket, "photos/lists/m.txt",
                  b"# relative to the manifest\n../street/rgb_200x120.png\n"
                  b"s3://other/x.jpg\n/local/y.jpg\n")
    assert _rows(list_inputs(f"{s3_images}/lists/m.txt")) == [
        ("../street/rgb_200x120.png", f"{s3_images}/street/rgb_200x120.png"),
        ("/local/y.jpg", "/local/y.jpg"), ("s3://other/x.jpg", "s3://other/x.jpg")]
    s3_server.put(bucket, "photos/lists/m.csv", b"image_id,uri\nred,../colors/pure_red.png\n")
    assert _rows(list_inputs(f"{s3_images}/lists/m.csv")) == [
        ("red", f"{s3_images}/colors/pure_red.png")]


def test_s3_errors(s3_server, s3_bucket):
    assert _error(f"s3://{s3_bucket}/nothing") == (
        f"input s3://{s3_bucket}/nothing: no such file or directory; give an existing "
        "directory, a glob (e.g. 'photos/**/*.jpg') or a manifest (.txt, .csv, .parquet)")
    s3_server.put(s3_bucket, "docs/readme.md", b"hi")
    assert _error(f"s3://{s3_bucket}/docs").startswith(
        f"input s3://{s3_bucket}/docs: no images in this directory or its subfolders")
    assert _error("s3://*/x.jpg") == "input s3://*/x.jpg: the bucket name cannot hold a wildcard"


def test_s3_read_bytes(s3_images, images):
    uri = f"{s3_images}/street/photo_200x120.jpg"
    assert read_bytes(uri) == (images / "street/photo_200x120.jpg").read_bytes()
    with pytest.raises(ReadError) as info:
        read_bytes(f"{s3_images}/street/missing.jpg", backoff=0)
    assert str(info.value) == (f"{s3_images}/street/missing.jpg: could not read (no such file; "
                               "1 attempt, permanent error, not retried)")


def test_s3_transient_faults_are_retried(s3_images, flaky_fs):
    s3, _ = resolve(s3_images)
    fs, handler = flaky_fs(2, base=s3)
    uri = f"{s3_images}/colors/pure_red.png"
    assert read_bytes(uri, filesystem=fs, backoff=0) == read_bytes(uri)
    assert handler.opens(uri[len("s3://"):]) == 3


# -- read_bytes ------------------------------------------------------------------------------
def test_read_bytes_local(images):
    path = images / "rgb_64x64.png"
    assert read_bytes(str(path)) == path.read_bytes()
    assert read_bytes(f"file://{path}") == path.read_bytes()
    assert read_bytes(str(images / "bad/empty.jpg")) == b""


def test_permanent_errors_are_not_retried(images, flaky_fs):
    missing = f"{images}/nope.jpg"
    with pytest.raises(ReadError) as info:
        read_bytes(missing, retries=5, backoff=10)  # would take minutes if retried
    error = info.value
    assert str(error) == (
        f"{missing}: could not read (no such file; 1 attempt, permanent error, not retried)")
    assert (error.attempts, error.transient, error.uri) == (1, False, missing)
    assert isinstance(error.__cause__, FileNotFoundError) and isinstance(error, OSError)
    with pytest.raises(ReadError, match=r"\(is a directory; 1 attempt, permanent"):
        read_bytes(str(images), backoff=10)
    fs, handler = flaky_fs(3, error=PermissionError)
    with pytest.raises(ReadError) as info:
        read_bytes(f"{images}/rgb_64x64.png", filesystem=fs, backoff=10)
    assert "(permission denied; 1 attempt, permanent error, not retried)" in str(info.value)
    assert handler.opens(f"{images}/rgb_64x64.png") == 1
    with pytest.raises(ReadError, match=r"unsupported scheme 'ftp://'"):
        read_bytes("ftp://b/k")


@pytest.mark.parametrize("fail_first, retries, attempts", [(0, 3, 1), (1, 3, 2), (3, 3, 4),
                                                            (2, 2, 3)])
def test_transient_faults_are_retried_until_ok(images, flaky_fs, fail_first, retries, attempts):
    path = images / "colors" / "pure_red.png"
    fs, handler = flaky_fs(fail_first)
    assert read_bytes(str(path), retries=retries, backoff=0, filesystem=fs) == path.read_bytes()
    assert handler.opens(str(path)) == attempts


def test_transient_faults_give_up_after_retries(images, flaky_fs):
    path = images / "colors" / "pure_red.png"
    fs, handler = flaky_fs(10, error=TimeoutError)
    with pytest.raises(ReadError) as info:
        read_bytes(str(path), retries=3, backoff=0, filesystem=fs)
    assert str(info.value) == (
        f"{path}: could not read (TimeoutError: injected fault 4/10 opening {path}; "
        "4 attempts, transient error, retries exhausted)")
    assert (info.value.attempts, info.value.transient) == (4, True)
    assert handler.opens(str(path)) == 4
    fs, handler = flaky_fs(10)
    with pytest.raises(ReadError, match=r"; 1 attempt, transient error, retries exhausted\)$"):
        read_bytes(str(path), retries=0, filesystem=fs)


def test_backoff_grows_with_jitter(images, flaky_fs):
    fs, _ = flaky_fs(2)
    start = time.perf_counter()
    read_bytes(str(images / "rgb_64x64.png"), retries=2, backoff=0.05, filesystem=fs)
    elapsed = time.perf_counter() - start
    # 0.05 * (1 + 2) seconds, each wait scaled by 0.5..1.5
    assert 0.07 <= elapsed < 1.0, elapsed


def test_flaky_handler_shares_counts_through_a_state_dir(images, tmp_path):
    path = str(images / "rgb_64x64.png")
    handler = FlakyHandler(2, state_dir=str(tmp_path))
    fs = pafs.PyFileSystem(handler)
    with pytest.raises(ConnectionResetError):
        fs.open_input_stream(path)
    copy = pickle.loads(pickle.dumps(fs))  # as a Ray worker would receive it
    with pytest.raises(ConnectionResetError):
        copy.open_input_stream(path)
    assert copy.open_input_stream(path).read() == Path(path).read_bytes()
    assert handler.opens(path) == 3
    assert fs.get_file_info(path).size == os.path.getsize(path)  # the rest passes through


def test_read_error_pickles():
    error = ReadError("s3://b/k.jpg", "ConnectionResetError: reset", 4, True)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ReadError and str(again) == str(error)
    assert (again.uri, again.reason, again.attempts, again.transient) == (
        "s3://b/k.jpg", "ConnectionResetError: reset", 4, True)


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError("reset"), True),
    (ConnectionRefusedError(), True),
    (BrokenPipeError(), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.ECONNRESET, "Connection reset by peer"), True),
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError("When reading information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION "
             "during HeadObject operation: curlCode: 28, Timeout was reached"), True),
    (OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request "
             "rate."), True),
    (OSError("AWS Error THROTTLING during GetObject operation: Rate exceeded"), True),
    (OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Service "
             "Unavailable"), True),
    (OSError("AWS Error UNKNOWN (HTTP status 500) during GetObject operation: oops"), True),
    (OSError("AWS Error UNKNOWN (HTTP status 429) during GetObject operation: "), True),
    (OSError("Unexpected EOF while reading the response body"), True),
    (OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"), False),
    (OSError("AWS Error UNKNOWN (HTTP status 403) during GetObject operation: Forbidden"),
     False),
    (OSError("AWS Error UNKNOWN (HTTP status 400) during GetObject operation: connection"),
     False),
    (OSError("Cannot open for reading: path '/data' is a directory"), False),
    (OSError("Not a regular file: 'bucket'"), False),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), False),
    (OSError(errno.ENAMETOOLONG, "File name too long"), False),
    (ValueError("timeout"), False),
    (pa.ArrowInvalid("Expected an S3 object path"), False),
    (ReadError("u", "r", 4, True), True),
    (ReadError("u", "r", 1, False), False),
])
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient



def test_relative_s3_manifest_uris_stay_in_the_manifests_bucket(s3_server, s3_images):
    """`../../otherbucket/x.png` in s3://bucket/a/m.txt would resolve into another bucket:
    it becomes an error row (never read), while relative URIs inside the bucket resolve."""
    bucket = s3_images.split("/")[2]
    s3_server.put(bucket, "photos/lists/escape.txt",
                  b"../street/rgb_200x120.png\n../../../otherbucket/x.png\n../../../../x.png\n")
    table = list_inputs(f"{s3_images}/lists/escape.txt")
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert rows["../street/rgb_200x120.png"]["error"] is None
    assert rows["../../../otherbucket/x.png"]["error"] == (
        f"relative URI ../../../otherbucket/x.png leaves the manifest's bucket {bucket}; write "
        "the full s3:// URI to read from another bucket")
    assert "leaves the manifest's bucket" in rows["../../../../x.png"]["error"]
