"""A loopback HTTP server that serves images the way the web does: throttling, failing,
hanging and serving bad bytes. Real sockets and real HTTP (http.server), no mocks.

Paths (``NAME`` is a file registered with `ImageServer.add`):
- ``/ok/NAME``: 200 with the bytes;
- ``/throttle/K/NAME``: 429 (``Retry-After: 0``) to the first K requests of that path, then 200;
- ``/flaky/K/NAME``: 503 to the first K requests, then 200;
- ``/status/CODE/NAME``: always CODE;
- ``/hang/SECONDS/NAME``: waits, then 200 (for timeouts);
- ``/slow/NAME``: 200 after 0.2 s (to observe how many requests overlap per host);
- ``/drip/SECONDS/NAME``: 200 with the full Content-Length, then one body byte every
  SECONDS (a server that never quite stops sending);
- ``/notHTTP/NAME``: answers with a line that is not an HTTP status line, then closes;
- ``/redirect/K/NAME``: K redirects (302, relative Location) before ``/ok/NAME``;
- ``/to?url=URL``: one 302 to URL (any scheme, any host: it is never fetched by the
  server itself).
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
        from urllib.parse import parse_qs, urlsplit

        parts = h.path.split("?", 1)[0].strip("/").split("/")
        kind, name = parts[0], parts[-1]
        status, headers = 200, {}
        if kind == "notHTTP":
            h.wfile.write(b"HELLO THIS IS NOT HTTP\r\n\r\n")
            h.close_connection = True
            return
        if kind == "to":
            status, headers = 302, {"Location": parse_qs(urlsplit(h.path).query)["url"][0]}
        elif kind == "redirect" and int(parts[1]) > 0:
            status, headers = 302, {"Location": f"/redirect/{int(parts[1]) - 1}/{name}"}
        elif kind == "redirect":
            kind = "ok"
        if kind == "drip":
            self._drip(h, self.files.get(name, b"x" * 1000), float(parts[1]))
            return
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

    @staticmethod
    def _drip(h: BaseHTTPRequestHandler, body: bytes, interval: float) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            for k in range(len(body)):
                h.wfile.write(body[k:k + 1])
                h.wfile.flush()
                time.sleep(interval)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up: that is the point

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
