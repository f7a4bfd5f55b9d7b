"""http(s) URLs in a manifest (web-scale URL tables): image_id as for any manifest row.

What is fetched, and only that:
- http and https only; redirects (301, 302, 303, 307, 308) are followed at most
  MAX_REDIRECTS hops, and only to http(s) URLs;
- every hop's host is resolved once and its address checked: loopback, link-local (the
  cloud metadata service), private and other non-public addresses are refused unless
  the run allows them (`--allow-private-urls`); the connection goes to the address that
  was checked, so a name that resolves differently a moment later (DNS rebinding) cannot
  slip through;
- one deadline per image (DRN_LABEL_HTTP_TIMEOUT, default 30 s) covers the whole fetch,
  from the first connect to the last byte, retries included: a server that trickles
  bytes is cut off at the deadline, not waited on read after read;
- at most DRN_LABEL_HTTP_PER_HOST (default 8) requests in flight per host per worker;
  429, 408 and 5xx are retried with backoff (honouring Retry-After, within the deadline);
  any other status, a malformed URL, an answer that is not HTTP or a body above the byte
  cap is an error row naming it.
No proxy is used: the address checked must be the address fetched.
"""
from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urljoin, urlsplit

from pipeline.store.sources.base import ReadError, ReadOptions, Source, TooLarge, too_large
from pipeline.store.sources.retry import Deadline, ReadFailure, with_retries

HTTP_TIMEOUT_S = 30.0
"""Deadline of one image's fetch, retries included (DRN_LABEL_HTTP_TIMEOUT overrides)."""
HTTP_PER_HOST = 8
"""Requests in flight to one host from one worker process (DRN_LABEL_HTTP_PER_HOST)."""
HTTP_MAX_BYTES = 256 << 20
MAX_REDIRECTS = 5
PRIVATE_HINT = ("private, loopback and link-local addresses are fetched only with "
                "--allow-private-urls")

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16
_HOST_SLOTS: dict[str, threading.BoundedSemaphore] = {}
_HOST_LOCK = threading.Lock()
_SAFE_IN_TARGET = "/:?#[]@!$&'()*+,;=%~"


@functools.lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    """The system's trusted certificates, loaded on the first https fetch."""
    return ssl.create_default_context()


def is_http(uri: str) -> bool:
    return uri[:8].lower().startswith(("http://", "https://"))


class WebSource(Source):
    def reads(self, uri: str) -> bool:
        return is_http(uri)

    def read(self, uris: list[str], options: ReadOptions) -> list[bytes | ReadError]:
        """Fetched concurrently (at most DRN_LABEL_HTTP_PER_HOST per host)."""
        with ThreadPoolExecutor(max_workers=min(len(uris), 32)) as pool:
            return list(pool.map(lambda uri: _read_one(uri, options), uris))


def _read_one(uri: str, options: ReadOptions) -> bytes | ReadError:
    try:
        seconds = float(os.environ.get("DRN_LABEL_HTTP_TIMEOUT", HTTP_TIMEOUT_S))
    except ValueError:
        return ReadError(uri, "DRN_LABEL_HTTP_TIMEOUT is not a number of seconds", 1, False)
    deadline = Deadline(seconds)
    cap = min(HTTP_MAX_BYTES, options.max_bytes)

    def attempt() -> bytes:
        with _host_slot(uri):
            return fetch(uri, max_bytes=cap, allow_private=options.allow_private_urls,
                         deadline=deadline)
    try:
        return with_retries(uri, attempt, retries=options.retries, backoff=options.backoff,
                            deadline=deadline)
    except ReadError as exc:
        return exc


def _host_slot(uri: str) -> threading.BoundedSemaphore:
    host = uri.split("/", 3)[2].lower() if uri.count("/") >= 2 else ""  # as written: never raises
    with _HOST_LOCK:
        slot = _HOST_SLOTS.get(host)
        if slot is None:
            limit = int(os.environ.get("DRN_LABEL_HTTP_PER_HOST", HTTP_PER_HOST))
            slot = _HOST_SLOTS[host] = threading.BoundedSemaphore(max(1, limit))
        return slot


def fetch(uri: str, *, max_bytes: int, allow_private: bool, deadline: Deadline) -> bytes:
    """One attempt at the body of `uri` (redirects followed), by the rules above. Raises
    ReadFailure (transient or not), TooLarge or an OSError for the retry rule to judge."""
    end = deadline.start()
    current = uri
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, target = _parse(current)
        address = _checked_address(host, port, allow_private)
        status, location, body = _request(scheme, host, port, target, address, end, max_bytes,
                                          deadline.seconds)
        if status in _REDIRECTS:
            if not location:
                raise ReadFailure(f"HTTP {status} redirect without a Location", transient=False)
            current = urljoin(current, location.strip())
            if not is_http(current):
                raise ReadFailure(f"redirected to {current[:200]}: only http(s) URLs are fetched",
                                  transient=False)
            continue
        return body
    raise ReadFailure(f"more than {MAX_REDIRECTS} redirects", transient=False)


