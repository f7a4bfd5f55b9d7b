"""Nothing lost, nothing twice: real faults on a real local Ray (issue 4).

Each pipeline test labels at least 100 tiny PNGs (48 x 48) with an untrained drn_d_22
(3 classes), batch size 4 and 10 rows per file, so files are committed during the run.
Faults are real: SIGKILL of a predict worker found in the process table, SIGKILL of the
`drn-label run` process and of its embedded Ray, an S3 endpoint that fails reads, an
address-space limit on a live worker. Processes are only ever looked up among this
test's own descendants (or by a marker in their environment): other Ray instances on the
machine are left alone.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.cli import cli
from pipeline.store.fs import resolve
from pipeline.store.output import LEASE_FILE, RUNS_DIR, SCHEMA, data_files
from pipeline.errors import LeaseHeld
from pipeline.job.run import run_job
from pipeline.job.commit import ShardWriter
from pipeline.store.lease import (LEASE_TTL_S, LeaseLost, acquire_lease, check_lease, lease_holder,
                                  renew_lease)
from pipeline.spec import JobSpec
from tests.imagegen import scene
from tests.modelkit import authors_checkpoint

N_IMAGES = 100
SIDE = 48
PREDICT_TITLE = "ray::MapWorker(MapBatches(PredictActor))"
RUN_FLAGS = ["--model", "drn_d_22", "--num-classes", "3", "--batch-size", "4",
             "--rows-per-file", "10"]


# -- helpers --------------------------------------------------------------------------------
def write_images(folder: Path, n: int, prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}_{i:04d}.png"
        assert cv2.imwrite(str(folder / name), scene(SIDE, SIDE, i)[..., ::-1])
        names.append(name)
    return names


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    """N_IMAGES PNGs that the tests only read."""
    folder = tmp_path_factory.mktemp("faults") / "in"
    return folder, write_images(folder, N_IMAGES)


def job(input_: Path | str, output: Path | str, **changes) -> JobSpec:
    return JobSpec(input=str(input_), output=str(output), model="drn_d_22", num_classes=3,
                   batch_size=4, rows_per_file=10).replace(**changes)


def quiet(_message: str) -> None:
    pass


def read_rows(output: Path) -> pa.Table:
    """Every committed row. Each data file must read completely on its own."""
    tables = [pq.read_table(f, schema=SCHEMA) for f in data_files(str(output))]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def committed_rows(output: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in data_files(str(output)))


def assert_each_once(rows: pa.Table, image_ids: list[str], status: str = "ok") -> None:
    ids = rows.column("image_id").to_pylist()
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    assert not repeated, f"{len(repeated)} images appear more than once, e.g. {repeated[:3]}"
    assert sorted(ids) == sorted(image_ids), (
        f"{len(set(image_ids) - set(ids))} missing, {len(set(ids) - set(image_ids))} unexpected")
    bad = [(r["image_id"], r["error"]) for r in rows.to_pylist() if r["status"] != status]
    assert not bad, bad[:3]


def title(proc: psutil.Process) -> str:
    return " ".join(proc.cmdline()).strip()


def predict_workers(root: psutil.Process) -> list[psutil.Process]:
    """The predict actor processes among `root`'s descendants."""
    found = []
    for proc in root.children(recursive=True):
        try:
            if title(proc).startswith(PREDICT_TITLE):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def marked(mark: str) -> list[psutil.Process]:
    """Live processes whose environment carries DRN_FAULT_TEST=mark (a CLI run and every
    process of its embedded Ray, whatever process group they moved to)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DRN_FAULT_TEST") == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def wait_gone(mark: str, timeout: float = 20.0) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while (left := marked(mark)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def cli_env(mark: str, ray_tmp: str, **extra: str) -> dict:
    """The CLI's own embedded Ray: no RAY_ADDRESS, and a Ray temp dir of its own, so that
    neither this session's Ray nor a `ray start` cluster on the machine is joined."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=ray_tmp, DRN_FAULT_TEST=mark,
               PYTHONUNBUFFERED="1", **extra)
    return env


def cli_command(input_: Path | str, output: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(input_), str(output), *RUN_FLAGS, *flags]


