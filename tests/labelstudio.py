"""A real Label Studio server on loopback, for the push test.

label-studio pins older numpy, pyarrow and OpenCV than the pipeline needs, so it lives in
its own virtualenv, created on first use under ``$DRN_LABEL_TEST_CACHE`` (default
``~/.cache/drn-label-tests``) with ``pip install label-studio==1.23.2`` (a few minutes,
once), and the test talks to it over HTTP only. The fixture starts it on 127.0.0.1 with an
SQLite database in a temporary folder and no version check (about 25 s on an idle machine,
longer on a busy one), signs in as the user it created, and makes a personal access token
through Label Studio's own API, as a user would in its settings page.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["LabelStudio", "label_studio"]

VERSION = "1.23.2"
EMAIL, PASSWORD = "tester@example.com", "drn-label-test-pass"


@dataclass
class LabelStudio:
    url: str
    token: str  # a personal access token (JWT refresh token)

    def api(self):
        """A requests session authorised with a short-lived access token."""
        import requests

        access = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token},
                               timeout=60).json()["access"]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {access}"
        return session


def _venv() -> Path:
    root = Path(os.environ.get("DRN_LABEL_TEST_CACHE") or Path.home() / ".cache" / "drn-label-tests")
    venv = root / "label-studio-venv"
    exe = venv / "bin" / "label-studio"
    if not exe.exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"label-studio=={VERSION}"],
                       check=True, timeout=1800)
    return exe


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sign_in_and_make_token(url: str) -> str:
    import requests

    session = requests.Session()
    session.get(f"{url}/user/login/", timeout=60)
    response = session.post(f"{url}/user/login/", timeout=60, allow_redirects=False,
                            data={"email": EMAIL, "password": PASSWORD,
                                  "csrfmiddlewaretoken": session.cookies.get("csrftoken")},
                            headers={"Referer": f"{url}/user/login/"})
    assert response.status_code == 302, f"sign-in failed: HTTP {response.status_code}"
    response = session.post(f"{url}/api/token/", timeout=60,
                            headers={"X-CSRFToken": session.cookies.get("csrftoken"),
                                     "Referer": f"{url}/"})
    assert response.status_code == 201, response.text[:300]
    return response.json()["token"]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    import requests

    exe = _venv()
    port = _free_port()
    data = tmp_path_factory.mktemp("label-studio")
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "DJANGO_DB": "sqlite",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false"}
    for key in ("PYTHONPATH", "LABEL_STUDIO_API_KEY"):
        env.pop(key, None)
    log = (data / "server.log").open("w")
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--host", "127.0.0.1",
                             "--port", str(port), "--username", EMAIL, "--password", PASSWORD],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # first start migrates a new database
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"label-studio exited ({proc.returncode}); see {data}/server.log")
            try:
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"label-studio did not answer on {url}; see {data}/server.log")
            time.sleep(1)
        yield LabelStudio(url=url, token=_sign_in_and_make_token(url))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