def _parse(uri: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an http(s) URL, or a permanent ReadFailure
    that says what is malformed."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:  # "http://host:abc/x.png", an unclosed "[" in the host
        raise ReadFailure(f"malformed URL ({exc})", transient=False) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ReadFailure(f"only http(s) URLs are fetched, not {scheme or 'this'}://",
                          transient=False)
    if not parts.hostname:
        raise ReadFailure("malformed URL (no host)", transient=False)
    target = quote(parts.path or "/", safe=_SAFE_IN_TARGET)
    if parts.query:
        target += "?" + quote(parts.query, safe=_SAFE_IN_TARGET)
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), target


def address_kind(address: str) -> str | None:
    """Why `address` is not fetched by default ("a loopback address", ...), None for a
    public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if ip.is_private:
        return "a private address"
    if not ip.is_global or ip.is_multicast:
        return "not a public address"
    return None


def _checked_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to: the first of `host`'s addresses that may be fetched."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        raise ReadFailure(f"malformed URL (host {host!r}: {exc})", transient=False) from None
    except socket.gaierror as exc:  # unknown name: permanent; a resolver failure: transient
        transient = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
        raise ReadFailure(f"cannot resolve host {host} ({exc.strerror})",
                          transient=transient) from None
    addresses = [info[4][0] for info in infos]
    if allow_private:
        return addresses[0]
    refused = []
    for address in addresses:
        kind = address_kind(address)
        if kind is None:
            return address
        refused.append((address, kind))
    address, kind = refused[0]
    what = f"{address} is" if address == host else f"{host} resolves to {address},"
    raise ReadFailure(f"refused: {what} {kind}; {PRIVATE_HINT}", transient=False)


class _Pinned:
    """What both pinned connections share: the socket they opened, kept so that the
    deadline can shut it even after http.client handed it to the response."""

    address: str
    opened: socket.socket | None = None
    expired = False

    def _open(self, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.address, port), timeout)
        self.opened = sock
        if self.expired:  # the deadline passed while connecting
            _shut(self)
        return sock


class _PinnedHTTP(_Pinned, http.client.HTTPConnection):
    """An HTTP connection to the checked `address`, whatever `host` resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        http.client.HTTPConnection.__init__(self, host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self._open(self.port, self.timeout)


class _PinnedHTTPS(_Pinned, http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked against `host`."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        http.client.HTTPSConnection.__init__(self, host, port, timeout=timeout, context=_tls())
        self.address = address

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(self._open(self.port, self.timeout),
                                              server_hostname=self.host)


def _request(scheme: str, host: str, port: int, target: str, address: str, end: float,
             max_bytes: int, seconds: float) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET; the body only for a 200. A timer shuts the
    socket at the deadline, so no read outlives it, however slowly bytes arrive."""
    left = end - time.monotonic()
    if left <= 0:
        raise _timed_out(seconds)
    conn = (_PinnedHTTPS if scheme == "https" else _PinnedHTTP)(host, port, address, left)
    watchdog = threading.Timer(left, _shut, (conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        try:
            conn.request("GET", target, headers={"User-Agent": "drn-label", "Accept": "image/*, */*"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if response.status != 200:
                raise ReadFailure(f"HTTP {response.status} {response.reason}".strip(),
                                  transient=response.status in (408, 429) or response.status >= 500,
                                  retry_after=_seconds(response.getheader("Retry-After")))
            declared = response.getheader("Content-Length")
            if declared and declared.strip().isdigit() and int(declared) > max_bytes:
                raise TooLarge(too_large(max_bytes))  # said up front: nothing read
            chunks, total = [], 0
            while True:
                chunk = response.read(min(_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise TooLarge(too_large(max_bytes))
                if time.monotonic() >= end:
                    raise _timed_out(seconds)
            return 200, None, b"".join(chunks)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= end - 0.01 and not isinstance(exc, (ReadFailure, TooLarge)):
                raise _timed_out(seconds) from None
            if isinstance(exc, http.client.RemoteDisconnected):
                raise ReadFailure("the server closed the connection without an answer",
                                  transient=True) from None
            if isinstance(exc, http.client.IncompleteRead):
                raise ReadFailure("the connection closed before the whole body arrived",
                                  transient=True) from None
            if isinstance(exc, http.client.HTTPException):
                raise ReadFailure(f"not an HTTP answer ({type(exc).__name__}: "
                                  f"{str(exc)[:100]!r})", transient=False) from None
            raise
    finally:
        watchdog.cancel()
        conn.close()


def _shut(conn: _Pinned) -> None:
    """The deadline: the connection's socket is shut, so a blocked read returns at once."""
    conn.expired = True
    if conn.opened is not None:
        try:
            conn.opened.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _timed_out(seconds: float) -> ReadFailure:
    return ReadFailure(f"timed out: no complete answer within {seconds:g} s "
                       "(DRN_LABEL_HTTP_TIMEOUT covers the whole fetch)", transient=True)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


SOURCE = WebSource()
