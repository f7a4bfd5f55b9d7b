"""The one retry rule of every source: which failures are transient, how long to wait.

A read is retried when its failure is transient (`is_transient`): up to `retries` more
attempts, waiting `backoff_delay` between them (an HTTP Retry-After replaces the
computed wait, up to MAX_WAIT_S). A deadline, when given, ends the retries early: no
attempt starts that could not finish before it. Every failure ends as a `ReadError`
naming the URI, the reason and the attempts.
"""
from __future__ import annotations

import errno
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from pipeline.store.sources.base import ReadError, TooLarge

T = TypeVar("T")

MAX_WAIT_S = 30.0
"""Longest wait between two attempts (a Retry-After above it is cut to it)."""

_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                    FileExistsError)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EIO", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED",
        "ECONNABORTED", "EPIPE", "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTUNREACH",
        "EHOSTDOWN", "ESTALE")
    if hasattr(errno, name))
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOENT", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "ENAMETOOLONG", "ELOOP", "EINVAL",
        "EROFS")
    if hasattr(errno, name))
_HTTP_STATUS = re.compile(r"http (?:status|response code)[: ]*(\d{3})")
_TRANSIENT_WORDS = re.compile(
    r"timeout|timed out|connection|reset by peer|refused|broken pipe|temporar|try again"
    r"|throttl|slow ?down|slow_down|too many requests|request limit|service unavailable"
    r"|unavailable|internal ?error|internal_failure|network|unreachable|curlcode"
    r"|unexpected eof|premature end")


class ReadFailure(OSError):
    """A failure that says itself whether it is transient and how long to wait (an HTTP
    status with its Retry-After); its text is the reason, as is."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None):
        super().__init__(message)
        self.transient, self.retry_after = transient, retry_after

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class Deadline:
    """The end of the time one read may take, retries included; set when its first attempt
    starts (`start`), so time spent queueing for a connection does not count."""

    seconds: float
    at: float | None = None

    def start(self) -> float:
        if self.at is None:
            self.at = time.monotonic() + self.seconds
        return self.at


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the read that raised `exc` may succeed.

    Transient: connection and timeout errors, network-ish errno values (EIO included:
    FUSE mounts of object stores report network failures that way), object-store
    throttling and 5xx responses. Permanent: not found, permission denied, a directory,
    other 4xx responses, and anything that is not an OSError (bad URIs, bad arguments).
    """
    if isinstance(exc, (ReadError, ReadFailure)):
        return exc.transient
    if isinstance(exc, TooLarge):
        return False
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, OSError):
        return False
    if exc.errno in _TRANSIENT_ERRNOS:
        return True
    if exc.errno in _PERMANENT_ERRNOS:
        return False
    message = str(exc).lower()
    status = _HTTP_STATUS.search(message)
    if status:
        code = int(status.group(1))
        return code >= 500 or code in (408, 429)
    return bool(_TRANSIENT_WORDS.search(message))


def reason(exc: BaseException) -> str:
    """`exc` as the one-line reason of a ReadError."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = " ".join(str(exc).split()) or "no detail"
    if isinstance(exc, IsADirectoryError) or text.endswith("is a directory"):
        return "is a directory"
    if text.startswith("Not a regular file"):  # an S3 bucket, or a prefix with a marker
        return "not a file"
    if isinstance(exc, (TooLarge, ReadFailure)):
        return text
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


def backoff_delay(attempt: int, backoff: float) -> float:
    """The wait after failed attempt number `attempt` (1, 2, ...): `backoff` * 2**(attempt-1)
    seconds, scaled by a random factor in 0.5..1.5 so that workers do not retry in step."""
    return backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def with_retries(uri: str, fetch: Callable[[], T], *, retries: int, backoff: float = 0.2,
                 deadline: Deadline | None = None) -> T:
    """`fetch()`, retried by the rule above; any failure ends in a ReadError for `uri`.

    `deadline` bounds the whole: no retry is started once the wait would reach it. Failures other than OSError, Arrow and tar errors are permanent
    (a malformed URI, a protocol violation): they end at once, still as a ReadError.
    """
    attempts = 0
    while True:
        attempts += 1
        try:
            return fetch()
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes this URI's ReadError
            transient = is_transient(exc)
            why = reason(exc)
            if not transient or attempts > retries:
                raise ReadError(uri, why, attempts, transient) from exc
            retry_after = getattr(exc, "retry_after", None)
            delay = min(retry_after if retry_after is not None else backoff_delay(attempts, backoff),
                        MAX_WAIT_S)
            if deadline is not None and deadline.at is not None \
                    and time.monotonic() + delay >= deadline.at:
                raise ReadError(uri, why, attempts, transient,
                                stopped="no time left before the deadline") from exc
        time.sleep(delay)
