"""Commits that keep pace, a kill half way, and a stalled run that lost its lease (issue 12).

Each test runs `drn-label run` in a process of its own (its own embedded Ray), on tiny
PNGs, and asserts on counts read from the Parquet files, the progress file and the run
records, never on durations. Processes are found and killed only by this test's marker
(see tests/e2e/test_faults.py, whose helpers these are).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pipeline.store.output import LEASE_FILE, PROGRESS_FILE, RUNS_DIR
from tests.e2e.test_faults import (assert_each_once, cli_command, cli_env, committed_rows,
                                   marked, ray_tmp, read_rows, run_cli, run_record, wait_gone,
                                   write_images)

__all__ = ["ray_tmp"]  # a fixture, imported for the tests below

pytestmark = pytest.mark.slow

# The suite's size; the 4,000-image case with the default 1,000 rows per file is
# `STREAM_IMAGES=4000 STREAM_ROWS_PER_FILE=1000 python -m pytest tests/e2e/test_streaming.py`.
N_IMAGES = int(os.environ.get("STREAM_IMAGES", 240))
ROWS_PER_FILE = int(os.environ.get("STREAM_ROWS_PER_FILE", 20))  # test_faults' RUN_FLAGS set 10; a later flag wins
BATCH = 4


def progress(output: Path) -> dict | None:
    try:
        return json.loads((output / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """The command in its own session, with Ctrl-C's signal at its default: a shell's
    background job (CI under `nohup ... &`) ignores SIGINT, and a child inherits that."""
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_all(proc: subprocess.Popen, mark: str) -> None:
    """SIGKILL the run's process group and every process of its embedded Ray."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in marked(mark):
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    proc.wait(timeout=30)


def test_commits_keep_pace_and_a_kill_half_way_loses_little(tmp_path, ray_tmp):
    """Committed stays close behind labelled (at most one file's worth per shard writer
    plus one batch per predict actor and a batch in each stage between, while the run
    goes); a SIGKILL of the run at half way leaves at least 40% committed, which the
    rerun skips (its run record says so), and the rerun ends with every image once."""
    inputs, output, log = tmp_path / "in", tmp_path / "out", tmp_path / "cli.log"
    image_ids = write_images(inputs, N_IMAGES)
    command = cli_command(inputs, output, "--rows-per-file", str(ROWS_PER_FILE))
    mark = uuid.uuid4().hex
    proc = start(command, cli_env(mark, ray_tmp), log)
    samples: list[tuple[int, int]] = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            p = progress(output)
            if p and p["state"] == "running":
                samples.append((p["labelled"], p["committed"]))
                if p["labelled"] >= N_IMAGES // 2:
                    break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before half way:\n{log.read_text()[-3000:]}"
        kill_all(proc, mark)
    finally:
        if proc.poll() is None:
            kill_all(proc, mark)
    assert not wait_gone(mark)
    committed = committed_rows(output)
    assert committed >= 0.4 * N_IMAGES, (committed, samples[-5:])
    # While it ran: the first commit came, and after it the uncommitted rows stayed within
    # one file per shard writer (one here) plus the batches in flight between the stages.
    assert any(c > 0 for _, c in samples), samples[-5:]
    bound = ROWS_PER_FILE + 3 * BATCH
    after_first = [lab - c for lab, c in samples[next(i for i, (_, c) in enumerate(samples) if c):]]
    assert max(after_first) <= bound, (max(after_first), samples)
    killed = json.loads((output / LEASE_FILE).read_text())["run_id"]
    assert run_record(output, killed)["state"] == "running"

    mark2 = uuid.uuid4().hex
    assert run_cli(command, cli_env(mark2, ray_tmp), log) == 0, log.read_text()[-3000:]
    assert not wait_gone(mark2)
    (rerun,) = [p.stem for p in (output / RUNS_DIR).glob("*.json") if p.stem != killed]
    record = run_record(output, rerun)
    assert record["state"] == "finished"
    assert record["counts"]["skipped_existing"] == committed
    assert record["counts"]["ok"] == N_IMAGES - committed
    assert_each_once(read_rows(output), image_ids)


def test_a_stalled_run_loses_its_lease_and_commits_nothing_more(tmp_path, ray_tmp):
    """Run A is stopped (SIGSTOP on its process group) after labelling a few images, for
    longer than the lease lasts; run B takes the lease over and finishes; A, continued,
    exits non-zero with one line saying it lost the lease, and every image is there once."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    image_ids = write_images(inputs, 60)
    ttl = "8"  # the lease's TTL for both runs (60 s by default)
    command = cli_command(inputs, output, "--rows-per-file", "5")
    mark_a, mark_b = uuid.uuid4().hex, uuid.uuid4().hex
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start(command, cli_env(mark_a, ray_tmp, DRN_LABEL_LEASE_TTL_S=ttl), log_a)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None:
            p = progress(output)
            if p and p["labelled"] >= 3:
                break
            time.sleep(0.05)
        assert a.poll() is None, log_a.read_text()[-3000:]
        os.killpg(a.pid, signal.SIGSTOP)
        run_a = json.loads((output / LEASE_FILE).read_text())["run_id"]
        ray_b = ray_tmp + "b"
        os.makedirs(ray_b, exist_ok=True)
        # B refuses while A's lease is fresh, then takes it over once it has expired.
        while True:
            rc_b = run_cli(command, cli_env(mark_b, ray_b, DRN_LABEL_LEASE_TTL_S=ttl), log_b)
            if rc_b != 4:
                break
            time.sleep(1)
        assert rc_b == 0, log_b.read_text()[-3000:]
        assert not wait_gone(mark_b)
        os.killpg(a.pid, signal.SIGCONT)
        rc_a = a.wait(timeout=300)
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGCONT)
            kill_all(a, mark_a)
    wait_gone(mark_a)
    assert rc_a == 1, log_a.read_text()[-3000:]
    last = log_a.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: run {run_a} lost the lease on OUTPUT {output}"), last
    assert last.endswith("it committed nothing after losing it and leaves the rest to the run "
                         "that holds the lease"), last
    rows = read_rows(output)
    assert_each_once(rows, image_ids)
    assert not (output / LEASE_FILE).exists(), "the stalled run did not re-create the lease"
