"""A loopback HTTP server standing in for the Hugging Face Hub (for ``HF_ENDPOINT``).

It answers what ``huggingface_hub.hf_hub_download`` asks: ``HEAD`` and ``GET
/<owner>/<repo>/resolve/<revision>/<path>`` with the ``X-Repo-Commit`` and ``ETag``
headers the Hub sends, and 404 with the Hub's ``X-Error-Code`` for unknown files.
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HubServer"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # (repo id, path) -> bytes
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, body_too: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                data = None
                if len(parts) >= 5 and parts[2] == "resolve":
                    data = hub.files.get((f"{parts[0]}/{parts[1]}", "/".join(parts[4:])))
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body_too:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(body_too=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body_too=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, repo_id: str, path: str, data: bytes) -> None:
        self.files[(repo_id, path)] = data

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
