"""Reading a batch of URIs: each goes to the source that owns it (the registry's table),
and every failure comes back as that URI's ReadError, never as an exception."""
from __future__ import annotations

import pyarrow.fs as pafs

from pipeline.store.sources.base import DEFAULT_MAX_BYTES, ReadError, ReadOptions
from pipeline.store.sources.files import read_file
from pipeline.store.sources.registry import SOURCES, reader_of
from pipeline.store.sources.retry import reason


def read_all(uris: list[str | None], *, retries: int = 3, max_bytes: int = DEFAULT_MAX_BYTES,
             allow_private_urls: bool = False, backoff: float = 0.2
             ) -> list[bytes | ReadError | None]:
    """The bytes of each URI, or the ReadError that names why not, in order (None for a
    None entry: a row that is not to be read).

    URIs are grouped by the source that reads them, and each source reads its group at
    once: http(s) URLs concurrently, rows of one embedded-bytes Parquet file in one pass
    over their row groups, shard members as ranged reads, files one by one.
    """
    options = ReadOptions(retries=retries, max_bytes=max_bytes,
                          allow_private_urls=allow_private_urls, backoff=backoff)
    out: list[bytes | ReadError | None] = [None] * len(uris)
    groups: dict[int, list[int]] = {}
    for i, uri in enumerate(uris):
        if uri is not None:
            groups.setdefault(SOURCES.index(reader_of(uri)), []).append(i)
    for index, members in groups.items():
        wanted = [uris[i] for i in members]
        try:
            results = SOURCES[index].read(wanted, options)
        except Exception as exc:  # noqa: BLE001 - a source's own failure: each URI's error row
            results = [ReadError(uri, reason(exc), 1, False) for uri in wanted]
        for i, result in zip(members, results):
            out[i] = result
    return out


def read_bytes(uri: str, *, retries: int = 3, backoff: float = 0.2,
               filesystem: pafs.FileSystem | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
               allow_private_urls: bool = False) -> bytes:
    """The whole object at `uri` (at most `max_bytes` of it), or a ReadError (one line: the
    URI, the reason, the attempts).

    Transient failures are retried up to `retries` times by the one retry rule
    (pipeline.store.sources.retry); permanent ones fail at once. `filesystem` replaces
    the filesystem a file URI resolves to (the path is still taken from `uri`): the hook
    for fault injection and custom stores.
    """
    if filesystem is not None:
        return read_file(uri, retries=retries, backoff=backoff, filesystem=filesystem,
                         max_bytes=max_bytes)
    result = read_all([uri], retries=retries, max_bytes=max_bytes,
                      allow_private_urls=allow_private_urls, backoff=backoff)[0]
    if isinstance(result, ReadError):
        raise result
    return result
