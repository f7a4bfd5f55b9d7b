"""Closed by default: `submit`, `logs`, `stop`, `status ID` and `list` refuse a Ray cluster
that does not check tokens unless the user says `--insecure`.

The cluster here is a loopback HTTP server answering the three requests these commands
make of an open Ray 2.60 dashboard, in Ray's own shapes (`GET /api/authentication_mode`
-> ``{"authentication_mode": "disabled"}`` as ray/dashboard/http_server_head.py answers
it, `/api/version`, `/api/jobs/`). tests/e2e/test_cluster.py asks a real `ray start` head
with token authentication the same question.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.cli import cli


class OpenDashboard(BaseHTTPRequestHandler):
    """An open cluster's dashboard (or, with `mode` None, an older one without the mode endpoint)."""

    mode: str | None = "disabled"
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/authentication_mode" and self.mode is not None:
            body = {"authentication_mode": self.mode}
        elif self.path == "/api/version":
            import ray

            body = {"version": "4", "ray_version": ray.__version__, "ray_commit": "0" * 40}
        elif self.path == "/api/jobs/":
            body = []
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["disabled", None], ids=["ray-2.60", "older-ray"])
def open_cluster(request):
    handler = type("Handler", (OpenDashboard,), {"mode": request.param, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler.seen
    server.shutdown()
    server.server_close()


def test_a_cluster_without_tokens_is_refused_unless_insecure(open_cluster, cli_runner, tmp_path):
    url, seen = open_cluster
    env = {"RAY_ADDRESS": url, "RAY_AUTH_TOKEN": "a-secret-token", "RAY_AUTH_MODE": None,
           "RAY_AUTH_TOKEN_PATH": None}
    refusal = (f"error: the Ray cluster at {url} does not check tokens (authentication mode: disabled): "
               "anyone who reaches it can run any command on it. Start it with token authentication "
               "(RAY_AUTH_MODE=token, or authOptions mode token on KubeRay; docs/clusters.md), or pass "
               "--insecure if it is protected some other way")
    for args in (["list"], ["logs", "drn-label-x"], ["stop", "drn-label-x"], ["status", "drn-label-x"],
                 ["submit", str(tmp_path), str(tmp_path / "out"), "--num-classes", "3"]):
        res = cli_runner.invoke(cli, args, env=env)
        assert res.exit_code == 1, (args, res.output)
        assert res.output.strip() == refusal, args
    assert all(path in ("/api/authentication_mode", "/api/version") for path, _ in seen), seen

    # In a process of its own, as a user runs it: Ray's client caches whether token auth is
    # on at its first look, and an earlier test in this process may have turned it on.
    fresh = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    fresh.update(RAY_ADDRESS=url, RAY_AUTH_TOKEN="a-secret-token")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "list", "--insecure"], env=fresh,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"no drn-label jobs on the Ray cluster at {url}"
    assert ("/api/jobs/", None) in seen
    assert {auth for _, auth in seen} == {None}, "a cluster that ignores tokens is sent none"
