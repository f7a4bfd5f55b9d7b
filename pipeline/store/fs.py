"""Where OUTPUT and inputs live: URIs resolved to pyarrow filesystems, and atomic writes.

``resolve(uri)`` gives the filesystem and path of a local path, ``file://`` URL,
``s3://bucket/key`` or ``gs://bucket/key``. ``write_table_atomic`` and
``write_bytes_atomic`` are the one way the project writes a file into OUTPUT: readers see
all of it or nothing (local: a temporary file renamed into place; S3: one PutObject; GCS:
one upload, which the store makes visible only when it is complete).

Storage that fails (a full disk, an I/O error, a throttled or failing object store) is
retried by `with_storage_retries` with backoff for a bounded time (`storage_retry_s`), then
reported as one `StorageError` line; what cannot succeed by waiting (no permission, a
read-only filesystem, a missing bucket) fails at once. `probe_writable` checks a folder at
the start of a run under a name no other run uses.
"""
from __future__ import annotations

import errno
import os
import re
import threading
import time
import uuid
from typing import Callable, TypeVar
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from drn.io import atomic_write
from pipeline.errors import StorageError

T = TypeVar("T")

SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
OBJECT_STORES = ("s3", "gs")


# -- resolving URIs ------------------------------------------------------------------------
_FS_CACHE: dict[tuple, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def split_uri(uri: str) -> tuple[str, str]:
    """(scheme, path as pyarrow wants it): "local" -> absolute path, "s3" -> bucket/key.
    Trailing slashes are dropped."""
    match = SCHEME_RE.match(uri)
    scheme = match.group(1).lower() if match else ""
    if scheme in OBJECT_STORES:
        path = uri[match.end():].strip("/")
        if not path:
            raise ValueError(f"{uri}: an {scheme}:// URI needs a bucket name "
                             f"({scheme}://bucket/key)")
        return scheme, path
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri}: file:// URIs must name a local path (file:///path)")
        return "local", _local_path(unquote(parts.path))
    if scheme:
        raise ValueError(f"{uri}: unsupported scheme '{scheme}://' "
                         "(use a local path, file://, s3:// or gs://)")
    return "local", _local_path(uri)


def _local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else os.getcwd()


def to_uri(scheme: str, path: str) -> str:
    """The inverse of resolution: a local path stays a path; s3 and gs get their scheme back."""
    return f"{scheme}://{path}" if scheme in OBJECT_STORES else path


def _s3_filesystem() -> pafs.FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    access_key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
    session_token = os.environ.get("AWS_SESSION_TOKEN")
    # The credentials' key id is part of the key so that a changed environment (tests,
    # a rotated key) gets a new client; the secret itself is not kept in the key.
    key = ("s3", endpoint, region, access_key, session_token is not None)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is not None:
            return fs
        kwargs: dict = {}
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme
        if region:
            kwargs["region"] = region
        # Bounded in time: a stalled connection fails (and is retried as transient).
        kwargs.update(connect_timeout=10.0, request_timeout=60.0)
        if access_key and secret_key:  # otherwise the SDK's default chain (profile, IMDS, IRSA)
            kwargs.update(access_key=access_key, secret_key=secret_key)
            if session_token:
                kwargs["session_token"] = session_token
        fs = pafs.S3FileSystem(**kwargs)
        _FS_CACHE[key] = fs
        return fs


def _gcs_filesystem() -> pafs.FileSystem:
    """pyarrow's GCS filesystem. STORAGE_EMULATOR_HOST (the variable Google's own clients
    honour, e.g. ``http://127.0.0.1:9023``) points it at an emulator without credentials;
    otherwise Google's default credentials (GOOGLE_APPLICATION_CREDENTIALS, the metadata
    server, gcloud's login) are used."""
    from datetime import timedelta

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    key = ("gs", emulator)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            # pyarrow's own retries stay short: read_bytes retries transient failures itself,
            # and a missing credential must not cost minutes per image.
            kwargs: dict = {"retry_time_limit": timedelta(seconds=10)}
            if emulator:
                parts = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
                kwargs.update(anonymous=True, endpoint_override=parts.netloc, scheme=parts.scheme)
            fs = _FS_CACHE[key] = pafs.GcsFileSystem(**kwargs)
        return fs


def open_range(fs: pafs.FileSystem, path: str, offset: int, size: int) -> bytes:
    """`size` bytes of `path` from `offset` (a ranged read). pyarrow's GCS random-access
    files stall against the storage emulator, so on GCS the object is streamed up to the
    end of the range instead (correct everywhere, slower for far offsets)."""
    if fs.type_name == "gcs":
        with fs.open_input_stream(path) as f:
            return f.read(offset + size)[offset:]
    with fs.open_input_file(path) as f:
        return f.read_at(size, offset)


def open_random_access(fs: pafs.FileSystem, path: str):
    """A seekable file for `path` (tar headers, Parquet footers); on GCS the object is read
    into memory first (see `open_range`)."""
    if fs.type_name == "gcs":
        with fs.open_input_stream(path) as f:
            return pa.BufferReader(f.read())
    return fs.open_input_file(path)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `uri` and the path on it (no trailing slash).

    Local paths (relative ones against the working directory), ``file://`` and
    ``s3://bucket/key``. S3 honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (with its
    http/https scheme), AWS_REGION / AWS_DEFAULT_REGION and the usual credential
    variables, read when a filesystem is first made; filesystems are cached per process.
    """
    scheme, path = split_uri(uri)
    if scheme == "s3":
        return _s3_filesystem(), path
    if scheme == "gs":
        return _gcs_filesystem(), path
    return pafs.LocalFileSystem(), path


def is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def write_table_atomic(output: str, name: str, table: pa.Table) -> str:
    """Write ``table`` as OUTPUT/name so that readers see all of it or nothing."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(output, name, buf.getvalue())
    fs, root = resolve(output)
    return f"{root}/{name}"


