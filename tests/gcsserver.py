"""A local Google Cloud Storage emulator over real HTTP (gcp-storage-emulator, in memory).

``gcs_server`` (session) starts it on 127.0.0.1 (a free port) and sets
STORAGE_EMULATOR_HOST, the variable Google's clients (and `pipeline.store.fs`) use to find
an emulator, for the rest of the session. Like ``s3_server`` it must start before the
session's ``ray.init`` so that Ray workers inherit the variable (tests/conftest.py orders it).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["GcsServer", "gcs_server"]


@dataclass
class GcsServer:
    endpoint: str

    def make_bucket(self, name: str) -> str:
        """Create a bucket through the JSON API (pyarrow would need a project id)."""
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there
                raise
        return name

    def upload_tree(self, root: Path, bucket: str, prefix: str) -> str:
        from pipeline.store.fs import resolve

        fs, _ = resolve(f"gs://{bucket}")
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                with fs.open_output_stream(f"{bucket}/{prefix}/{path.relative_to(root).as_posix()}") as f:
                    f.write(path.read_bytes())
        return f"gs://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield GcsServer(endpoint=os.environ["STORAGE_EMULATOR_HOST"])
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        server.stop()
