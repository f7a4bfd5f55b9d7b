"""The interface every input kind implements, and what crosses between them.

A `Source` lists the images of an INPUT it recognises (`plan`, `units`, `list`) and reads
the bytes of the URIs it owns (`reads`, `read`). Listing streams unit by unit (a sub-folder,
a row group, a shard), so a job can spread it over tasks and the driver never holds the
whole input list. Reading takes a batch of URIs and answers each with its bytes or a
`ReadError`: one bad image never fails its batch.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import DrnLabelError
from pipeline.store.fs import to_uri

IMAGE_EXTENSIONS = ("bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp")
"""Extensions a directory listing picks up, in any letter case."""

IMAGE_RE = r"(?i)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$"
HIDDEN_RE = r"(^|/)\."

INPUT_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("error", pa.string())])
"""What listing yields: one row per input; `error` (null for most) says why an input found
while listing cannot be read (a FIFO, a name that is not UTF-8, a URI outside the
manifest's bucket, a shard cut short): it becomes that input's error row without being
opened."""

DEFAULT_MAX_BYTES = 256 << 20
"""Largest image file read (bytes); larger ones become error rows (`--max-bytes`)."""

LIST_BLOCK_ROWS = 1024
"""Rows per block a listing unit yields when the caller does not say."""


class InputError(DrnLabelError, ValueError):
    """INPUT cannot be listed; the message names it and says what to do."""


class ReadError(OSError):
    """An image's bytes could not be read, after retries where the failure was transient.

    One line: the URI, the reason, the attempts made. `transient` says whether the last
    failure was of the retryable kind (so a later rerun may succeed); `stopped` says why
    retrying ended early, when it did (the fetch's deadline).
    """

    def __init__(self, uri: str, reason: str, attempts: int, transient: bool,
                 stopped: str | None = None) -> None:
        if stopped:
            kind = f"transient error, {stopped}"
        else:
            kind = ("transient error, retries exhausted" if transient
                    else "permanent error, not retried")
        plural = "" if attempts == 1 else "s"
        super().__init__(f"{uri}: could not read ({reason}; {attempts} attempt{plural}, {kind})")
        self.uri, self.reason, self.attempts, self.transient = uri, reason, attempts, transient
        self.stopped = stopped

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # keep the fields when pickled across processes
        return (type(self), (self.uri, self.reason, self.attempts, self.transient, self.stopped))


class TooLarge(OSError):
    """A file larger than the byte cap, or not a regular file: permanent, never retried."""


def too_large(max_bytes: int) -> str:
    return f"larger than the byte cap of {max_bytes:,} bytes (--max-bytes)"


@dataclass(frozen=True)
class InputPlan:
    """What INPUT is and how to list it, decided from a few metadata calls; the listing
    itself runs unit by unit (`Source.units`, `Source.list`).

    kind: the name of the input kind (see `pipeline.store.sources.registry.KINDS`), e.g.
    "directory", "glob", "image", "txt", "csv", "parquet", "embedded", "tar", "shards".
    `path` is the manifest, image, Parquet or shard file, or the folder that image_ids are
    relative to. `units` are the listing units a directory or glob is known to have when
    planned (an object store's sub-prefixes); other kinds work theirs out when asked.
    """

    input: str
    kind: str
    scheme: str
    path: str
    pattern: str | None = None  # glob: an anchored regex over paths relative to `path`
    recursive: bool = True
    has_image_id: bool = False  # csv/parquet manifest: an image_id column is present
    units: tuple[str, ...] = ("",)
    image_column: str | None = None  # embedded: the column holding the image bytes
    id_column: str | None = None  # embedded: where image_ids come from (None: row numbers)

    @property
    def is_manifest(self) -> bool:
        return self.kind in ("txt", "csv", "parquet")


@dataclass(frozen=True)
class Target:
    """INPUT as planning sees it: resolved, looked at once (`info`), and split at its first
    wildcard when it is a glob that names no file (`glob_base`, `glob_pattern`)."""

    input: str
    scheme: str
    path: str
    fs: pafs.FileSystem
    info: pafs.FileInfo
    glob_base: str | None = None
    glob_pattern: str | None = None

    @property
    def is_glob(self) -> bool:
        return self.glob_pattern is not None


@dataclass(frozen=True)
class ReadOptions:
    """How a batch is read: what `decode_batch` gets from the job spec."""

    retries: int = 3
    max_bytes: int = DEFAULT_MAX_BYTES
    allow_private_urls: bool = False  # --allow-private-urls
    backoff: float = 0.2  # seconds before the first retry (see retry.backoff_delay)


class Source:
    """One input kind: how to recognise it, list it and read what it lists.

    A kind that only lists (a manifest: its rows name files and URLs that other kinds
    read) leaves `reads` False; one that only reads (http(s) URLs) leaves `plan` None.
    """

    kinds: tuple[str, ...] = ()
    """The InputPlan kinds this source lists."""

    def plan(self, target: Target) -> InputPlan | None:
        """An InputPlan when `target` is this kind of input, else None (the next source is
        asked); an InputError when it is this kind but cannot be listed."""
        return None

    def units(self, plan: InputPlan) -> list[str]:
        """The independent listing units of `plan` (each listed by one task)."""
        return list(plan.units)

    def list(self, plan: InputPlan, unit: str, *, block_rows: int = LIST_BLOCK_ROWS
             ) -> Iterator[pa.Table]:
        """The images of one unit as INPUT_SCHEMA blocks (about `block_rows` rows each)."""
        raise NotImplementedError

    def unit_failed(self, plan: InputPlan, unit: str, reason: str) -> pa.Table:
        """The error row standing for a unit that could not be listed (after retries):
        named by the unit's URI, so the rest of the input is still labelled."""
        where = to_uri(plan.scheme, plan.path)
        if unit not in ("", "*"):
            where = f"{where.rstrip('/')}/{unit}"
        return error_rows([where], [where], f"could not be listed ({reason}); the images in it "
                          "were not listed")

    def reads(self, uri: str) -> bool:
        """Whether this source reads `uri`."""
        return False

    def read(self, uris: list[str], options: ReadOptions) -> list[bytes | ReadError]:
        """The bytes of each URI (all owned by this source), or the ReadError naming why
        not, in order. Never raises for one image."""
        raise NotImplementedError


def error_rows(image_ids: list[str], uris: list[str], error: str) -> pa.Table:
    """Listing rows that carry `error` (never read; they become error rows)."""
    return pa.table({"image_id": image_ids, "uri": uris, "error": [error] * len(uris)},
                    schema=INPUT_SCHEMA)


def row_group_failed(plan: InputPlan, unit: str, reason: str, what: str) -> pa.Table:
    """The error row of a row group ("<group>:<first row>" unit) that could not be read. Like
    every listing error it is shown after the row's uri, which names the file."""
    group = unit.split(":")[0]
    uri = f"{to_uri(plan.scheme, plan.path)}#row-group={group}"
    return error_rows([f"{posixpath.basename(plan.path)}#row-group={group}"], [uri],
                      f"row group {group} could not be read ({reason}); its {what} were not "
                      "listed")


def one_line(text: object) -> str:
    return " ".join(str(text).split())
