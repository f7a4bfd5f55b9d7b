"""A local S3-compatible server over real HTTP (moto), and storage-level fault injection.

Fixtures (register with ``pytest_plugins = ["tests.s3server"]`` in conftest.py):

- ``s3_server`` (session): starts moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free
  port) the first time a test asks for it, and sets AWS_ENDPOINT_URL_S3,
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_DEFAULT_REGION,
  AWS_EC2_METADATA_DISABLED) in ``os.environ`` for the rest of the session, restoring
  them at the end. Ray workers copy the driver's environment when Ray starts, so
  ``s3_server`` must be instantiated before the session's ``ray.init``: a test (or
  fixture) that needs both must request ``s3_server`` first.
- ``s3_bucket``: a fresh, empty bucket for one test; its name.
- ``flaky_fs``: a factory of filesystems that fail the first N opens of each file.

``FlakyHandler`` is plain code, usable outside pytest (e.g. in Ray workers: it pickles,
and with ``state_dir`` its counts are shared between processes).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs
import pytest

__all__ = ["FlakyHandler", "S3Server", "flaky_fs", "s3_bucket", "s3_server"]

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables that would point the SDK elsewhere; removed while the server runs.
_CLEARED = ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


@dataclass
class S3Server:
    """A running moto server: its endpoint and a few boto3 helpers."""

    endpoint_url: str
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when none is given); returns its name."""
        name = name or f"bucket-{next(self._names)}"
        client = self.client
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def upload_tree(self, root: Path, bucket: str, prefix: str = "") -> str:
        """Upload every file under `root` to s3://bucket/prefix/<relative path>."""
        client = self.client
        prefix = prefix.strip("/")
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                key = "/".join(filter(None, [prefix, path.relative_to(root).as_posix()]))
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                       Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, *_CLEARED, "AWS_ENDPOINT_URL_S3")}
    for key in _CLEARED:
        os.environ.pop(key, None)
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    try:
        yield S3Server(endpoint_url=endpoint)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new empty bucket for this test."""
    return s3_server.make_bucket()


class FlakyHandler(pafs.FileSystemHandler):
    """Wraps a real filesystem; the first `fail_first` opens for reading of each path
    raise `error` (default ConnectionResetError), later ones succeed.

    `paths`, when given, limits the faults to those paths (pyarrow paths: absolute local
    paths or bucket/key). Counts live in memory, or with `state_dir` in small files there,
    so that several processes (Ray workers) share them. `opens(path)` says how many opens
    of `path` were attempted. Use as ``pyarrow.fs.PyFileSystem(FlakyHandler(...))``.
    """

    def __init__(self, fail_first: int = 1, *, base: pafs.FileSystem | None = None,
                 error: Callable[[str], BaseException] | type[BaseException] | None = None,
                 paths: list[str] | None = None, state_dir: str | None = None) -> None:
        self.fail_first = fail_first
        self.base = base or pafs.LocalFileSystem()
        self.error = error or ConnectionResetError
        self.paths = None if paths is None else frozenset(paths)
        self.state_dir = state_dir
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- the fault ----------------------------------------------------------------------
    def _counter(self, path: str) -> Path:
        return Path(self.state_dir) / hashlib.sha256(path.encode()).hexdigest()

    def opens(self, path: str) -> int:
        if self.state_dir is None:
            return self._counts.get(path, 0)
        counter = self._counter(path)
        return int(counter.read_text()) if counter.exists() else 0

    def _open(self, path: str) -> None:
        with self._lock:
            count = self.opens(path) + 1
            if self.state_dir is None:
                self._counts[path] = count
            else:
                tmp = self._counter(path).with_suffix(f".{os.getpid()}")
                tmp.write_text(str(count))
                tmp.replace(self._counter(path))
        if count <= self.fail_first and (self.paths is None or path in self.paths):
            raise self.error(f"injected fault {count}/{self.fail_first} opening {path}")

    def open_input_stream(self, path: str):
        self._open(path)
        return self.base.open_input_stream(path)

    def open_input_file(self, path: str):
        self._open(path)
        return self.base.open_input_file(path)

    # -- everything else goes straight to the wrapped filesystem -------------------------
    def get_type_name(self) -> str:
        return f"flaky+{self.base.type_name}"

    def equals(self, other) -> bool:
        return self is other

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.base.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.base.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.base.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.base.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.base.copy_file(src, dest)

    def open_output_stream(self, path: str, metadata):
        return self.base.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.base.open_append_stream(path, metadata=metadata)


@pytest.fixture
def flaky_fs() -> Callable[..., tuple[pafs.FileSystem, FlakyHandler]]:
    """``flaky_fs(fail_first=2, base=None, error=None, paths=None, state_dir=None)`` ->
    (``PyFileSystem``, its ``FlakyHandler``), see FlakyHandler."""

    def make(fail_first: int = 1, **kwargs) -> tuple[pafs.FileSystem, FlakyHandler]:
        handler = FlakyHandler(fail_first, **kwargs)
        return pafs.PyFileSystem(handler), handler

    return make
