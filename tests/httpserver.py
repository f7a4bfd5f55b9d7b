"""A loopback HTTP server that serves images the way the web does: throttling, failing,
hanging and serving bad bytes. Real sockets and real HTTP (http.server), no mocks.

Paths (``NAME`` is a file registered with `ImageServer.add`):
- ``/ok/NAME``: 200 with the bytes;
- ``/throttle/K/NAME``: 429 (``Retry-After: 0``) to the first K requests of that path, then 200;
- ``/flaky/K/NAME``: 503 to the first K requests, then 200;
- ``/status/CODE/NAME``: always CODE;
- ``/hang/SECONDS/NAME``: waits, then 200 (for timeouts);
- ``/slow/NAME``: 200 after 0.2 s (to observe how many requests overlap per host).
`hits` counts requests per path; `max_in_flight` is the most requests served at once.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

__all__ = ["ImageServer", "image_server"]


class ImageServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with server._lock:
                    server.hits[self.path] += 1
                    count = server.hits[self.path]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._answer(self, count)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def _answer(self, h: BaseHTTPRequestHandler, count: int) -> None:
        parts = h.path.split("?", 1)[0].strip("/").split("/")
        kind, name = parts[0], parts[-1]
        status, headers = 200, {}
        if kind == "throttle" and count <= int(parts[1]):
            status, headers = 429, {"Retry-After": "0"}
        elif kind == "flaky" and count <= int(parts[1]):
            status = 503
        elif kind == "status":
            status = int(parts[1])
        elif kind == "hang":
            time.sleep(float(parts[1]))
        elif kind == "slow":
            time.sleep(0.2)
        body = self.files.get(name) if status == 200 else b"no"
        if body is None:
            status, body = 404, b"not found"
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer().start()
    yield server
    server.stop()
