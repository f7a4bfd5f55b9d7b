"""Image files: a directory (listed recursively), a glob, or one image; local, s3:// or
gs://. Also the reader of every plain file URI (what a manifest row names, unless it is a
URL, an embedded row or a shard member).

Listing is one recursive ``get_file_info(FileSelector)`` call per unit plus vectorised
Arrow compute on an object store, and `walk_local` on a local tree, so a million files
cost one listing, not a million Python-level checks.
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.store.fs import is_local, resolve, split_uri, to_uri
from pipeline.store.sources.base import (HIDDEN_RE, IMAGE_RE, INPUT_SCHEMA, InputPlan, ReadError,
                                         ReadOptions, Source, Target, TooLarge, too_large)
from pipeline.store.sources.retry import with_retries
from pipeline.store.sources.walk import special_file_kind, walk_local

_CHUNK = 1 << 20


def listing_units(fs: pafs.FileSystem, base: str) -> tuple[str, ...]:
    """"" (the files directly in `base`) and its visible sub-folders: one listing each on an
    object store; a local tree is one unit ("*"), walked once by `walk_local`: symlinks may
    join its folders, and a file must be listed once under its real name."""
    if is_local(fs):
        return ("*",)
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    folders = sorted(i.base_name for i in entries
                     if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    # A store that reports no sub-prefixes in a listing (the GCS emulator) is listed whole.
    return ("", *folders) if folders else ("*",)


def list_files(plan: InputPlan, unit: str) -> pa.Table:
    """`path`, `rel` (relative to plan.path) and `error` of the files of one unit that
    match the plan's pattern (images, for a directory), hidden ones skipped."""
    fs, _ = resolve(plan.input)
    if unit == "*":  # the whole tree at once
        listed = _listing(fs, plan.path, recursive=plan.recursive)
    elif unit:
        listed = _listing(fs, f"{plan.path.rstrip('/')}/{unit}", recursive=True)
        listed = listed.set_column(1, "rel", pc.binary_join_element_wise(unit + "/", listed["rel"], ""))
    else:
        listed = _listing(fs, plan.path, recursive=False)
    return listed.filter(pc.match_substring_regex(listed["rel"], plan.pattern or IMAGE_RE))


def _listing(fs: pafs.FileSystem, base: str, recursive: bool) -> pa.Table:
    if is_local(fs):
        rows = list(walk_local(base, recursive=recursive))
        return pa.table({"path": [r[0] for r in rows], "rel": [r[1] for r in rows],
                         "error": [r[2] for r in rows]},
                        schema=pa.schema([("path", pa.string()), ("rel", pa.string()),
                                          ("error", pa.string())]))
    selector = pafs.FileSelector(base, recursive=recursive)
    paths = pa.array([i.path for i in fs.get_file_info(selector) if i.is_file], pa.string())
    prefix = base.rstrip("/") + "/"
    relative = pc.utf8_slice_codeunits(paths, len(prefix))
    visible = pc.invert(pc.match_substring_regex(relative, HIDDEN_RE))
    paths, relative = paths.filter(visible), relative.filter(visible)
    return pa.table({"path": paths, "rel": relative, "error": pa.nulls(len(paths), pa.string())})


def read_file(uri: str, *, retries: int = 3, backoff: float = 0.2,
              filesystem: pafs.FileSystem | None = None, max_bytes: int) -> bytes:
    """The whole file at `uri`, at most `max_bytes` of it, by the one retry rule.

    Bounded: a local path is checked with stat before it is opened (a FIFO, a device or
    a socket is refused, never read or waited on), and no more than `max_bytes` + 1 bytes
    are read from anything, so `/dev/zero` or a huge object costs at most the cap.
    Object-store reads are bounded in time by the filesystem's own request timeouts
    (pipeline.store.fs). `filesystem` replaces the one `uri` resolves to (fault injection).
    """
    def fetch() -> bytes:
        if filesystem is None:
            fs, path = resolve(uri)
        else:
            fs, path = filesystem, split_uri(uri)[1]
        if is_local(fs):
            mode = os.stat(path).st_mode
            kind = special_file_kind(mode)
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(path)
            if kind:
                raise TooLarge(f"{kind}, not an image file")
        with fs.open_input_stream(path) as stream:
            return _read_capped(stream, max_bytes)
    return with_retries(uri, fetch, retries=retries, backoff=backoff)


def _read_capped(stream, max_bytes: int) -> bytes:
    """All of `stream`, in chunks (memory grows with the file, never with the cap)."""
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise TooLarge(too_large(max_bytes))


class FileSource(Source):
    kinds = ("directory", "glob", "image")

    def plan(self, target: Target) -> InputPlan | None:
        if target.is_glob:
            pattern = target.glob_pattern
            recursive = "/" in pattern or "**" in pattern
            units = listing_units(target.fs, target.glob_base) if recursive else ("",)
            return InputPlan(target.input, "glob", target.scheme, target.glob_base,
                             glob_to_regex(pattern), recursive, units=units)
        if target.info.type == pafs.FileType.Directory:
            return InputPlan(target.input, "directory", target.scheme, target.path,
                             units=listing_units(target.fs, target.path))
        if re.search(IMAGE_RE, target.path):
            return InputPlan(target.input, "image", target.scheme, target.path)
        return None

    def list(self, plan: InputPlan, unit: str, *, block_rows: int = 0) -> Iterator[pa.Table]:
        if plan.kind == "image":
            yield pa.table({"image_id": [posixpath.basename(plan.path)],
                            "uri": [to_uri(plan.scheme, plan.path)], "error": [None]},
                           schema=INPUT_SCHEMA)
            return
        listed = list_files(plan, unit)
        paths = listed["path"]
        uris = paths if plan.scheme == "local" else \
            pc.binary_join_element_wise(f"{plan.scheme}://", paths, "")
        yield pa.table({"image_id": listed["rel"], "uri": uris, "error": listed["error"]},
                       schema=INPUT_SCHEMA)

    def reads(self, uri: str) -> bool:
        return True  # the fallback: whatever no other source claims is a file

    def read(self, uris: list[str], options: ReadOptions) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for uri in uris:
            try:
                out.append(read_file(uri, retries=options.retries, backoff=options.backoff,
                                     max_bytes=options.max_bytes))
            except ReadError as exc:
                out.append(exc)
        return out


def glob_to_regex(pattern: str) -> str:
    """An anchored RE2 regex for a glob over '/'-separated relative paths: ``*``, ``?``
    and ``[...]`` stay within one folder, ``**`` spans any number of folders."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        char = pattern[i]
        if pattern.startswith("**", i) and (i == 0 or pattern[i - 1] == "/"):
            if pattern.startswith("**/", i):
                out.append("(?:[^/]*/)*")  # zero or more folders
                i += 3
                continue
            if i + 2 == n:
                out.append(".*")
                i += 2
                continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = "".join(c if c.isalnum() or c == "-" else f"\\x{{{ord(c):x}}}" for c in body)
            out.append(f"[{'^/' if negate else ''}{body}]")
            i = end + 1
            continue
        else:
            out.append(char if char.isalnum() else f"\\x{{{ord(char):x}}}")
        i += 1
    return "^" + "".join(out) + "$"


SOURCE = FileSource()
