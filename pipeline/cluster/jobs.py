"""Submit labelling jobs to a Ray cluster and follow them, through the Ray Jobs API.

`submit` takes exactly what `run` takes (a --job spec and/or flags), writes the merged
spec as the only file of the job's working_dir (``job.toml``) and runs
``drn-label run --job job.toml`` on the cluster: a spec means the same thing on a laptop
and on a cluster. The job's metadata names its OUTPUT, so `status ID` can show the run's
progress. The cluster is the dashboard address: --address or RAY_ADDRESS
(``http://HOST:8265``).

Token authentication (Ray >= 2.52; in 2.60 `ray.init()` turns it on for the clusters it
starts, and `ray start --head` when a token exists): the client sends ``Authorization: Bearer <token>`` exactly as Ray's own clients
do, with the token that Ray's own loader finds: ``RAY_AUTH_TOKEN``, else the file named
by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. As `ray start` does, token mode is
switched on when a token is found and ``RAY_AUTH_MODE`` is unset; ``RAY_AUTH_MODE=disabled``
sends none. Every command first asks the dashboard for its version with a timeout, so an
unreachable address or a refused token is one clear error within seconds.

Closed by default: before anything else every command asks the cluster, without
credentials, whether it checks tokens (``GET /api/authentication_mode``, public in Ray >=
2.52; older dashboards: whether ``/api/version`` answers a caller without a token). A
cluster that does not would run any entrypoint from anyone who reaches its dashboard, so
the command refuses it unless the user passes ``insecure`` (``--insecure``: the cluster is
protected some other way), and then sends it no token.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline import spec as specmod
from pipeline.cluster.manifests import job_metadata, shipped_spec, spec_toml
from pipeline.errors import DrnLabelError

__all__ = ["ClusterError", "auth_headers", "authentication_mode", "connect", "dashboard_url",
           "exit_code_for", "failure_reason", "follow_logs", "job_state", "submit_spec", "wait_for"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0
SPEC_FILE = "job.toml"
ENTRYPOINT = f"drn-label run --job {SPEC_FILE}"
EXIT_INTERRUPTED = 130
TOKEN_HINT = "set RAY_AUTH_TOKEN (or the token file ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) to the cluster's token"


class ClusterError(DrnLabelError):
    """A cluster that cannot be used; printed as one `error:` line, exit code 1."""


# -- connecting -------------------------------------------------------------------------------
def dashboard_url(address: str | None) -> str:
    """http(s)://HOST:PORT of the Ray dashboard, from --address or RAY_ADDRESS."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address:
        raise ClusterError("no Ray cluster given: pass --address http://HOST:8265 or set RAY_ADDRESS "
                           "(the dashboard address)")
    if address.startswith("ray://"):
        raise ClusterError(f"{address} is a Ray Client address; jobs go through the dashboard: "
                           f"--address http://HOST:8265")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


# Loggers that Ray sets to INFO when imported: upload and websocket chatter of the Jobs client.
_RAY_LOGGERS = ("ray", "ray.data", "ray.dashboard.modules.dashboard_sdk",
                "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging")


def _import_ray_quietly() -> None:
    """Import the Jobs client, then keep Ray's loggers as quiet as the CLI asked (-v or not)."""
    import ray.job_submission  # noqa: F401

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        for name in _RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def auth_headers() -> dict[str, str]:
    """The Authorization header Ray's own HTTP clients send, with the token Ray's loader finds."""
    _import_ray_quietly()
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled)
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray that moved these helpers: same lookup, by hand
        return _auth_headers_by_hand()
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        return dict(get_auth_headers_if_auth_enabled({}))
    except AuthenticationError as exc:  # e.g. RAY_AUTH_TOKEN_PATH names a missing file
        raise ClusterError(f"cannot read the Ray token: {str(exc).split('. Note:')[0]}") from None


def _auth_headers_by_hand() -> dict[str, str]:
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"authorization": f"Bearer {token}"} if token else {}


def network_reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "unknown host"),
                           ("nodename nor servname", "unknown host"),
                           ("Temporary failure in name resolution", "unknown host"),
                           ("No route to host", "no route to host"),
                           ("Network is unreachable", "network unreachable"),
                           ("timed out", f"no answer within {CONNECT_TIMEOUT_S:.0f} s")):
        if needle in text:
            return reason
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _unreachable(url: str, reason: str) -> ClusterError:
    return ClusterError(f"cannot reach the Ray cluster at {url}: {reason}; check --address / RAY_ADDRESS")


def _auth_failure(url: str, status: int, body: str) -> ClusterError | None:
    body = " ".join(body.split())[:200]
    if status == 401:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            return ClusterError(f"the Ray cluster at {url} wants a token and RAY_AUTH_MODE=disabled "
                                f"sends none: unset RAY_AUTH_MODE and {TOKEN_HINT}")
        return ClusterError(f"the Ray cluster at {url} wants a token and none was found: {TOKEN_HINT}")
    if status == 403:
        return ClusterError(f"the Ray cluster at {url} refused the token: {body}; {TOKEN_HINT}")
    return None


