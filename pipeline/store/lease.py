"""One writer per OUTPUT: a fenced lease taken by compare-and-swap, kept alive by a heartbeat.

``_state/lease.json`` names the run that may write OUTPUT and a generation number. Every
change to it is a compare-and-swap against the version that was read:

- locally, under an exclusive ``flock`` of ``_state/lease.lock``, the file is read,
  compared and replaced by an atomic rename (`drn.io.atomic_write`);
- on S3, by conditional writes: ``If-None-Match: *`` to create it, ``If-Match: <etag>``
  to replace the version that was read;
- on other object stores (``gs://``), by read, compare and write: pyarrow's GCS
  filesystem has no conditional writes, so two runs starting in the same instant could
  both believe they won until the next heartbeat shows one of them the other's lease.

So two runs that start together cannot both win, a heartbeat never overwrites a lease
another run has taken, and a run whose lease is gone (taken over, or released by the run
that took it over) never creates it again: it has lost, and every later commit is refused
(`check_lease`, called before each commit). A second run exits 4 while the holder is
alive; a holder whose process is gone (same host and pid namespace) is taken over at
once, another host's after the lease's TTL without a heartbeat (``LEASE_TTL_S``, or the
``DRN_LABEL_LEASE_TTL_S`` environment variable).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from pipeline.errors import LeaseHeld
from pipeline.store.fs import env_seconds, is_local, resolve
from pipeline.store.output import LEASE_FILE, STATE_DIR

log = logging.getLogger(__name__)

LEASE_TTL_S = 60.0
"""Seconds without a heartbeat after which another host's lease may be taken over."""

LOCK_FILE = f"{STATE_DIR}/lease.lock"


def lease_ttl_s() -> float:
    """The TTL in force: ``DRN_LABEL_LEASE_TTL_S`` when set (tests shorten it), else 60 s."""
    return env_seconds("DRN_LABEL_LEASE_TTL_S", LEASE_TTL_S)


class LeaseLost(RuntimeError):
    """Another run holds OUTPUT's lease (or none does): this run must not commit more rows."""


# -- compare-and-swap on the lease file ------------------------------------------------------
def _read(output: str) -> tuple[dict | None, object]:
    """(the lease, a version token for `_swap`), or (None, None) when there is none."""
    fs, root = resolve(output)
    path = f"{root}/{LEASE_FILE}"
    if is_local(fs):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        token = raw
    elif not _is_s3(output):  # another object store (gs://): the content is the version
        import pyarrow.fs as pafs

        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None, None
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
        token = raw
    else:
        import botocore.exceptions

        bucket, _, key = path.partition("/")
        try:
            reply = _s3().get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        raw, token = reply["Body"].read(), reply["ETag"]
    try:
        lease = json.loads(raw)
    except ValueError:
        lease = {}
    return (lease if isinstance(lease, dict) else {}), token


def _is_s3(output: str) -> bool:
    return output.lower().startswith("s3://")


def _s3():
    import boto3

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", region_name=region, endpoint_url=endpoint)