def put_object(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One PutObject: the object appears whole or not at all.

    pyarrow's S3 output stream always goes through a multipart upload, whose completion
    some S3-compatible servers reject; a Parquet file or side file is written once, whole,
    so a single PUT (up to 5 GiB) is both simpler and atomic. boto3 reads the endpoint
    (AWS_ENDPOINT_URL_S3), region and credentials from the environment as pyarrow does.
    """
    if fs.type_name != "s3":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    import boto3

    bucket, _, key = path.partition("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    boto3.client("s3", region_name=region, endpoint_url=endpoint).put_object(
        Bucket=bucket, Key=key, Body=data)


def write_bytes_atomic(output: str, name: str, data: bytes | pa.Buffer) -> None:
    """The one way a file is written into OUTPUT (data files and side files alike): local
    files through `drn.io.atomic_write` (a hidden ``.<name>.<uuid>.part`` renamed into
    place), object stores with one PUT. Readers see the old file or the whole new one."""
    fs, root = resolve(output)
    final = f"{root}/{name}"
    parent = final.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_local(fs):
        with atomic_write(final) as f:
            f.write(data)
    else:
        put_object(fs, final, data.to_pybytes() if isinstance(data, pa.Buffer) else data)


PART_RE = re.compile(r"^\.(?P<name>part-[^/]+\.parquet|[^/]+\.json)\.[0-9a-f]{32}\.part$")
"""Names of what a writer killed mid-write leaves (see `drn.io.atomic_write`): only ours."""


def os_error_text(exc: BaseException) -> str:
    """One line for a storage error: its reason (``No space left on device``) and the file
    it names, whatever raised it (the OS, pyarrow's filesystems, an object store's client)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


STORAGE_RETRY_S = 120.0
"""How long a failing write is retried before the run gives up on it (a disk that fills up
and is freed, an object store that throttles for a while)."""

# What waiting does not cure: the write would fail the same way on every attempt.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                     errno.ENAMETOOLONG, errno.EINVAL}
_PERMANENT_S3_CODES = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "NoSuchBucket",
                       "SignatureDoesNotMatch", "InvalidBucketName", "AccountProblem"}
_PERMANENT_TEXT = ("ACCESS_DENIED", "AccessDenied", "NoSuchBucket", "NO_SUCH_BUCKET",
                   "Permission denied", "Read-only file system", "InvalidAccessKeyId")


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable `name`; `default` when it is unset, empty or
    not a number."""
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def storage_retry_s() -> float:
    """The retry budget in force: ``DRN_LABEL_STORAGE_RETRY_S`` when set, else 120 s."""
    return max(0.0, env_seconds("DRN_LABEL_STORAGE_RETRY_S", STORAGE_RETRY_S))


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may pass by waiting: a full disk (ENOSPC, EDQUOT), an I/O
    error, a timeout, an object store's 5xx or throttling. No permission, a read-only
    filesystem or a missing bucket will not."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno not in _PERMANENT_ERRNOS
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code not in _PERMANENT_S3_CODES and status not in (400, 403, 404)
    return not any(text in str(exc) for text in _PERMANENT_TEXT)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """OSError (the OS, pyarrow's filesystems) and boto3's errors (S3 PUTs)."""
    try:
        import botocore.exceptions

        return (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
    except ImportError:
        return (OSError,)


def with_storage_retries(attempt: Callable[[], T], *, what: str, budget_s: float | None = None,
                         sleep: Callable[[float], None] = time.sleep) -> T:
    """`attempt()`, retried with backoff (0.5 s doubling to 10 s) while it fails with a
    transient storage error, for at most `budget_s` (`storage_retry_s()`). Then, or at once
    for a permanent error, a `StorageError`: "`what`: <reason>". Other exceptions (a lost
    lease) pass through untouched."""
    budget = storage_retry_s() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return attempt()
        except StorageError:
            raise
        except _storage_errors() as exc:
            if not is_transient(exc):
                raise StorageError(f"{what}: {os_error_text(exc)}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                tried = f" (still failing after {budget:.0f} s of retries)" if budget else ""
                raise StorageError(f"{what}: {os_error_text(exc)}{tried}") from None
            sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


PROBE_NAME = ".write-check.json.{}.part"
"""A start-of-run probe's file name (a 32-digit hex id in the braces): a part file's shape."""


def probe_writable(output: str, folder: str) -> None:
    """Create and remove a small file in OUTPUT/`folder`, or in OUTPUT itself while the
    folder does not exist yet (the run creates it there; a probe creates no folder but
    OUTPUT), so that a run finds what it cannot write at its start, not at its first
    commit. The name is this probe's own (two runs probing at once never touch each
    other's file) and has the shape of a killed writer's part file, so
    `reconcile.clean_tmp` removes one a kill leaves. Raises OSError naming the folder."""
    fs, root = resolve(output)
    where = f"{root}/{folder}"
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        where = root
        fs.create_dir(root, recursive=True)
    path = f"{where}/{PROBE_NAME.format(uuid.uuid4().hex)}"
    try:
        if is_local(fs):
            with open(path, "xb") as f:  # a full disk refuses the write (or its close)
                f.write(b"{}")
            os.unlink(path)
        else:
            put_object(fs, path, b"{}")
            fs.delete_file(path)
    except OSError as exc:
        if not exc.strerror:
            raise
        raise OSError(exc.errno, exc.strerror, where) from None


def read_bytes_or_none(output: str, name: str) -> bytes | None:
    fs, root = resolve(output)
    try:
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