@pytest.fixture
def ray_tmp():
    """A short Ray temp dir (Unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="drnf-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_cli(command: list[str], env: dict, log: Path, timeout: float = 240) -> int:
    with open(log, "ab") as out:
        proc = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True, timeout=timeout)
    return proc.returncode


def run_record(output: Path, run_id: str) -> dict:
    return json.loads((output / RUNS_DIR / f"{run_id}.json").read_text())


# -- fail fast: one clear message before any image is read -----------------------------------
@pytest.fixture(scope="module")
def d38_checkpoint(tmp_path_factory) -> Path:
    return authors_checkpoint(tmp_path_factory.mktemp("ckpt") / "drn_d_38_seg.pth",
                              arch="drn_d_38", num_classes=3)


@pytest.mark.parametrize("case", ["corrupt weights", "missing weights", "architecture mismatch",
                                  "output is a file", "output not writable"])
def test_fail_fast_before_any_image_is_read(case, images, tmp_path, cli_runner, d38_checkpoint):
    import ray

    folder, _ = images
    output = tmp_path / "out"
    flags: list[str] = []
    if case == "corrupt weights":
        (tmp_path / "bad.pth").write_bytes(b"\x80\x02 not a checkpoint" * 64)
        flags = ["--weights", str(tmp_path / "bad.pth")]
        expected = (f"error: cannot build model drn_d_22 from {tmp_path / 'bad.pth'}: "
                    f"{tmp_path / 'bad.pth'}: cannot be read with torch.load(weights_only=True)")
    elif case == "missing weights":
        flags = ["--weights", str(tmp_path / "nowhere.pth")]
        expected = (f"error: --weights {tmp_path / 'nowhere.pth'}: no such file; give a checkpoint "
                    "path, an http(s)://, s3://, gs:// or hf:// URL, or a released name such as "
                    "drn_d_22:cityscapes (`drn-label models` lists them)")
    elif case == "architecture mismatch":
        flags = ["--weights", str(d38_checkpoint)]
        expected = (f"error: cannot build model drn_d_22 from {d38_checkpoint}: {d38_checkpoint}: "
                    f"the weights do not fit drn_d_22")
    elif case == "output is a file":
        output.write_text("not a directory")
        expected = f"error: OUTPUT {output} is a file; give a directory (it is created if missing)"
    else:  # as root, permissions do not stop writes: a path under a file cannot be created
        (tmp_path / "plain-file").write_text("x")
        output = tmp_path / "plain-file" / "out"
        expected = f"error: OUTPUT {output} is not writable: "
    ray_was_running = ray.is_initialized()
    t0 = time.time()
    result = cli_runner.invoke(cli, ["run", str(folder), str(output), *RUN_FLAGS, *flags])
    elapsed = time.time() - t0
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1, "one line, no traceback"
    assert result.stdout == ""
    assert elapsed < 30
    if case == "architecture mismatch":
        assert "the file looks like drn_d_38" in result.stderr
    # Nothing started: no lease taken, no run record, no Ray brought up by the command.
    if output.is_dir():
        assert sorted(p.name for p in output.iterdir()) == []
    assert ray.is_initialized() == ray_was_running


# -- the lease ----------------------------------------------------------------------------------
def test_simultaneous_starts_one_wins(tmp_path):
    _one_of_four_wins(str(tmp_path / "out"))


def test_on_s3_the_lease_is_a_conditional_write(s3_server):
    """On S3 (the loopback server) the lease is taken with If-None-Match and renewed with
    If-Match: of four runs starting together one wins, and a run whose lease was taken
    over can neither renew it nor bring it back once released."""
    output = f"s3://{s3_server.make_bucket()}/out"
    _one_of_four_wins(output)
    stalled = acquire_lease(output, "stalled-run")
    renew_lease(output, "new-run")  # the other run took it over
    assert not stalled.renew() and lease_holder(output) == "new-run"
    with pytest.raises(LeaseLost, match="run stalled-run lost the lease"):
        check_lease(output, "stalled-run", stalled.generation)
    fs, root = resolve(output)
    fs.delete_file(f"{root}/{LEASE_FILE}")  # the new run finished and released it
    assert not stalled.renew() and lease_holder(output) is None
    stalled.release()
    assert lease_holder(output) is None


def _one_of_four_wins(output: str) -> None:
    for attempt in range(3):
        barrier = threading.Barrier(4)
        outcome: dict[str, str] = {}
        leases = {}

        def start(run_id: str) -> None:
            barrier.wait()
            try:
                leases[run_id] = acquire_lease(output, run_id)
                outcome[run_id] = "won"
            except LeaseHeld as exc:
                outcome[run_id] = str(exc)

        threads = [threading.Thread(target=start, args=(f"run-{attempt}-{k}",)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r, o in outcome.items() if o == "won"]
        assert len(winners) == 1, outcome
        assert lease_holder(output) == winners[0]
        leases[winners[0]].release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    output = str(tmp_path / "out")
    # A run that died without releasing its lease: a fresh heartbeat, a pid that is gone.
    code = f"from pipeline.store.lease import renew_lease; renew_lease({output!r}, 'killed-run')"
    subprocess.run([sys.executable, "-c", code], check=True)
    lease = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
    assert time.time() - lease["heartbeat"] < LEASE_TTL_S and not psutil.pid_exists(lease["pid"])
    acquire_lease(output, "next-run")
    assert lease_holder(output) == "next-run"
    assert "taking over the lease of run killed-run: its process" in caplog.text
    # A live process on this host (this one) or a fresh lease from another host is respected.
    renew_lease(output, "live-run")
    with pytest.raises(LeaseHeld, match=r"is being written by run live-run \(host "):
        acquire_lease(output, "third-run")
    lease = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
    lease.update(run_id="remote-run", host="another-host", pid=1)
    (tmp_path / "out" / LEASE_FILE).write_text(json.dumps(lease))
    with pytest.raises(LeaseHeld, match="is being written by run remote-run"):
        acquire_lease(output, "third-run")


def test_a_run_that_lost_its_lease_commits_nothing(tmp_path):
    """A run whose heartbeat stalled past the TTL while another run took over must neither
    overwrite the new lease, nor re-create it once released, nor commit more rows."""
    output = str(tmp_path / "out")
    stalled = acquire_lease(output, "stalled-run")
    renew_lease(output, "new-run")  # the other run took the expired lease
    writer = ShardWriter(output=output, run_id="stalled-run", generation=stalled.generation,
                         shard=0, schema=SCHEMA, rows_per_file=1, commit_interval_s=60.0,
                         done_refs=[], skip_status=("ok", "error"))
    assert not stalled.renew()
    assert lease_holder(output) == "new-run"
    row = {name: [None] for name in SCHEMA.names}
    row.update(image_id=["a.png"], uri=["a.png"], status=["error"], error=["x"], model=["m"],
               weights_sha256=["w"], run_id=["stalled-run"])
    with pytest.raises(LeaseLost, match="run stalled-run lost the lease on OUTPUT .* to run new-run"):
        writer.add(pa.table(row, schema=SCHEMA))
    with pytest.raises(LeaseLost):  # and it stays lost
        writer.add(pa.table(row, schema=SCHEMA))
    assert data_files(output) == [] and writer.finish().files == ()
    # The new run finishes and removes its lease: the stalled run does not bring it back.
    os.unlink(tmp_path / "out" / LEASE_FILE)
    assert not stalled.renew() and not (tmp_path / "out" / LEASE_FILE).exists()
    stalled.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_second_run_is_refused_while_the_first_holds_the_lease(ray_session, images, tmp_path,
                                                               cli_runner, caplog):
    folder, image_ids = images
    output = tmp_path / "out"
    output.mkdir()
    # A run that died long ago elsewhere left its lease: expired, so it is taken over.
    stale = {"run_id": "20200101T000000Z-dead00", "host": "elsewhere", "pid": 1,
             "heartbeat": time.time() - 2 * LEASE_TTL_S}
    (output / LEASE_FILE).parent.mkdir(parents=True)
    (output / LEASE_FILE).write_text(json.dumps(stale))
    first: dict = {}

    def run_first() -> None:
        try:
            first["result"] = run_job(job(folder, output), echo=quiet, stream=io.StringIO())
        except BaseException as exc:  # noqa: BLE001 - reported below
            first["error"] = exc

    thread = threading.Thread(target=run_first)
    thread.start()
    deadline = time.time() + 60
    while lease_holder(str(output)) in (None, stale["run_id"]) and time.time() < deadline:
        time.sleep(0.05)
    holder = lease_holder(str(output))
    assert holder not in (None, stale["run_id"]), first
    # Overlapping schedule: the same command again while the first run is labelling.
    second = cli_runner.invoke(cli, ["run", str(folder), str(output), *RUN_FLAGS])
    rows_when_refused = committed_rows(output)
    thread.join(timeout=180)
    assert "error" not in first, first.get("error")
    assert second.exit_code == 4, second.output
    refusal = second.stderr.splitlines()[-1]
    assert refusal.startswith(f"error: OUTPUT {output} is being written by run {holder} "
                              f"(host {socket.gethostname()}, pid {os.getpid()}, "), second.stderr
    assert "taking over the expired lease of run 20200101T000000Z-dead00" in caplog.text
    assert rows_when_refused < len(image_ids), "the first run was still labelling"
    result = first["result"]
    assert result.state == "finished" and result.ok == len(image_ids)
    rows = read_rows(output)
    assert_each_once(rows, image_ids)
    assert set(rows.column("run_id").to_pylist()) == {holder}
    assert sorted(p.stem for p in (output / RUNS_DIR).glob("*.json")) == [holder]
    assert not (output / LEASE_FILE).exists()


# -- reconciling rows that replace others ---------------------------------------------------
def test_rows_left_twice_by_a_killed_retry_are_reconciled_by_the_next_run(ray_session, tmp_path):
    """A --retry-errors run killed after committing its new rows, before removing the old
    error rows, leaves two rows for an image; the next run (here with nothing left to
    label) keeps one: ok over error, else the newest."""
    from datetime import datetime, timezone

    from pipeline.store.output import schema_with_metadata
    from pipeline.job.model import describe_model
    from pipeline.store.fs import write_table_atomic

    inputs, output = tmp_path / "in", tmp_path / "out"
    names = write_images(inputs, 4, prefix="x")
    a, b, c, d = names
    spec = job(inputs, output)
    meta = describe_model(spec)
    schema = schema_with_metadata(meta)
    old, new = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 2, tzinfo=timezone.utc)

    def table(rows: list[tuple], sha: str = meta.weights_sha256) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        for image_id, status, run_id, at in rows:
            values = dict.fromkeys(SCHEMA.names)
            values.update(image_id=image_id, uri=str(inputs / image_id), status=status,
                          error=None if status == "ok" else "boom", model="drn_d_22",
                          weights_sha256=sha, run_id=run_id, labelled_at=at)
            for name in SCHEMA.names:
                cols[name].append(values[name])
        return pa.table(cols, schema=schema)

    write_table_atomic(str(output), "part-run1-0.parquet", table(
        [(a, "error", "run1", old), (b, "error", "run1", old), (c, "ok", "run1", old),
         (d, "error", "run1", old)]))
    write_table_atomic(str(output), "part-run2-0.parquet", table(
        [(a, "ok", "run2", new), (b, "error", "run2", new), (c, "error", "run2", new)]))
    write_table_atomic(str(output), "part-other-0.parquet", table(
        [(a, "error", "other", old)], sha="f" * 64))

    result = run_job(spec, echo=quiet)
    assert (result.skipped, result.to_label) == (4, 0)
    rows = read_rows(output)
    mine = rows.filter(pc.equal(rows["weights_sha256"], meta.weights_sha256))
    kept = {r["image_id"]: (r["status"], r["run_id"]) for r in mine.to_pylist()}
    assert mine.num_rows == 4
    assert kept == {a: ("ok", "run2"), b: ("error", "run2"), c: ("ok", "run1"), d: ("error", "run1")}
    assert rows.num_rows == 5, "another model's rows are not touched"


# -- a predict worker killed with SIGKILL ------------------------------------------------------
def test_a_killed_predict_worker_costs_only_a_retry(ray_session, images, tmp_path):
    folder, image_ids = images
    output = tmp_path / "out"
    me = psutil.Process()
    killed: list[dict] = []
    replacements: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            workers = predict_workers(me)
            if not killed:
                busy = [p for p in workers if title(p).endswith(".submit")]
                if busy and data_files(str(output)):  # mid-batch, with files already committed
                    committed = committed_rows(output)
                    busy[0].send_signal(signal.SIGKILL)
                    killed.append({"pid": busy[0].pid, "committed": committed})
            else:
                replacements.extend(p.pid for p in workers if p.pid != killed[0]["pid"])
                if replacements:
                    return
            stop.wait(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = run_job(job(folder, output), echo=quiet)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert killed, "the predict worker was never seen labelling a batch"
    assert killed[0]["committed"] < len(image_ids), "killed before the job was done"
    assert not psutil.pid_exists(killed[0]["pid"]) or \
        psutil.Process(killed[0]["pid"]).status() == psutil.STATUS_ZOMBIE
    assert replacements, "Ray started a new predict worker"
    assert result.state == "finished"
    assert (result.ok, result.errors) == (len(image_ids), 0)
    assert_each_once(read_rows(output), image_ids)


# -- the `drn-label run` process killed with SIGKILL, then the same command again ----------
@pytest.mark.slow
def test_a_killed_run_resumes_with_the_rest(images, tmp_path, ray_tmp):
    folder, image_ids = images
    output = tmp_path / "out"
    log = tmp_path / "cli.log"
    command = cli_command(folder, output)
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(command, env=cli_env(mark, ray_tmp), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not data_files(str(output)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it was killed:\n{log.read_text()}"
        ours = marked(mark)
        names = [title(p) for p in ours]
        assert any("raylet" in n for n in names), f"the run has a Ray of its own: {names}"
        assert all(p.pid == proc.pid or proc.pid in [a.pid for a in p.parents()]
                   for p in ours if "raylet" in title(p) or "gcs_server" in title(p))
        # Kill the run and everything its embedded Ray started (the workers leave the
        # process group, so they are found by the marker in their environment).
        os.killpg(proc.pid, signal.SIGKILL)
        for p in marked(mark):
            p.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = wait_gone(mark)
    assert not left, f"stray processes: {[(p.pid, title(p)) for p in left]}"

    # Right after the kill: every committed file reads completely, no image twice.
    killed_run = json.loads((output / LEASE_FILE).read_text())["run_id"]
    before = read_rows(output)
    done = before.num_rows
    assert 0 < done < len(image_ids), "the run was killed mid-way"
    assert len(set(before.column("image_id").to_pylist())) == done
    assert run_record(output, killed_run)["state"] == "running"

    # The same command again, with a reader checking every committed file meanwhile.
    problems: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for path in data_files(str(output)):
                try:
                    pq.read_table(path)
                except Exception as exc:  # noqa: BLE001 - collected and asserted
                    problems.append(f"{path}: {exc}")
            stop.wait(0.1)

    checker = threading.Thread(target=reader, daemon=True)
    checker.start()
    mark2 = uuid.uuid4().hex
    try:
        rc = run_cli(command, cli_env(mark2, ray_tmp), log)
    finally:
        stop.set()
        checker.join(timeout=10)
    assert rc == 0, log.read_text()[-3000:]
    assert not problems, problems[:3]
    assert not wait_gone(mark2), "the rerun's Ray shut down with it"
    records = [p.stem for p in (output / RUNS_DIR).glob("*.json") if p.stem != killed_run]
    assert len(records) == 1
    record = run_record(output, records[0])
    assert record["state"] == "finished"
    assert record["counts"]["skipped_existing"] == done
    assert record["counts"]["to_label"] == len(image_ids) - done
    assert record["counts"]["ok"] == len(image_ids) - done
    rows = read_rows(output)
    assert_each_once(rows, image_ids)
    assert Counter(rows.column("run_id").to_pylist()) == {killed_run: done,
                                                         records[0]: len(image_ids) - done}
    assert not list(output.rglob("*.part")) and not (output / LEASE_FILE).exists()


# -- transient read errors at the storage layer ------------------------------------------------
class FaultyS3Proxy:
    """An HTTP proxy on loopback in front of the S3 test server.

    GETs of the keys in `faults` fail their first n times with the fault named there:
    "503" (SlowDown), "500" (InternalError) or "reset" (the connection closes without an
    answer). Keys in `denied` answer 403 AccessDenied to everything (a permanent error).
    Everything else is forwarded unchanged; `requests[(method, bucket/key)]` counts.
    """

    _HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
    _ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
               "500": (500, "InternalError", "We encountered an internal error. Please try again."),
               "403": (403, "AccessDenied", "Access Denied")}

    def __init__(self, upstream: str, faults: dict[str, tuple[str, int]], denied: set[str]) -> None:
        self.upstream = urlsplit(upstream)
        self.faults, self.denied = faults, denied
        self.requests: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def handle_one(self) -> None:
                key = urlsplit(self.path).path.lstrip("/")
                with proxy._lock:
                    proxy.requests[(self.command, key)] += 1
                    count = proxy.requests[(self.command, key)]
                if key in proxy.denied:
                    return self.fail("403")
                fault, times = proxy.faults.get(key, (None, 0))
                if self.command == "GET" and fault and count <= times:
                    return self.fail(fault)
                self.forward()

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy._HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # keeps the object's Content-Length, no body
                for k, v in resp.getheaders():
                    if k.lower() in proxy._HOP or (k.lower() == "content-length" and not head):
                        continue
                    self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def fail(self, fault: str) -> None:
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                code, name, message = proxy._ERRORS[fault]
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{name}</Code>'
                        f"<Message>{message}</Message></Error>").encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FaultyS3Proxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_transient_s3_read_errors_are_retried_permanent_ones_are_not(s3_server, images, tmp_path,
                                                                     ray_tmp):
    folder, image_ids = images
    bucket = s3_server.make_bucket()
    s3_server.upload_tree(folder, bucket, "in")
    uris = [f"s3://{bucket}/in/{name}" for name in image_ids]
    key = lambda uri: uri[len("s3://"):]  # noqa: E731
    # Each faulty key fails more often than the S3 client retries by itself (3 attempts),
    # so the pipeline's own retry is what makes it succeed.
    faults = {}
    for k, (fault, times) in enumerate([("503", 3), ("500", 3), ("reset", 4)]):
        faults[key(uris[30 * k + 3])] = (fault, times)
    missing, denied = f"s3://{bucket}/in/missing.png", f"s3://{bucket}/in/denied.png"
    s3_server.put(bucket, "in/denied.png", (folder / image_ids[0]).read_bytes())
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(uris + [missing, denied]) + "\n")
    output = tmp_path / "out"
    log = tmp_path / "cli.log"
    with FaultyS3Proxy(s3_server.endpoint_url, faults, {key(denied)}) as proxy:
        mark = uuid.uuid4().hex
        rc = run_cli(cli_command(manifest, output), cli_env(mark, ray_tmp,
                     AWS_ENDPOINT_URL_S3=proxy.endpoint), log)
        requests = dict(proxy.requests)
    assert rc == 0, log.read_text()[-3000:]
    assert not wait_gone(mark)
    rows = {r["image_id"]: r for r in read_rows(output).to_pylist()}
    assert sorted(rows) == sorted(uris + [missing, denied])
    assert [u for u in uris if rows[u]["status"] != "ok"] == []
    for k, (fault, times) in faults.items():
        # One HEAD per read attempt: the first attempt failed as a whole, the second worked.
        assert requests[("HEAD", k)] == 2, (k, fault, requests)
        assert requests[("GET", k)] >= times + 1
    assert rows[missing]["error"] == (f"{missing}: could not read (no such file; 1 attempt, "
                                      f"permanent error, not retried)")
    assert rows[denied]["status"] == "error"
    assert rows[denied]["error"].endswith("1 attempt, permanent error, not retried)"), rows[denied]
    assert requests[("HEAD", key(missing))] == 1 and requests[("HEAD", key(denied))] == 1


# -- out of memory in a live worker --------------------------------------------------------
def test_out_of_memory_in_a_worker_becomes_one_error_row(ray_session, images, tmp_path):
    """A real allocation failure: once the predict worker is running, its address space is
    capped (prlimit) a little above what it uses; the one large image then cannot be
    labelled and becomes an error row naming the memory it needed, the rest are ok."""
    folder, image_ids = images
    inputs = tmp_path / "in"
    shutil.copytree(folder, inputs)
    big = "zz_big.png"  # sorted last, so it reaches the worker after the cap
    assert cv2.imwrite(str(inputs / big), scene(2048, 2048, 7)[..., ::-1])
    output = tmp_path / "out"
    me = psutil.Process()
    capped: list[psutil.Process] = []
    stop = threading.Event()

    def cap() -> None:
        while not stop.is_set() and not capped:
            busy = [p for p in predict_workers(me) if title(p).endswith(".submit")]
            if busy and data_files(str(output)):
                worker = busy[0]
                limit = worker.memory_info().vms + 256 * 2**20
                worker.rlimit(psutil.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
                capped.append(worker)
            stop.wait(0.05)

    thread = threading.Thread(target=cap, daemon=True)
    thread.start()
    try:
        result = run_job(job(inputs, output, workers=1), echo=quiet)  # one worker, the capped one
    finally:
        stop.set()
        thread.join(timeout=10)
        for worker in capped:
            try:
                worker.rlimit(psutil.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except psutil.Error:
                pass
    assert capped, "the predict worker was never seen labelling"
    assert (result.ok, result.errors) == (len(image_ids), 1)
    rows = read_rows(output)
    assert_each_once(rows.filter(pc.equal(rows["status"], "ok")), image_ids)
    error = rows.filter(pc.equal(rows["status"], "error")).to_pylist()
    assert [r["image_id"] for r in error] == [big]
    assert error[0]["error"] == (f"{inputs / big}: out of memory labelling a 2048x2048 image "
                                 f"(needs about 1728 MiB on cpu); lower --max-side")


# -- --retry-errors, another model, --overwrite --------------------------------------------
@pytest.mark.slow
def test_retry_errors_replaces_rows_other_models_sit_beside_overwrite_starts_over(
        ray_session, images, tmp_path):
    folder, image_ids = images
    inputs = tmp_path / "in"
    shutil.copytree(folder, inputs)
    broken = image_ids[5:9]
    for name in broken:  # undecodable for now: a permanent error, an error row
        (inputs / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "out"

    first = run_job(job(inputs, output), echo=quiet)
    assert (first.ok, first.errors) == (len(image_ids) - 4, 4)
    rows = read_rows(output)
    assert sorted(rows.column("image_id").to_pylist()) == sorted(image_ids)
    error_files = {f for f in data_files(str(output))
                   if "error" in pq.read_table(f, columns=["status"]).column("status").to_pylist()}

    # Three images are repaired; one stays broken. Each image keeps exactly one row.
    for name in broken[:3]:
        shutil.copy(folder / name, inputs / name)
    retry = run_job(job(inputs, output, retry_errors=True), echo=quiet)
    assert (retry.skipped, retry.to_label, retry.ok, retry.errors) == (len(image_ids) - 4, 4, 3, 1)
    rows = read_rows(output)
    assert_each_once(rows.filter(pc.not_equal(rows["image_id"], broken[3])),
                     [i for i in image_ids if i != broken[3]])
    by_id = {r["image_id"]: r for r in rows.to_pylist()}
    assert rows.num_rows == len(image_ids)
    assert by_id[broken[3]]["status"] == "error" and by_id[broken[3]]["run_id"] == retry.run_id
    assert {by_id[n]["run_id"] for n in broken[:3]} == {retry.run_id}
    for f in error_files:  # rewritten in place, atomically: still readable, old errors gone
        assert pq.read_table(f).num_rows > 0

    # Another checkpoint is another model identity: its rows go beside the old ones.
    ckpt = authors_checkpoint(tmp_path / "drn_d_22_seg.pth", num_classes=3)
    other = run_job(job(inputs, output, weights=str(ckpt)), echo=quiet)
    assert (other.skipped, other.ok, other.errors) == (0, len(image_ids) - 1, 1)
    rows = read_rows(output)
    assert rows.num_rows == 2 * len(image_ids)
    for sha in set(rows.column("weights_sha256").to_pylist()):
        mine = rows.filter(pc.equal(rows["weights_sha256"], sha))
        assert sorted(mine.column("image_id").to_pylist()) == sorted(image_ids)

    # --overwrite relabels everything of the first identity, and nothing of the other.
    (inputs / broken[3]).write_bytes((folder / broken[3]).read_bytes())
    again = run_job(job(inputs, output, overwrite=True), echo=quiet)
    assert (again.skipped, again.to_label, again.ok, again.errors) == (0, len(image_ids),
                                                                       len(image_ids), 0)
    rows = read_rows(output)
    first_identity = rows.filter(pc.equal(rows["run_id"], again.run_id))
    assert_each_once(first_identity, image_ids)
    assert Counter(rows.column("run_id").to_pylist()) == {again.run_id: len(image_ids),
                                                         other.run_id: len(image_ids)}


# -- storage that fails: a small filesystem that fills up (tmpfs, small_fs in conftest) -----
def test_a_disk_that_fills_during_a_run_loses_no_row(ray_session, small_fs, tmp_path, cli_runner,
                                                     monkeypatch):
    """The disk fills during a run and stays full: the run exits 1 with one line naming the
    cause and what OUTPUT holds, each committed file whole. The rerun starts with the disk
    freed; it fills again while the rerun labels and is freed 3 s later: the rerun waits
    it out and finishes with every image exactly once."""
    inputs, output = tmp_path / "in", small_fs.root / "out"
    names = write_images(inputs, 40)
    flags = ["--model", "drn_d_22", "--num-classes", "3", "--batch-size", "4", "--rows-per-file", "4"]
    fills: list[int] = []

    def fill_after_a_commit(free_after: float | None) -> threading.Thread:
        def fill() -> None:
            before = len(data_files(str(output)))
            deadline = time.time() + 120
            while len(data_files(str(output))) <= before and time.time() < deadline:
                time.sleep(0.05)
            fills.append(committed_rows(output))
            small_fs.fill()
            if free_after is not None:
                time.sleep(free_after)
                small_fs.free()
        thread = threading.Thread(target=fill)
        thread.start()
        return thread

    monkeypatch.setenv("DRN_LABEL_STORAGE_RETRY_S", "2")
    filler = fill_after_a_commit(free_after=None)
    failed = cli_runner.invoke(cli, ["run", str(inputs), str(output), *flags])
    filler.join()
    assert failed.exit_code == 1, failed.output
    assert "Traceback" not in failed.output
    (line,) = [x for x in failed.output.splitlines() if x.startswith("error:")]
    rows = read_rows(output)
    assert 0 < rows.num_rows < len(names)
    assert line.startswith(f"error: OUTPUT {output}: cannot write data/part-")
    assert "No space left on device" in line and "still failing after 2 s of retries" in line
    assert f"; OUTPUT holds {rows.num_rows} rows of this run ({rows.num_rows} ok, 0 errors) in " in line
    assert "rerun the same command once the storage works again" in line
    assert len(set(rows.column("image_id").to_pylist())) == rows.num_rows
    # The failed run gave its CPUs back, though its error (in `failed`) is still held here:
    # the rerun in this process gets the whole cluster.
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, f"the failed run still holds CPUs: {ray.available_resources()}"
        time.sleep(0.2)

    small_fs.free()
    monkeypatch.setenv("DRN_LABEL_STORAGE_RETRY_S", "120")
    monkeypatch.setenv("DRN_LABEL_STALL_S", "60")  # a stuck rerun ends after 180 s, saying why
    filler = fill_after_a_commit(free_after=3.0)
    rerun = cli_runner.invoke(cli, ["run", str(inputs), str(output), *flags])
    filler.join()
    assert rerun.exit_code == 0, rerun.output
    assert fills[1] < len(names), "the disk filled while the rerun still had rows to commit"
    assert f"{len(names) - rows.num_rows} ok, 0 errors, {rows.num_rows} already labelled" in rerun.output
    assert_each_once(read_rows(output), names)
    assert not [p for p in (output / "data").iterdir() if p.name.endswith(".part")]


def test_a_full_disk_or_read_only_data_folder_at_start_is_one_line(ray_session, small_fs, tmp_path,
                                                                   cli_runner):
    """Found at the start, before any image is labelled: exit 1, one line. OUTPUT's disk is
    full (the probe); Ray's temp folder is on a full disk (Ray itself would wait half a
    minute and print its traceback; a `drn-label run` of its own, as Ray starts there);
    OUTPUT/data is read-only while OUTPUT is writable (the probe)."""
    inputs = tmp_path / "in"
    write_images(inputs, 2)
    flags = ["--num-classes", "3"]
    full = small_fs.root / "full"
    (small_fs.root / "ray").mkdir()
    small_fs.fill()
    res = cli_runner.invoke(cli, ["run", str(inputs), str(full), *flags])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == f"error: OUTPUT {full} is not writable: No space left on device: {full}"

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(small_fs.root / "ray"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(inputs), str(tmp_path / "o"),
                           *flags], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: cannot start a local Ray: its temp folder {small_fs.root / 'ray'} has 0 MiB free; free "
        "some space there, or point RAY_TMPDIR at a disk that has some")
    small_fs.free()

    read_only = small_fs.root / "ro"
    small_fs.mount_read_only(read_only / "data")
    res = cli_runner.invoke(cli, ["run", str(inputs), str(read_only), *flags])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == (f"error: OUTPUT {read_only} is not writable: Read-only file system: "
                                  f"{read_only}/data")
    assert not (read_only / "_state" / "runs").exists()  # no run started
