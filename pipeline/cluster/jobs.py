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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import click

from pipeline import spec as specmod

__all__ = ["ClusterError", "auth_headers", "connect", "dashboard_url", "list_jobs", "logs",
           "print_status", "register", "stop", "submit_command", "submit_spec"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0
SPEC_FILE = "job.toml"
ENTRYPOINT = f"drn-label run --job {SPEC_FILE}"
EXIT_INTERRUPTED = 130
TOKEN_HINT = "set RAY_AUTH_TOKEN (or the token file ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) to the cluster's token"


class ClusterError(click.ClickException):
    """A cluster that cannot be used; printed as one `error:` line, exit code 1."""

    def show(self, file=None) -> None:  # noqa: D102 - same shape as `run`'s errors
        click.echo(f"error: {self.format_message()}", err=True, file=file)


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


def _reason(exc: BaseException) -> str:
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


def probe(url: str, headers: dict[str, str]) -> str:
    """Ask the dashboard for its Ray version (an authenticated call) within CONNECT_TIMEOUT_S."""
    import requests

    try:
        response = requests.get(f"{url}/api/version", headers=headers,
                                timeout=(CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S))
    except requests.exceptions.Timeout:
        raise _unreachable(url, f"no answer within {CONNECT_TIMEOUT_S:.0f} s") from None
    except requests.exceptions.ConnectionError as exc:
        raise _unreachable(url, _reason(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise ClusterError(f"{url} is not a usable address: {_reason(exc)}; check --address / "
                           f"RAY_ADDRESS") from None
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
        raise _unreachable(url, _reason(exc)) from None
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if job_id and "status code 404" in text:
            raise ClusterError(f"no job {job_id} on the Ray cluster at {url}; `drn-label list` "
                               f"shows its jobs") from None
        raise ClusterError(f"the Ray cluster at {url}: {text[:300]}") from None


def connect(address: str | None):
    """(JobSubmissionClient, dashboard URL), or a ClusterError within about 10 seconds."""
    url = dashboard_url(address)
    headers = auth_headers()
    probe(url, headers)
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(url):
        return JobSubmissionClient(url, headers=headers), url


# -- submitting ------------------------------------------------------------------------------
def _absolute(value: str | None, *, must_exist: bool = False) -> str | None:
    if not value or "://" in value:
        return value
    if must_exist and not os.path.exists(value):
        return value  # a preset name (classes = "cityscapes"), not a path
    return os.path.abspath(value)


def shipped_spec(spec: specmod.JobSpec) -> specmod.JobSpec:
    """The spec as the cluster runs it: local paths absolute, no client-side address."""
    return spec.replace(input=_absolute(spec.input), output=_absolute(spec.output),
                        weights=_absolute(spec.weights, must_exist=True),
                        classes=_absolute(spec.classes, must_exist=True), address=None)


def new_submission_id() -> str:
    return f"drn-label-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def submit_spec(client, url: str, spec: specmod.JobSpec, *, env: dict[str, str] | None = None) -> str:
    """Submit `spec` as `drn-label run --job job.toml`; returns the submission id."""
    from pipeline.schedule import job_metadata, spec_toml

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


def _status(info) -> str:
    status = info.status
    return getattr(status, "value", str(status))


def wait_for(client, url: str, job_id: str, *, echo_states: bool = True):
    """Poll until the job ends; report each state change on stderr. Returns its JobInfo."""
    last = None
    while True:
        with cluster_errors(url, job_id):
            info = client.get_job_info(job_id)
        state = _status(info)
        if echo_states and state != last:
            click.echo(f"{job_id}: {state}", err=True)
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
    if _status(info) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and 0 < code < 128 else 1


def _finish(info, job_id: str) -> None:
    code = exit_code_for(info)
    state = _status(info)
    if code == 0:
        click.echo(f"{job_id} SUCCEEDED", err=True)
        return
    reason = failure_reason(info)
    click.echo(f"error: job {job_id} {state}{': ' + reason if reason else ''}; "
               f"`drn-label logs {job_id}` shows more", err=True)
    sys.exit(code)


def _interrupted(job_id: str) -> None:
    click.echo(f"\n{job_id} keeps running on the cluster; `drn-label stop {job_id}` stops it", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


def submit_command() -> click.Command:
    """`submit`, with every option of `run` (defined in pipeline.cli, which calls `register`)."""
    from pipeline.cli import run_options, spec_from_cli

    @click.command("submit")
    @click.argument("input_", metavar="INPUT", required=False)
    @click.argument("output", required=False)
    @run_options
    @click.option("--wait", is_flag=True,
                  help="Wait for the job to end; exit 0 only when it SUCCEEDED.")
    @click.option("--follow", is_flag=True, help="Stream the job's logs until it ends (implies --wait).")
    @click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
                  help="An environment variable for the job on the cluster (repeatable).")
    def submit(input_, output, job_file, wait, follow, env_pairs, **options) -> None:
        """Run a labelling job on a Ray cluster (the Ray Jobs API); print its submission id.

        Takes what `run` takes: a --job spec and/or INPUT OUTPUT and flags. INPUT, OUTPUT and
        weights must be where the cluster can read them (s3://, http(s)://, or a shared
        path). --address (or RAY_ADDRESS) is the dashboard, http://HOST:8265.

        \b
        With --wait/--follow the exit code is 0 when the job SUCCEEDED, else the
        driver's (3: error rate above --max-error-rate, 4: OUTPUT leased by another
        run) or 1.
        """
        env = _parse_env(env_pairs)
        spec = spec_from_cli(input_, output, job_file, **options)
        client, url = connect(spec.address)
        job_id = submit_spec(client, url, spec, env=env)
        click.echo(job_id)
        if not (wait or follow):
            click.echo(f"follow it: drn-label logs {job_id} --follow   (status: drn-label status "
                       f"{job_id}; stop: drn-label stop {job_id})", err=True)
            return
        try:
            if follow:
                follow_logs(client, url, job_id)
            info = wait_for(client, url, job_id, echo_states=not follow)
        except KeyboardInterrupt:
            _interrupted(job_id)
        _finish(info, job_id)

    return submit


# -- following ---------------------------------------------------------------------------------
address_option = click.option(
    "--address", default=None, envvar="RAY_ADDRESS",
    help="Ray dashboard, http://HOST:8265 [env: RAY_ADDRESS].")


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = max(0, int((end - info.start_time) / 1000))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _progress_line(info) -> str | None:
    output = (info.metadata or {}).get("drn_label_output")
    if not output:
        return None
    from pipeline.inspect import read_progress

    try:
        progress = read_progress(output)
    except Exception as exc:  # noqa: BLE001 - any storage error: say so, the state still counts
        return f"progress:   cannot read {output}/_progress.json from here ({_reason(exc)})"
    if progress is None:
        return "progress:   none yet (the run has not started labelling)"
    p = progress
    line = (f"progress:   {p.get('state')} run {p.get('run_id')}: {p.get('labelled', 0)}/{p.get('total', 0)} "
            f"labelled ({p.get('labelled_ok', 0)} ok, {p.get('labelled_errors', 0)} errors), "
            f"{p.get('committed', 0)} committed, {p.get('skipped', 0)} already labelled, "
            f"{p.get('images_per_s') or 0:.1f} images/s")
    if p.get("eta_s") and p.get("state") == "running":
        line += f", ETA {p['eta_s']:.0f}s"
    try:
        started = datetime.fromisoformat(p["started_at"]).timestamp() * 1000
        if info.start_time and started < info.start_time - 5000:
            line += " (an earlier run's: this job has not written progress yet)"
    except (KeyError, TypeError, ValueError):
        pass
    return line


def print_status(job_id: str, address: str | None) -> None:
    """The job's state, times and OUTPUT, plus the run's progress where OUTPUT is readable."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise ClusterError(f"{job_id} is no OUTPUT here, and there is no Ray cluster to ask for a job "
                           f"of that id: pass --address http://HOST:8265 or set RAY_ADDRESS")
    client, url = connect(address)
    with cluster_errors(url, job_id):
        info = client.get_job_info(job_id)
    meta = info.metadata or {}
    click.echo(f"{job_id}: {_status(info)}")
    if info.message:
        click.echo(f"message:    {failure_reason(info)}")
    click.echo(f"started:    {_when(info.start_time)}")
    if info.end_time:
        click.echo(f"ended:      {_when(info.end_time)}")
    click.echo(f"duration:   {_duration(info)}")
    click.echo(f"entrypoint: {info.entrypoint}")
    if getattr(info, "driver_exit_code", None) is not None:
        click.echo(f"exit code:  {info.driver_exit_code}")
    for key in ("drn_label_input", "drn_label_output", "drn_label_model", "drn_label_spec"):
        if meta.get(key):
            click.echo(f"{key[len('drn_label_'):] + ':':<11} {meta[key]}")
    line = _progress_line(info)
    if line:
        click.echo(line)


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@address_option
def logs(job_id: str, follow: bool, address: str | None) -> None:
    """Print the logs of submitted job ID (its driver's stdout and stderr)."""
    client, url = connect(address)
    if follow:
        try:
            follow_logs(client, url, job_id)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        return
    with cluster_errors(url, job_id):
        text = client.get_job_logs(job_id)
    sys.stdout.write(text)


@click.command()
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the job to reach STOPPED.")
@click.option("--no-wait", is_flag=True, help="Ask the job to stop and return at once.")
@address_option
def stop(job_id: str, timeout: float, no_wait: bool, address: str | None) -> None:
    """Stop submitted job ID and wait until it is STOPPED.

    The labels it committed stay; rerunning the same spec labels only the rest.
    """
    client, url = connect(address)
    with cluster_errors(url, job_id):
        info = client.get_job_info(job_id)
        if _status(info) in TERMINAL:
            click.echo(f"{job_id} already {_status(info)}: nothing to stop")
            return
        client.stop_job(job_id)
    deadline = time.monotonic() + (0 if no_wait else timeout)
    while True:
        with cluster_errors(url, job_id):
            state = _status(client.get_job_info(job_id))
        if state in TERMINAL:
            suffix = "" if state == "STOPPED" else " (it ended before the stop took effect)"
            click.echo(f"{job_id}: {state}{suffix}")
            return
        if time.monotonic() >= deadline:
            click.echo(f"{job_id} is stopping (still {state}); `drn-label status {job_id}` "
                       f"shows when it has stopped")
            return
        time.sleep(POLL_S / 2)


@click.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also list jobs that drn-label did not submit.")
@address_option
def list_jobs(show_all: bool, address: str | None) -> None:
    """List the jobs submitted to the cluster, oldest first."""
    client, url = connect(address)
    with cluster_errors(url):
        jobs = client.list_jobs()
    rows = []
    for job in jobs:
        if not job.submission_id:
            continue  # a driver that connected by itself, not a submitted job
        meta = job.metadata or {}
        if not show_all and "drn_label_output" not in meta:
            continue
        rows.append((job.start_time or 0, job.submission_id, _status(job), _when(job.start_time),
                     _duration(job), meta.get("drn_label_output", "-")))
    if not rows:
        click.echo(f"no {'' if show_all else 'drn-label '}jobs on the Ray cluster at {url}")
        return
    rows.sort()
    widths = [max(len(r[i]) for r in rows + [(0, "ID", "STATUS", "STARTED", "DURATION", "OUTPUT")])
              for i in range(1, 5)]
    header = ("ID", "STATUS", "STARTED", "DURATION")
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  OUTPUT")
    for row in rows:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row[1:5], widths)) + f"  {row[5]}")


def register(group: click.Group) -> None:
    """Add submit, logs, stop and list to `group` (pipeline.cli calls this once `run_options` exists)."""
    for command in (submit_command(), logs, stop, list_jobs):
        group.add_command(command)
