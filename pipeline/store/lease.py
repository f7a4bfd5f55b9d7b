"""One writer per OUTPUT: the lease file, its heartbeat, and the check before each commit.

``_state/lease.json`` names the run that may write OUTPUT. A second run exits 4 while the
holder is alive; a holder whose process is gone (same host and pid namespace) is taken
over at once, another host's after ``LEASE_TTL_S`` seconds without a heartbeat. Write
tasks call ``check_lease`` before every commit.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from pipeline.errors import JobError, LeaseHeld
from pipeline.store.fs import read_bytes_or_none, resolve, write_bytes_atomic
from pipeline.store.output import LEASE_FILE

log = logging.getLogger(__name__)

LEASE_TTL_S = 60.0


class LeaseLost(RuntimeError):
    """Another run holds OUTPUT's lease: this run must not commit more rows."""


def lease_holder(output: str) -> str | None:
    """The run_id named by OUTPUT's lease (None when there is no readable lease)."""
    raw = read_bytes_or_none(output, LEASE_FILE)
    try:
        return json.loads(raw).get("run_id") if raw else None
    except ValueError:
        return None


def check_lease(output: str, run_id: str) -> None:
    holder = lease_holder(output)
    if holder is not None and holder != run_id:
        raise LeaseLost(f"run {run_id} lost the lease on OUTPUT {output} to run {holder} "
                        f"(e.g. its heartbeat stopped for longer than the lease lasts); it "
                        f"stopped committing rows so that no image is labelled twice")



# -- lease: one writer per OUTPUT ---------------------------------------------------------
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _holder_is_gone(lease: dict) -> bool:
    """Whether the lease was written by a process of this machine that no longer exists.

    Only a lease from this host and pid namespace can be checked; a pid that is alive but
    now belongs to a younger process (pid reuse) counts as gone. Anything else is assumed
    alive until its heartbeat expires.
    """
    pid = lease.get("pid")
    if (lease.get("host") != socket.gethostname() or lease.get("pid_ns") != _pid_namespace()
            or not isinstance(pid, int) or pid <= 0):
        return False
    started = _process_started(pid)
    if started is None:
        return True
    recorded = lease.get("pid_started")
    return isinstance(recorded, (int, float)) and abs(started - recorded) > 1.0


def acquire_lease(output: str, run_id: str) -> None:
    raw = read_bytes_or_none(output, LEASE_FILE)
    if raw:
        try:
            lease = json.loads(raw)
        except ValueError:
            lease = {}
        age = time.time() - float(lease.get("heartbeat", 0))
        holder = lease.get("run_id")
        gone = holder != run_id and age < LEASE_TTL_S and _holder_is_gone(lease)
        if holder != run_id and age < LEASE_TTL_S and not gone:
            raise LeaseHeld(
                f"OUTPUT {output} is being written by run {holder} "
                f"(host {lease.get('host')}, pid {lease.get('pid')}, last seen {age:.0f}s ago); "
                f"wait for it to finish (`drn-label status {output}`), or remove {LEASE_FILE} "
                f"if that run is dead (it expires {LEASE_TTL_S:.0f}s after its last heartbeat)")
        if gone:
            log.warning("taking over the lease of run %s: its process (pid %s on this host) "
                        "is gone", holder, lease.get("pid"))
        elif holder and holder != run_id:
            log.warning("taking over the expired lease of run %s", holder)
    renew_lease(output, run_id)
    # Last writer wins: read back after a moment so two simultaneous starters agree.
    time.sleep(0.2)
    holder = lease_holder(output)
    if holder != run_id:
        raise LeaseHeld(f"OUTPUT {output} was taken by run {holder} as this run started; "
                        f"wait for it to finish (`drn-label status {output}`)")


def renew_lease(output: str, run_id: str) -> None:
    lease = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
             "pid_ns": _pid_namespace(), "pid_started": _process_started(os.getpid()),
             "heartbeat": time.time()}
    write_bytes_atomic(output, LEASE_FILE, json.dumps(lease).encode())


def heartbeat_lease(output: str, run_id: str) -> None:
    """Keep this run's lease fresh, but never write over a lease another run has taken
    (the sink then refuses to commit, see `pipeline.job.sink.check_lease`)."""
    holder = lease_holder(output)
    if holder is not None and holder != run_id:
        log.error("run %s lost the lease on OUTPUT %s to run %s", run_id, output, holder)
        return
    renew_lease(output, run_id)


def release_lease(output: str, run_id: str) -> None:
    if lease_holder(output) == run_id:
        fs, root = resolve(output)
        fs.delete_file(f"{root}/{LEASE_FILE}")