def _get(url: str, path: str, headers: dict[str, str]):
    """GET url + path within CONNECT_TIMEOUT_S; network failures are one-line ClusterErrors."""
    import requests

    try:
        return requests.get(f"{url}{path}", headers=headers,
                            timeout=(CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S))
    except requests.exceptions.Timeout:
        raise _unreachable(url, f"no answer within {CONNECT_TIMEOUT_S:.0f} s") from None
    except requests.exceptions.ConnectionError as exc:
        raise _unreachable(url, network_reason(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise ClusterError(f"{url} is not a usable address: {network_reason(exc)}; check --address / "
                           f"RAY_ADDRESS") from None


def authentication_mode(url: str) -> str:
    """What the cluster asks of a caller, from a request without credentials: ``"token"``,
    or ``"disabled"`` (it answers anyone). Ray >= 2.52 says so itself
    (``/api/authentication_mode``, a public path); an older dashboard is asked for its
    version without a token."""
    response = _get(url, "/api/authentication_mode", {})
    if response.status_code == 200:
        try:
            return str(response.json()["authentication_mode"])
        except (ValueError, KeyError, TypeError):
            pass  # not Ray's answer: the version probe below says what it is
    response = _get(url, "/api/version", {})
    return "token" if response.status_code in (401, 403) else "disabled"


def refuse_open_cluster(url: str, mode: str) -> ClusterError:
    return ClusterError(
        f"the Ray cluster at {url} does not check tokens (authentication mode: {mode}): anyone "
        f"who reaches it can run any command on it. Start it with token authentication "
        f"(RAY_AUTH_MODE=token, or authOptions mode token on KubeRay; docs/clusters.md), or pass "
        f"--insecure if it is protected some other way")


def probe(url: str, headers: dict[str, str]) -> str:
    """Ask the dashboard for its Ray version (an authenticated call) within CONNECT_TIMEOUT_S."""
    response = _get(url, "/api/version", headers)
    failure = _auth_failure(url, response.status_code, response.text)
    if failure:
        raise failure
    try:
        version = response.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"{url} is not a Ray dashboard (GET /api/version answered HTTP "
                           f"{response.status_code}); check --address / RAY_ADDRESS: jobs go through "
                           f"the dashboard port, 8265 by default") from None
    return version


@contextlib.contextmanager
def cluster_errors(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs client's exceptions into one-line ClusterErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise ClusterError(f"the Ray cluster at {url} refused the token: "
                           f"{str(exc).splitlines()[0]}; {TOKEN_HINT}") from None
    except (requests.exceptions.ConnectionError, ConnectionError) as exc:
        raise _unreachable(url, network_reason(exc)) from None
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if job_id and "status code 404" in text:
            raise ClusterError(f"no job {job_id} on the Ray cluster at {url}; `drn-label list` "
                               f"shows its jobs") from None
        raise ClusterError(f"the Ray cluster at {url}: {text[:300]}") from None


def connect(address: str | None, *, insecure: bool = False):
    """(JobSubmissionClient, dashboard URL), or a ClusterError within about 10 seconds. A
    cluster that does not check tokens is refused unless `insecure` (module doc)."""
    url = dashboard_url(address)
    mode = authentication_mode(url)
    if mode != "token" and not insecure:
        raise refuse_open_cluster(url, mode)
    headers = auth_headers() if mode == "token" else {}  # no token for a cluster that ignores it
    probe(url, headers)
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(url):
        return JobSubmissionClient(url, headers=headers), url


# -- submitting ------------------------------------------------------------------------------
def new_submission_id() -> str:
    return f"drn-label-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def submit_spec(client, url: str, spec: specmod.JobSpec, *, env: dict[str, str] | None = None) -> str:
    """Submit `spec` as `drn-label run --job job.toml`; returns the submission id."""

    source = spec.source
    spec = shipped_spec(spec)
    metadata = job_metadata(spec)
    if source:
        metadata["drn_label_spec"] = os.path.basename(source)
    with tempfile.TemporaryDirectory(prefix="drn-label-submit-") as workdir:
        header = f"Submitted by drn-label from {source or 'command-line flags'}."
        Path(workdir, SPEC_FILE).write_text(spec_toml(spec, header=header))
        runtime_env: dict[str, Any] = {"working_dir": workdir}
        if env:
            runtime_env["env_vars"] = dict(env)
        with cluster_errors(url):
            return client.submit_job(entrypoint=ENTRYPOINT, runtime_env=runtime_env,
                                     submission_id=new_submission_id(), metadata=metadata)


def job_state(info) -> str:
    status = info.status
    return getattr(status, "value", str(status))


def wait_for(client, url: str, job_id: str, *, on_state: Callable[[str], None] | None = None):
    """Poll until the job ends, calling `on_state` with each new state. Returns its JobInfo."""
    last = None
    while True:
        with cluster_errors(url, job_id):
            info = client.get_job_info(job_id)
        state = job_state(info)
        if on_state is not None and state != last:
            on_state(state)
            last = state
        if state in TERMINAL:
            return info
        time.sleep(POLL_S)


def follow_logs(client, url: str, job_id: str) -> None:
    """Stream the job's logs to stdout until it ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with cluster_errors(url, job_id):
        asyncio.run(tail())


def failure_reason(info) -> str:
    """Ray's one-line message (without the log tail it appends) and the driver's last error line."""
    message = info.message or ""
    reason = " ".join(message.split(", last available logs")[0].split())
    errors = [line.strip() for line in message.splitlines() if line.strip().startswith("error:")]
    if errors:
        reason += f"; the run said: {errors[-1][len('error:'):].strip()}"
    return reason


def exit_code_for(info) -> int:
    """0 when SUCCEEDED; else the driver's own exit code (3: error rate, 4: OUTPUT leased) or 1."""
    if job_state(info) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 128 else 1


