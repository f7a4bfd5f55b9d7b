"""`drn-label submit/status/logs/list/stop` against a real Ray head on loopback, token auth on.

The module starts its own head with `ray start --head --block` in a new session and a
temp dir of its own, so it neither finds nor disturbs the session's `ray.init` Ray
(tests/conftest.py); the head's address and token go only to the CLI subprocesses, never
into this process's environment. At the end it stops exactly the processes of that
session, never `ray stop` (which would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import cli
from pipeline.store.output import SCHEMA, data_files

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc)")]

START_TIMEOUT_S = 90
FIRST_JOB_IMAGES = 5
LONG_JOB_IMAGES = 300


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _client_env() -> dict[str, str]:
    """This process's environment without any Ray address or token of its own."""
    return {k: v for k, v in os.environ.items()
            if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


# The command's own time, from after the CLI is imported (torch included) to its exit: on
# a loaded machine the interpreter's start-up alone can take seconds.
_ELAPSED = "\ndrn-test-elapsed="
_TIMED_MAIN = ("import atexit, sys, time\n"
               "from pipeline.cli import main\n"
               "t0 = time.monotonic()\n"
               f"atexit.register(lambda: sys.stderr.write({_ELAPSED!r} + f'{{time.monotonic() - t0:.3f}}'))\n"
               "main()\n")


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float  # seconds the command ran, start-up excluded


class Head:
    def __init__(self, url: str, token: str, process: subprocess.Popen, temp_dir: str,
                 gcs: int = 0) -> None:
        self.url, self.token, self.process, self.temp_dir = url, token, process, temp_dir
        self.gcs = gcs  # the GCS port: the address worker nodes and drivers join

    def env(self, **extra: str) -> dict[str, str]:
        return {**_client_env(), "RAY_ADDRESS": self.url, "RAY_AUTH_TOKEN": self.token, **extra}

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> CliRun:
        """Run `drn-label ARGS` in a subprocess (its own token cache and environment)."""
        result = subprocess.run([sys.executable, "-c", _TIMED_MAIN, *args],
                                env=env if env is not None else self.env(), capture_output=True,
                                text=True, timeout=timeout)
        stderr, elapsed = result.stderr, float("nan")
        if _ELAPSED in stderr:
            stderr, _, seconds = stderr.rpartition(_ELAPSED)
            elapsed = float(seconds)
        return CliRun(result.returncode, result.stdout, stderr, elapsed)

    def job_status(self, job_id: str, *, until: str | None = None, timeout: float = 60) -> str:
        """The job's state straight from the Jobs REST API (polled until `until`, if given)."""
        import requests

        deadline = time.monotonic() + timeout
        while True:
            response = requests.get(f"{self.url}/api/jobs/{job_id}", timeout=10,
                                    headers={"Authorization": f"Bearer {self.token}"})
            response.raise_for_status()
            state = response.json()["status"]
            if until is None or state == until or time.monotonic() > deadline:
                return state
            time.sleep(0.3)

    def log_tail(self) -> str:
        try:
            return Path(self.temp_dir, "ray-start.log").read_text()[-3000:]
        except OSError:
            return ""


def _wait_ready(url: str, token: str, process: subprocess.Popen, log: Path) -> None:
    import requests

    deadline = time.monotonic() + START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/api/jobs/", headers=headers, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not answer at {url} within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head():
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    # A short path: Ray's unix sockets live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="drnhead-", dir="/tmp")
    token = secrets.token_hex(32)
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, client = _free_ports(7)
    url = f"http://127.0.0.1:{dashboard}"
    env = {**_client_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    log = Path(temp_dir, "ray-start.log")
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--ray-client-server-port={client}", "--disable-usage-stats"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    sid = process.pid  # start_new_session: the session id is the leader's pid
    try:
        _wait_ready(url, token, process, log)
        yield Head(url, token, process, temp_dir, gcs)
    finally:
        _kill_session(sid)
        if process.poll() is None:
            process.wait(timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_session(sid: int, signals: tuple = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """As `ray stop` does, but only for one `ray start` session (its workers run in process
    groups of their own): SIGTERM to all, then SIGKILL to what is left."""
    for sig in signals:
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _session_pids(sid)


def _images(folder: Path, count: int, size: tuple[int, int] = (48, 64)) -> Path:
    import cv2

    from tests.imagegen import scene

    folder.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"img{i:03d}.png"), scene(*size, seed=i)[..., ::-1])
    return folder


SMALL_JOB = ("--model", "drn_d_22", "--num-classes", "3", "--workers", "1", "--batch-size", "2",
             "--max-side", "64")


@pytest.fixture(scope="module")
def first_job(head, tmp_path_factory):
    root = tmp_path_factory.mktemp("submit")
    images, out = _images(root / "in", FIRST_JOB_IMAGES), root / "out"
    result = head.cli("submit", str(images), str(out), *SMALL_JOB, "--wait")
    assert result.returncode == 0, (result.stdout, result.stderr, head.log_tail())
    job_id = result.stdout.strip().splitlines()[0]
    return job_id, out, result


def test_submit_waits_for_success_and_the_parquet_is_there(first_job):
    job_id, out, result = first_job
    assert job_id.startswith("drn-label-")
    assert f"{job_id}: RUNNING" in result.stderr and f"{job_id} SUCCEEDED" in result.stderr
    table = pq.read_table(data_files(str(out)), schema=SCHEMA)
    assert sorted(table["image_id"].to_pylist()) == [f"img{i:03d}.png" for i in range(FIRST_JOB_IMAGES)]
    assert set(table["status"].to_pylist()) == {"ok"} and set(table["model"].to_pylist()) == {"drn_d_22"}


def test_status_shows_the_state_and_the_runs_progress(head, first_job):
    job_id, out, _ = first_job
    result = head.cli("status", job_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{job_id}: SUCCEEDED"
    assert f"output:     {out}" in lines
    assert "entrypoint: drn-label run --job job.toml" in lines
    (progress,) = [line for line in lines if line.startswith("progress:")]
    assert "finished run" in progress and f"{FIRST_JOB_IMAGES}/{FIRST_JOB_IMAGES} labelled" in progress


def test_logs_show_the_runs_output(head, first_job):
    job_id, _, _ = first_job
    result = head.cli("logs", job_id)
    assert result.returncode == 0, result.stderr
    assert f"finished: {FIRST_JOB_IMAGES} ok, 0 errors" in result.stdout


def test_list_shows_the_job(head, first_job):
    job_id, out, _ = first_job
    result = head.cli("list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "STARTED", "DURATION", "OUTPUT"]
    (row,) = [r for r in rows if r.startswith(job_id)]
    assert row.split()[1] == "SUCCEEDED" and row.endswith(str(out))


def test_a_long_job_is_stopped(head, first_job, tmp_path):
    images = _images(tmp_path / "in", LONG_JOB_IMAGES, size=(64, 64))
    submitted = head.cli("submit", str(images), str(tmp_path / "out"), *SMALL_JOB)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert f"drn-label logs {job_id} --follow" in submitted.stderr
    assert head.job_status(job_id, until="RUNNING") == "RUNNING"
    stopped = head.cli("stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{job_id}: STOPPED"
    assert head.job_status(job_id) == "STOPPED"
    again = head.cli("stop", job_id)
    assert again.stdout.strip() == f"{job_id} already STOPPED: nothing to stop"


def test_a_failed_job_fails_submit_wait(head, tmp_path):
    result = head.cli("submit", str(tmp_path / "missing"), str(tmp_path / "out"), *SMALL_JOB, "--wait")
    assert result.returncode == 1
    assert "FAILED: Job entrypoint command failed with exit code 1; the run said: input " in result.stderr
    assert "no such file or directory" in result.stderr


def test_an_unknown_job_id_is_one_clear_error(head):
    result = head.cli("status", "drn-label-nope")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: no job drn-label-nope on the Ray cluster at {head.url}; "
                                     f"`drn-label list` shows its jobs")


def test_an_unreachable_address_fails_fast(head):
    (port,) = _free_ports(1)
    url = f"http://127.0.0.1:{port}"
    result = head.cli("list", "--address", url)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: cannot reach the Ray cluster at {url}: connection refused; "
                                     f"check --address / RAY_ADDRESS")
    assert result.elapsed < 15, f"took {result.elapsed:.1f}s"


def test_a_wrong_token_fails_fast(head, tmp_path):
    result = head.cli("submit", str(tmp_path), str(tmp_path / "out"), *SMALL_JOB,
                      env=head.env(RAY_AUTH_TOKEN="not-the-token"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: the Ray cluster at {head.url} refused the token: Forbidden: Invalid authentication "
        f"token; set RAY_AUTH_TOKEN (or the token file ~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH) to "
        f"the cluster's token")
    assert result.elapsed < 15, f"took {result.elapsed:.1f}s"


def test_the_head_says_without_credentials_that_it_checks_tokens(head):
    """What `connect` asks first (tests/unit/test_cluster_auth.py refuses an open cluster)."""
    from pipeline.cluster.jobs import authentication_mode

    assert authentication_mode(head.url) == "token"


def test_no_token_with_auth_disabled_says_what_to_set(head):
    env = head.env(RAY_AUTH_MODE="disabled")
    del env["RAY_AUTH_TOKEN"]
    result = head.cli("list", env=env)
    assert result.returncode == 1
    assert "wants a token and RAY_AUTH_MODE=disabled sends none" in result.stderr


_LOOPBACK_RAY = ("import sys, ray._private.services as services\n"
                 "services.resolve_ip_for_localhost = lambda host: host\n"
                 "from ray.scripts.scripts import main\n"
                 "sys.argv[0] = 'ray'\n"
                 "main()\n")


def _alive_nodes(head: Head) -> int:
    import requests

    reply = requests.get(f"{head.url}/nodes?view=summary", timeout=10,
                         headers={"Authorization": f"Bearer {head.token}"})
    if reply.status_code != 200:
        return 0
    return sum(1 for n in reply.json()["data"]["summary"] if n["raylet"]["state"] == "ALIVE")


def test_two_nodes_a_worker_node_killed_mid_run_leaves_every_image_once(head, tmp_path):
    """A second node joins the head (`ray start --address`, loopback); a run labels through
    the cluster, every process of the worker node is SIGKILLed once rows are committed, and
    the run (or, if it failed, its rerun) leaves every image exactly once. A run whose
    worker cannot come back (its node gone, no room on the head) ends itself when nothing
    moves for the stall time, with one error line, instead of waiting for ever."""
    from tests.e2e.test_faults import assert_each_once, read_rows

    images, out = _images(tmp_path / "in", 120), tmp_path / "out"
    image_ids = sorted(p.name for p in images.iterdir())
    ports = _free_ports(6)
    # A second node on one machine is what Ray calls a multi-node cluster there: allowed
    # explicitly. `ray start --address` rewrites a loopback address to the machine's
    # outward address, where the head (bound to 127.0.0.1) does not listen; the wrapper
    # keeps the node on loopback.
    env = {**_client_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    with open(tmp_path / "worker.log", "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-c", _LOOPBACK_RAY, "start", "--block",
             f"--address=127.0.0.1:{head.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--num-gpus=0", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
             f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
             f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}",
             "--disable-usage-stats"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    run_env = head.env(RAY_ADDRESS=f"127.0.0.1:{head.gcs}", RAY_AUTH_MODE="token",
                       DRN_LABEL_STALL_S="30", DRN_LABEL_STORAGE_RETRY_S="10")  # a 70 s stall
    command = [sys.executable, "-m", "pipeline.cli", "run", str(images), str(out), *SMALL_JOB,
               "--workers", "2", "--rows-per-file", "10"]
    run = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _alive_nodes(head) < 2 and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        assert _alive_nodes(head) == 2, (tmp_path / "worker.log").read_text()[-3000:]
        with open(tmp_path / "run.log", "wb") as run_log:
            run = subprocess.Popen(command, env=run_env, stdout=run_log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + 400
        while not data_files(str(out)) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        _kill_session(worker.pid, (signal.SIGKILL,))  # every process of the worker node
        worker.wait(timeout=10)
        assert not _session_pids(worker.pid)
        rc = run.wait(timeout=400)
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        _kill_session(worker.pid)
        if worker.poll() is None:
            worker.wait(timeout=10)
    if rc != 0:  # the run may fail with the node; its rerun finishes the job
        text = (tmp_path / "run.log").read_text()
        assert rc == 1 and "Traceback" not in text, text[-3000:]
        assert [x for x in text.splitlines() if x.startswith("error: ")], text[-3000:]
        again = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, (again.stderr[-3000:], (tmp_path / "run.log").read_text()[-3000:])
    assert_each_once(read_rows(out), image_ids)


# -- without a cluster ----------------------------------------------------------------------------
def test_submit_without_an_address_names_the_fix(cli_runner, tmp_path):
    result = cli_runner.invoke(cli, ["submit", str(tmp_path), str(tmp_path / "out"), "--num-classes", "3"],
                               env={"RAY_ADDRESS": None})
    assert result.exit_code == 1
    assert result.output.strip() == ("error: no Ray cluster given: pass --address http://HOST:8265 or "
                                     "set RAY_ADDRESS (the dashboard address)")


def test_dashboard_urls_and_shipped_specs(tmp_path, monkeypatch):
    from pipeline.cluster import jobs
    from pipeline.cluster.manifests import shipped_spec
    from pipeline.spec import JobSpec

    assert jobs.dashboard_url("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    assert jobs.dashboard_url("https://ray.example.com") == "https://ray.example.com"
    with pytest.raises(jobs.ClusterError, match="Ray Client address"):
        jobs.dashboard_url("ray://head:10001")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"")
    spec = JobSpec(input="imgs/*.png", output="out", weights="w.pth", classes="cityscapes",
                   address="http://x:8265")
    shipped = shipped_spec(spec)
    assert (shipped.input, shipped.output, shipped.weights) == (
        f"{tmp_path}/imgs/*.png", f"{tmp_path}/out", f"{tmp_path}/w.pth")
    assert shipped.classes == "cityscapes" and shipped.address is None
    s3 = JobSpec(input="s3://b/in/", output="s3://b/out/")
    assert shipped_spec(s3) == s3


def test_status_of_neither_an_output_nor_a_reachable_job(cli_runner):
    result = cli_runner.invoke(cli, ["status", "no/such/out"], env={"RAY_ADDRESS": None})
    assert result.exit_code == 1
    assert result.output.strip() == ("error: no/such/out is no OUTPUT here, and there is no Ray cluster "
                                     "to ask for a job of that id: pass --address http://HOST:8265 or "
                                     "set RAY_ADDRESS")