@contextmanager
def _local_lock(root: str) -> Iterator[None]:
    import fcntl

    os.makedirs(f"{root}/{STATE_DIR}", exist_ok=True)
    with open(f"{root}/{LOCK_FILE}", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _swap(output: str, expected: object, lease: dict | None) -> object | None:
    """Replace the lease whose version is `expected` (None: there must be none) by `lease`
    (None: delete it). Returns the new version token, or None when the lease changed
    since it was read (someone else won)."""
    fs, root = resolve(output)
    path = f"{root}/{LEASE_FILE}"
    body = json.dumps(lease).encode() if lease is not None else b""
    if is_local(fs):
        from drn.io import atomic_write

        with _local_lock(root):
            current = _read(output)[1]
            if current != expected:
                return None
            if lease is None:
                os.unlink(path)
                return b""
            with atomic_write(path) as f:
                f.write(body)
            return body
    if not _is_s3(output):
        # No conditional writes through pyarrow's GCS filesystem: read, compare, write.
        # Two runs starting within the same moment could both pass the compare; the
        # heartbeat's next read shows the loser the other's lease, and it stops committing.
        from pipeline.store.fs import write_bytes_atomic

        if _read(output)[1] != expected:
            return None
        if lease is None:
            fs.delete_file(path)
            return b""
        write_bytes_atomic(output, LEASE_FILE, body)
        return body
    import botocore.exceptions

    bucket, _, key = path.partition("/")
    client = _s3()
    try:
        if lease is None:
            if _read(output)[1] != expected:
                return None
            client.delete_object(Bucket=bucket, Key=key)
            return ""
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        return client.put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or \
                status in (404, 409, 412):
            return None
        raise


# -- the holder's identity ------------------------------------------------------------------
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


def _body(run_id: str, generation: int) -> dict:
    return {"run_id": run_id, "generation": generation, "host": socket.gethostname(),
            "pid": os.getpid(), "pid_ns": _pid_namespace(),
            "pid_started": _process_started(os.getpid()), "heartbeat": time.time()}


# -- the lease ------------------------------------------------------------------------------
@dataclass
class Lease:
    """A held lease: renewed by compare-and-swap against the version this run last wrote.

    The heartbeat thread and the run's own last check both renew it: one lock makes each
    swap start from the version the previous one wrote, or a run would see its own
    heartbeat's write as another run's and give up its lease."""

    output: str
    run_id: str
    generation: int
    _token: object = field(repr=False, default=None)
    lost: str | None = None  # why it was lost, once it is
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def renew(self) -> bool:
        """Refresh the heartbeat. False (and `lost` set) once another run has the lease or it
        is gone: then nothing is written, the lease is never re-created."""
        with self._lock:
            if self.lost:
                return False
            token = _swap(self.output, self._token, _body(self.run_id, self.generation))
            if token is None:
                holder = lease_holder(self.output)
                self.lost = (f"run {self.run_id} lost the lease on OUTPUT {self.output} "
                             + (f"to run {holder}" if holder else "(another run took it over "
                                "and released it)"))
                log.error("%s", self.lost)
                return False
            self._token = token
            return True

    def release(self) -> None:
        """Remove the lease if it is still this run's (compare-and-swap, never another's)."""
        with self._lock:
            if not self.lost:
                _swap(self.output, self._token, None)

    def keeper(self, interval: float | None = None) -> "LeaseKeeper":
        return LeaseKeeper(self, interval if interval is not None else max(0.2, lease_ttl_s() / 6))


class LeaseKeeper:
    """A driver thread renewing the lease from the moment it is held (before the scan of
    existing rows and `--overwrite` rewrites, which can take long on a large OUTPUT)."""

    def __init__(self, lease: Lease, interval: float) -> None:
        self.lease, self.interval = lease, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drn-label-lease", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.lease.renew():
                    return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; expiry decides
                log.warning("could not renew the lease on %s: %s", self.lease.output, exc)


def lease_holder(output: str) -> str | None:
    """The run_id named by OUTPUT's lease (None when there is no readable lease)."""
    lease, _ = _read(output)
    return lease.get("run_id") if lease else None


def check_lease(output: str, run_id: str, generation: int | None = None) -> None:
    """Raise LeaseLost unless OUTPUT's lease is this run's (and of this `generation`). A
    missing lease is lost too: the run that took it over may have finished and removed it."""
    lease, _ = _read(output)
    holder = lease.get("run_id") if lease else None
    if holder == run_id and (generation is None or lease.get("generation") == generation):
        return
    whom = f"to run {holder}" if holder and holder != run_id else "(it was taken over)"
    raise LeaseLost(f"run {run_id} lost the lease on OUTPUT {output} {whom}: its heartbeat "
                    f"stopped for longer than the lease lasts ({lease_ttl_s():.0f}s) and "
                    f"another run took over; it commits nothing more, so no image is "
                    f"labelled twice")


def acquire_lease(output: str, run_id: str) -> Lease:
    """Take OUTPUT's lease by compare-and-swap, or raise LeaseHeld naming the holder."""
    ttl = lease_ttl_s()
    lease, token = _read(output)
    generation = 1
    if lease is not None:
        age = time.time() - float(lease.get("heartbeat", 0) or 0)
        holder = lease.get("run_id")
        gone = age < ttl and _holder_is_gone(lease)
        if age < ttl and not gone:
            raise LeaseHeld(
                f"OUTPUT {output} is being written by run {holder} "
                f"(host {lease.get('host')}, pid {lease.get('pid')}, last seen {age:.0f}s ago); "
                f"wait for it to finish (`drn-label status {output}`), or remove {LEASE_FILE} "
                f"if that run is dead (it expires {ttl:.0f}s after its last heartbeat)")
        if gone:
            log.warning("taking over the lease of run %s: its process (pid %s on this host) "
                        "is gone", holder, lease.get("pid"))
        else:
            log.warning("taking over the expired lease of run %s", holder)
        generation = int(lease.get("generation", 0) or 0) + 1
    new_token = _swap(output, token, _body(run_id, generation))
    if new_token is None:
        raise LeaseHeld(f"OUTPUT {output} was taken by run {lease_holder(output)} as this run "
                        f"started; wait for it to finish (`drn-label status {output}`)")
    return Lease(output, run_id, generation, new_token)


def renew_lease(output: str, run_id: str) -> None:
    """Write a fresh lease for `run_id` unconditionally (tests and tools that simulate a holder)."""
    from pipeline.store.fs import write_bytes_atomic

    lease, _ = _read(output)
    generation = int(lease.get("generation", 0) or 0) + (0 if lease and lease.get("run_id") == run_id else 1) \
        if lease else 1
    write_bytes_atomic(output, LEASE_FILE, json.dumps(_body(run_id, generation)).encode())
