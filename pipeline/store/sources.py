"""Where images come from: resolve URIs to pyarrow filesystems, list inputs, read bytes.

INPUT is one of
- a directory (local, ``s3://bucket/prefix`` or ``gs://bucket/prefix``), listed recursively; image_id is the
  path relative to it with forward slashes;
- a glob (``photos/**/*.jpg``, ``s3://bucket/raw/*/cam?.png``): ``*``, ``?`` and
  ``[...]`` stay within one folder, ``**`` spans any number of folders, matching is
  case-sensitive as in a shell; image_id is relative to the glob's folder before the
  first wildcard;
- a manifest: ``.txt`` (one URI a line; blank lines and ``#`` comments skipped; the
  image_id is the URI as written) or ``.csv`` / ``.parquet`` with a ``uri`` column and
  an optional ``image_id`` column (the URI as written where absent); relative URIs
  resolve against the manifest's folder;
- a single image file (image_id: its file name);
- http(s) URLs in a manifest (web-scale URL tables): image_id as for any manifest row (the
  URL as written, or the ``image_id`` column). They are fetched with a timeout, at most
  ``DRN_LABEL_HTTP_PER_HOST`` (default 8) requests in flight per host per worker, retries
  with backoff on 429, 408 and 5xx (honouring Retry-After), and an error row naming the
  status for any other answer;
- a Parquet file whose image column holds the bytes (the Hugging Face ``datasets``
  ``Image`` struct ``{bytes, path}``; no ``uri`` column): image_id is the ``image_id``
  column, else the struct's ``path`` when every row has one, else ``<file name>#<row>``;
  the row's uri is ``<file>#row=<row index>``;
- WebDataset shards: a ``.tar`` file, or a glob of them (``shards/*.tar``), one image
  member per key (the member name up to the first dot of its base name); image_id is the
  key (``<shard path relative to the glob's folder>/<key>`` for a glob of shards); the
  row's uri is ``<shard>#<member>@<offset>+<size>`` (a ranged read, no unpacking).
Files and folders whose names start with "." are skipped by directory and glob listings.

Listing is one recursive ``get_file_info(FileSelector)`` call plus vectorised Arrow
compute, so a million files cost one listing, not a million Python-level checks.
"""
from __future__ import annotations

import errno
import os
import posixpath
import random
import re
import stat
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import DrnLabelError
from pipeline.store.fs import (SCHEME_RE, is_local, open_random_access, open_range, resolve,
                               split_uri, to_uri)

__all__ = [
    "IMAGE_EXTENSIONS", "INPUT_SCHEMA", "InputError", "InputPlan", "ReadError", "is_transient",
    "list_inputs", "list_unit", "manifest_rows", "plan_inputs", "read_all", "read_bytes",
    "resolve", "to_uri",
]

IMAGE_EXTENSIONS = ("bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp")
"""Extensions a directory listing picks up, in any letter case."""

INPUT_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("error", pa.string())])
"""What listing yields: one row per input; `error` (null for most) says why an input found
while listing cannot be read (a FIFO, a name that is not UTF-8, a URI outside the
manifest's bucket): it becomes that input's error row without being opened."""

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")

_IMAGE_RE = r"(?i)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$"
_HIDDEN_RE = r"(^|/)\."
_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(DrnLabelError, ValueError):
    """INPUT cannot be listed; the message names it and says what to do."""


class ReadError(OSError):
    """An image's bytes could not be read, after retries where the failure was transient.

    One line: the URI, the reason, the attempts made. `transient` says whether the last
    failure was of the retryable kind (so a later rerun may succeed).
    """

    def __init__(self, uri: str, reason: str, attempts: int, transient: bool) -> None:
        kind = ("transient error, retries exhausted" if transient
                else "permanent error, not retried")
        plural = "" if attempts == 1 else "s"
        super().__init__(f"{uri}: could not read ({reason}; {attempts} attempt{plural}, {kind})")
        self.uri, self.reason, self.attempts, self.transient = uri, reason, attempts, transient

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # keep the fields when pickled across processes
        return (type(self), (self.uri, self.reason, self.attempts, self.transient))


# -- listing inputs --------------------------------------------------------------------------
@dataclass(frozen=True)
class InputPlan:
    """What INPUT is and how to list it in independent units, decided from a few metadata
    calls: the listing itself (`list_unit`) and manifest reading (`manifest_rows`) run
    unit by unit, block by block, so a job can stream them (pipeline.job.plan) and the
    driver never holds the whole input list.

    kind: "directory", "glob", "txt", "csv", "parquet", "image", "embedded" (a Parquet
    file that holds image bytes), "tar" (one WebDataset shard) or "shards" (a glob whose
    last part ends in .tar: each matched shard's members). `path` is the manifest, image,
    Parquet or shard file, or the folder that image_ids are relative to. On an object store a
    directory or glob is listed in units: "" (the objects directly under `path`) and each
    sub-prefix (recursively), which is how a listing fans out over prefixes. A local tree
    is one unit, walked once by `walk_local`: symlinks may join its folders, and a file
    must be listed once under its real name.
    """

    input: str
    kind: str
    scheme: str
    path: str
    pattern: str | None = None  # glob: an anchored regex over paths relative to `path`
    recursive: bool = True
    has_image_id: bool = False  # csv/parquet manifest: an image_id column is present
    units: tuple[str, ...] = ("",)

    @property
    def is_manifest(self) -> bool:
        return self.kind in ("txt", "csv", "parquet")


def plan_inputs(input: str) -> InputPlan:  # noqa: A002 - the CLI's name for it
    """Decide how to list INPUT (see `InputPlan`); raise InputError, naming INPUT and the
    fix, when it cannot be listed at all."""
    try:
        scheme, path = split_uri(input)
        fs, _ = resolve(input)
    except ValueError as exc:
        raise InputError(f"input {exc}") from None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound and _GLOB_CHARS.search(path):
        parts = path.split("/")
        first = next(k for k, part in enumerate(parts) if _GLOB_CHARS.search(part))
        if scheme != "local" and first == 0:
            raise InputError(f"input {input}: the bucket name cannot hold a wildcard")
        base = "/".join(parts[:first]) or "/"
        pattern = "/".join(parts[first:])
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise InputError(f"input {input}: the glob's folder {to_uri(scheme, base)} does not "
                             "exist; check the path before the first wildcard")
        recursive = "/" in pattern or "**" in pattern
        kind = "shards" if pattern.lower().endswith(".tar") else "glob"
        return InputPlan(input, kind, scheme, base, glob_to_regex(pattern), recursive,
                         units=_units(fs, base) if recursive else ("",))
    if info.type == pafs.FileType.NotFound:
        raise InputError(
            f"input {input}: no such file or directory; give an existing directory, a glob "
            "(e.g. 'photos/**/*.jpg') or a manifest (.txt, .csv, .parquet)")
    if info.type == pafs.FileType.Directory:
        return InputPlan(input, "directory", scheme, path, units=_units(fs, path))
    if path.lower().endswith(".tar"):
        return InputPlan(input, "tar", scheme, path)
    if path.lower().endswith(".parquet") and _embedded_column(fs, path) is not None:
        return InputPlan(input, "embedded", scheme, path)
    if path.lower().endswith(MANIFEST_EXTENSIONS):
        suffix = path.lower().rsplit(".", 1)[-1]
        names = _manifest_columns(input, fs, path, suffix) if suffix != "txt" else []
        return InputPlan(input, suffix, scheme, path, has_image_id="image_id" in names)
    if re.search(_IMAGE_RE, path):
        return InputPlan(input, "image", scheme, path)
    raise InputError(
        f"input {input}: not a directory, glob, manifest or image; manifests end in "
        f".txt, .csv or .parquet, images in .{', .'.join(IMAGE_EXTENSIONS)}")


def _units(fs: pafs.FileSystem, base: str) -> tuple[str, ...]:
    """"" (the files directly in `base`) and its visible sub-folders: one listing each on an
    object store; a local tree is one unit ("*")."""
    if is_local(fs):
        return ("*",)
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=False))
    folders = sorted(i.base_name for i in entries
                     if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    # A store that reports no sub-prefixes in a listing (the GCS emulator) is listed whole.
    return ("", *folders) if folders else ("*",)


def list_unit(plan: InputPlan, unit: str) -> pa.Table:
    """The images of one listing unit of a directory, glob, shard or embedded-bytes plan
    (see `InputPlan`), as `image_id` and `uri` sorted by image_id; image_ids are relative
    to `plan.path` (a shard's keys for "tar", the file's rows for "embedded")."""
    fs, _ = resolve(plan.input)
    if plan.kind == "tar":
        return _list_shards(plan.input, fs, plan.scheme, [plan.path], None).sort_by("image_id")
    if plan.kind == "embedded":
        return _list_embedded(plan.input, fs, plan.scheme, plan.path).sort_by("image_id")
    if unit == "*":  # the whole tree at once
        listed = _listing(fs, plan.path, recursive=plan.recursive)
    elif unit:
        listed = _listing(fs, f"{plan.path.rstrip('/')}/{unit}", recursive=True)
        listed = listed.set_column(1, "rel", pc.binary_join_element_wise(unit + "/", listed["rel"], ""))
    else:
        listed = _listing(fs, plan.path, recursive=False)
    wanted = wanted_paths(plan, listed["rel"])
    if plan.kind == "shards":
        shards = listed.filter(wanted)["path"].to_pylist()
        return _list_shards(plan.input, fs, plan.scheme, shards, plan.path).sort_by("image_id")
    return _table(plan.scheme, listed.filter(wanted)).sort_by("image_id")


def wanted_paths(plan: InputPlan, relative: pa.Array | pa.ChunkedArray):
    """Which listed paths (relative to `plan.path`) are inputs: the glob's matches, else
    the image files."""
    return pc.match_substring_regex(relative, plan.pattern or _IMAGE_RE)


def no_inputs_error(plan: InputPlan) -> InputError:
    """The error for a directory or glob that listed nothing."""
    if plan.kind in ("glob", "shards"):
        return InputError(f"input {plan.input}: the glob matched no files; check the pattern "
                          "(matching is case-sensitive; '**' spans folders)")
    return InputError(
        f"input {plan.input}: no images in this directory or its subfolders (looked for "
        f".{', .'.join(IMAGE_EXTENSIONS)} in any letter case); point INPUT at the folder "
        "that holds the images, or use a glob or a manifest")


def list_inputs(input: str) -> pa.Table:  # noqa: A002 - the CLI's name for it
    """The images INPUT names, as one table of `image_id` and `uri` (strings), sorted by
    image_id: the whole list in memory, for tools and small inputs (a job streams the
    same units instead, see pipeline.job.plan). Raises InputError, naming INPUT and the
    fix, when nothing can be listed or an image_id repeats."""
    plan = plan_inputs(input)
    if plan.kind == "image":
        table = pa.table({"image_id": [posixpath.basename(plan.path)],
                          "uri": [to_uri(plan.scheme, plan.path)], "error": [None]},
                         schema=INPUT_SCHEMA)
    elif plan.is_manifest:
        fs, _ = resolve(input)
        table = manifest_rows(plan, _read_manifest_table(plan, fs), first_row=0)
    else:
        table = pa.concat_tables([list_unit(plan, unit) for unit in plan.units])
        if table.num_rows == 0:
            raise no_inputs_error(plan)
    table = table.sort_by("image_id")
    _check_unique(input, table.column("image_id"))
    return table


def _listing(fs: pafs.FileSystem, base: str, recursive: bool) -> pa.Table:
    """`path`, `rel` (relative to base) and `error` of the files under base, hidden ones
    skipped. Local folders are walked by `walk_local` (symlink loops, special files and
    names that are not UTF-8 handled); object stores list through pyarrow."""
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
    visible = pc.invert(pc.match_substring_regex(relative, _HIDDEN_RE))
    paths, relative = paths.filter(visible), relative.filter(visible)
    return pa.table({"path": paths, "rel": relative, "error": pa.nulls(len(paths), pa.string())})


_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file_kind(mode: int) -> str | None:
    """What a non-regular, non-directory file is ("a FIFO", ...), None for a regular file."""
    for test, kind in _SPECIAL:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def walk_local(base: str, *, recursive: bool = True) -> Iterator[tuple[str, str, str | None]]:
    """(path, path relative to base, error or None) of each file under local folder `base`.

    Terminates on any tree: a directory is entered at most once per real directory
    (device, inode), so symlink loops and links to folders already seen add nothing; each
    regular file is listed once. Real names win over symlinked ones: the tree is walked
    without following symlinks first, and symlinks are followed afterwards only to what
    was not seen. Names starting with "." are skipped. Names that are not valid UTF-8 are
    listed with an error that shows the name escaped; FIFOs, devices, sockets and broken
    symlinks are listed with an error (never opened, so never waited on).
    """
    root = os.fsencode(base.rstrip("/") or "/")
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
    except OSError:
        return
    seen_dirs.add((st.st_dev, st.st_ino))

    def visit(rel: bytes, st: os.stat_result, walk_later: list[bytes]):
        """A folder not seen yet goes onto `walk_later`; a file becomes its listing row
        (None for a second name of a file already listed)."""
        if stat.S_ISDIR(st.st_mode):
            if recursive and (st.st_dev, st.st_ino) not in seen_dirs:
                seen_dirs.add((st.st_dev, st.st_ino))
                walk_later.append(rel)
            return None
        return _file_once(root, rel, st, seen_files)

    folders: list[bytes] = [b""]      # real folders still to walk
    links: list[bytes] = []           # symlinks met on the way, followed after the walk
    while folders or links:
        if folders:
            rel_dir = folders.pop()
            folder = os.path.join(root, rel_dir) if rel_dir else root
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue  # unreadable folder: nothing to list in it
            subdirs = []
            for entry in entries:
                if entry.name.startswith(b"."):
                    continue
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                if entry.is_symlink():
                    links.append(rel)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                listed = visit(rel, st, subdirs)
                if listed:
                    yield listed
            folders.extend(reversed(subdirs))
            continue
        rel = links.pop(0)
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            yield _listed_file(root, rel, "a broken symbolic link (its target does not exist)")
            continue
        listed = visit(rel, st, folders)
        if listed:
            yield listed


def _file_once(root: bytes, rel: bytes, st: os.stat_result,
               seen_files: set[tuple[int, int]]) -> tuple[str, str, str | None] | None:
    if stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            return None
        seen_files.add(key)
        return _listed_file(root, rel, None)
    return _listed_file(root, rel, f"{special_file_kind(st.st_mode)}, not an image file")


def _listed_file(root: bytes, rel: bytes, error: str | None) -> tuple[str, str, str | None]:
    path = os.path.join(root, rel)
    try:
        return path.decode("utf-8"), rel.decode("utf-8"), error
    except UnicodeDecodeError:
        shown = rel.decode("utf-8", "backslashreplace")
        full = path.decode("utf-8", "backslashreplace")
        return full, shown, (f"the file name is not valid UTF-8 (shown escaped: {shown}); "
                             "rename the file to label it")


def _table(scheme: str, listed: pa.Table) -> pa.Table:
    paths = listed["path"]
    uris = paths if scheme == "local" else pc.binary_join_element_wise(f"{scheme}://", paths, "")
    return pa.table({"image_id": listed["rel"], "uri": uris, "error": listed["error"]},
                    schema=INPUT_SCHEMA)


def glob_to_regex(pattern: str) -> str:
    """An anchored RE2 regex for a glob over '/'-separated relative paths."""
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


def _manifest_columns(input: str, fs: pafs.FileSystem, path: str, suffix: str) -> list[str]:
    """The column names of a .csv or .parquet manifest (its header or schema only), checked
    for a `uri` column."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if suffix == "csv":
            with fs.open_input_stream(path) as stream:
                reader = pcsv.open_csv(stream, convert_options=pcsv.ConvertOptions(
                    column_types={"uri": pa.string(), "image_id": pa.string()}))
                names = reader.schema.names
        else:
            names = pq.read_schema(path, filesystem=fs).names
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            names = []
        else:
            raise InputError(f"input {input}: cannot read the manifest "
                             f"({' '.join(str(exc).split())})") from None
    if "uri" not in names:
        raise InputError(
            f"input {input}: manifest has no 'uri' column (its columns: "
            f"{', '.join(names) or 'none'}); add a 'uri' column with one image path or URI "
            "per row")
    return names


def _read_manifest_table(plan: InputPlan, fs: pafs.FileSystem) -> pa.Table:
    """A whole manifest as `manifest_rows` takes it (`text`, or `uri` [+ `image_id`])."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if plan.kind == "txt":
        with fs.open_input_stream(plan.path) as stream:
            raw = stream.read()
        try:
            lines = raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"input {plan.input}: manifest is not UTF-8 text "
                             f"({exc.reason} at byte {exc.start})") from None
        return pa.table({"text": pa.array(lines, pa.string())})
    columns = manifest_columns(plan)
    if plan.kind == "csv":
        with fs.open_input_stream(plan.path) as stream:
            return pcsv.read_csv(stream, convert_options=csv_convert_options(plan))
    return pq.read_table(plan.path, filesystem=fs, columns=list(columns))


def manifest_columns(plan: InputPlan) -> tuple[str, ...]:
    """The columns of a csv/parquet manifest that are read."""
    return ("uri", "image_id") if plan.has_image_id else ("uri",)


def parquet_row_groups(plan: InputPlan) -> list[tuple[int, int]]:
    """(row group, its first row) of a Parquet manifest, from the file's footer: the units
    its rows are read in (`read_row_group`), however many rows it holds."""
    import pyarrow.parquet as pq

    fs, _ = resolve(plan.input)
    with fs.open_input_file(plan.path) as f:
        meta = pq.ParquetFile(f).metadata
    units, first = [], 0
    for i in range(meta.num_row_groups):
        units.append((i, first))
        first += meta.row_group(i).num_rows
    return units


def read_row_group(plan: InputPlan, row_group: int, first_row: int,
                   batch_rows: int) -> Iterator[pa.Table]:
    """The manifest rows (`manifest_rows`) of one row group of a Parquet manifest, `batch_rows`
    at a time: only the manifest's columns are read, page by page."""
    import pyarrow.parquet as pq

    fs, _ = resolve(plan.input)
    with fs.open_input_file(plan.path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, row_groups=[row_group],
                                                    columns=list(manifest_columns(plan))):
            yield manifest_rows(plan, pa.Table.from_batches([batch]), first_row=first_row)
            first_row += batch.num_rows


def csv_convert_options(plan: InputPlan):
    import pyarrow.csv as pcsv

    columns = manifest_columns(plan)
    return pcsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                               include_columns=list(columns), strings_can_be_null=True)


def manifest_rows(plan: InputPlan, table: pa.Table, first_row: int | None = None) -> pa.Table:
    """Manifest rows (a block of them: `text` lines of a .txt, or `uri` [+ `image_id`] of a
    .csv/.parquet) as `image_id` and `uri`: comments and blank lines dropped, the image_id
    defaulting to the URI as written, relative URIs resolved against the manifest's folder.
    `first_row` is the block's first row number in the file (for messages), if known."""
    if "text" in table.column_names:
        written = pc.utf8_trim_whitespace(pc.utf8_ltrim(table.column("text"), "\ufeff"))
        keep = pc.and_(pc.not_equal(written, ""), pc.invert(pc.starts_with(written, "#")))
        written = written.filter(keep)
        image_ids = written
    else:
        written = pc.utf8_trim_whitespace(_as_string(table.column("uri")))
        empty = pc.fill_null(pc.equal(written, ""), True)
        if pc.any(empty).as_py():
            row = pc.index(empty, True).as_py()
            where = f"row {first_row + row + 1}" if first_row is not None else "a row"
            raise InputError(f"input {plan.input}: {where} has an empty uri; every row "
                             "needs the path or URI of one image")
        image_ids = written
        if "image_id" in table.column_names:
            given = _as_string(table.column("image_id"))
            image_ids = pc.if_else(pc.fill_null(pc.equal(given, ""), True), written, given)
    uris, errors = _resolve_relative(written, plan.scheme, posixpath.dirname(plan.path))
    return pa.table({"image_id": image_ids, "uri": uris, "error": errors}, schema=INPUT_SCHEMA)


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column if column.type == pa.string() else pc.cast(column, pa.string())


def _resolve_relative(written: pa.Array, scheme: str, folder: str) -> tuple[pa.Array, pa.Array]:
    """URIs as written, with relative ones joined onto the manifest's folder; and an error
    for each relative URI that climbs out of the manifest's bucket (object stores): it is
    never read, wherever it points."""
    absolute = pc.or_(pc.match_substring_regex(written, SCHEME_RE.pattern),
                      pc.starts_with(written, "/"))
    no_errors = pa.nulls(len(written), pa.string())
    if pc.all(absolute).as_py():
        return written, no_errors
    joined = pc.binary_join_element_wise(folder, written, "/")
    dotted = pc.and_(pc.invert(absolute), pc.match_substring_regex(written, r"(^|/)\.\.?(/|$)"))
    errors = no_errors
    if pc.any(dotted).as_py():  # rare: normalise ./ and ../ in Python, only for those rows
        bucket = folder.split("/", 1)[0]
        paths, problems = [], []
        for p, d, w in zip(joined.to_pylist(), dotted.to_pylist(), written.to_pylist()):
            normal = posixpath.normpath(p) if d else p
            outside = scheme != "local" and d and normal.split("/", 1)[0] != bucket
            paths.append(normal)
            problems.append(f"relative URI {w} leaves the manifest's bucket {bucket}; write the "
                            f"full {scheme}:// URI to read from another bucket" if outside else None)
        joined, errors = pa.array(paths, pa.string()), pa.array(problems, pa.string())
    if scheme != "local":
        joined = pc.binary_join_element_wise(f"{scheme}://", joined, "")
    return pc.if_else(absolute, written, joined), errors


def _check_unique(input: str, image_ids: pa.ChunkedArray) -> None:
    """image_ids are sorted: a duplicate sits next to its twin."""
    ids = image_ids.combine_chunks()
    if len(ids) < 2:
        return
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    if not pc.any(same).as_py():
        return
    first = ids[pc.index(same, True).as_py()].as_py()
    times = pc.sum(pc.equal(ids, first)).as_py()
    raise InputError(f"input {input}: image_id {first!r} appears {times} times; image_ids must "
                     "be unique (remove the repeated entries or give each row its own "
                     "image_id)")


# -- reading bytes ---------------------------------------------------------------------------
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


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the read that raised `exc` may succeed.

    Transient: connection and timeout errors, network-ish errno values (EIO included:
    FUSE mounts of object stores report network failures that way), object-store
    throttling and 5xx responses. Permanent: not found, permission denied, a directory,
    other 4xx responses, and anything that is not an OSError (bad URIs, bad arguments).
    """
    if isinstance(exc, ReadError):
        return exc.transient
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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    text = " ".join(str(exc).split()) or "no detail"
    if isinstance(exc, IsADirectoryError) or text.endswith("is a directory"):
        return "is a directory"
    if text.startswith("Not a regular file"):  # an S3 bucket, or a prefix with a marker
        return "not a file"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"


DEFAULT_MAX_BYTES = 256 << 20
"""Largest image file read (bytes); larger ones become error rows (`--max-bytes`)."""


class TooLarge(OSError):
    """A file larger than the byte cap, or not a regular file: permanent, never retried."""


_CHUNK = 1 << 20


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
            raise TooLarge(f"larger than the byte cap of {max_bytes:,} bytes (--max-bytes)")


def read_bytes(uri: str, *, retries: int = 3, backoff: float = 0.2,
               filesystem: pafs.FileSystem | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The whole object at `uri`, at most `max_bytes` of it.

    Transient failures (see `is_transient`) are retried up to `retries` times, waiting
    `backoff` * 2**k seconds (k = 0, 1, ...) with +-50% jitter between attempts;
    permanent ones fail at once. Any failure ends in a ReadError (one line: the URI, the
    reason, the attempts). `filesystem` replaces the filesystem `uri` resolves to (the
    path is still taken from `uri`): the hook for fault injection and custom stores.

    Bounded: a local path is checked with stat before it is opened (a FIFO, a device or
    a socket is refused, never read or waited on), and no more than `max_bytes` + 1 bytes
    are read from anything, so `/dev/zero` or a huge object costs at most the cap.
    Object-store reads are bounded in time by the filesystem's own request timeouts
    (pipeline.store.fs).
    """
    if filesystem is None and (is_http(uri) or _ROW_RE.match(uri) or _MEMBER_RE.match(uri)):
        result = read_all([uri], retries=retries, max_bytes=max_bytes)[0]  # URLs, rows, members
        if isinstance(result, ReadError):
            raise result
        return result
    attempts = 0
    while True:
        attempts += 1
        try:
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
        except TooLarge as exc:
            raise ReadError(uri, str(exc), attempts, False) from None
        except (OSError, pa.ArrowException, ValueError) as exc:
            transient = is_transient(exc)
            if not transient or attempts > retries:
                raise ReadError(uri, _reason(exc), attempts, transient) from exc
        delay = backoff * (2 ** (attempts - 1)) * random.uniform(0.5, 1.5)
        time.sleep(min(delay, 30.0))


# -- embedded bytes: Parquet image columns ---------------------------------------------------
_ROW_RE = re.compile(r"^(?P<file>.+\.parquet)#row=(?P<row>\d+)$", re.IGNORECASE)
_MEMBER_RE = re.compile(r"^(?P<file>.+\.tar)#(?P<member>.+)@(?P<offset>\d+)\+(?P<size>\d+)$",
                        re.IGNORECASE)


def _is_image_struct(arrow_type: pa.DataType) -> bool:
    """The Hugging Face ``datasets`` Image layout: struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(arrow_type):
        return False
    names = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
    return "bytes" in names and (pa.types.is_binary(names["bytes"])
                                 or pa.types.is_large_binary(names["bytes"]))


def _embedded_column(fs: pafs.FileSystem, path: str) -> str | None:
    """The image column of a Parquet file that holds image bytes and no ``uri`` column:
    ``image`` if it has the Image layout, else the first column that does."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError):
        return None
    if "uri" in schema.names:
        return None
    candidates = [f.name for f in schema if _is_image_struct(f.type)]
    return "image" if "image" in candidates else (candidates[0] if candidates else None)


def _list_embedded(input: str, fs: pafs.FileSystem, scheme: str, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    column = _embedded_column(fs, path)
    names = pq.read_schema(path, filesystem=fs).names
    # Only the small columns: the image paths (a nested field) and the ids, never the bytes.
    table = pq.read_table(path, filesystem=fs,
                          columns=[f"{column}.path"] + (["image_id"] if "image_id" in names else []))
    n = table.num_rows
    if n == 0:
        raise InputError(f"input {input}: the Parquet file has no rows")
    rows = pa.array(range(n), pa.int64())
    uris = pc.binary_join_element_wise(to_uri(scheme, path) + "#row=", pc.cast(rows, pa.string()), "")
    fallback = pc.binary_join_element_wise(posixpath.basename(path) + "#", pc.cast(rows, pa.string()), "")
    paths = table.column(0).combine_chunks()
    paths = paths.field("path") if pa.types.is_struct(paths.type) else paths
    if "image_id" in names:
        image_ids = _as_string(table.column("image_id"))
    elif pc.all(pc.is_valid(paths)).as_py():
        image_ids = _as_string(paths)
    else:
        image_ids = fallback
    image_ids = pc.if_else(pc.fill_null(pc.equal(image_ids, ""), True), fallback, image_ids)
    return pa.table({"image_id": image_ids, "uri": uris, "error": pa.nulls(n, pa.string())},
                    schema=INPUT_SCHEMA)


def _read_rows(file_uri: str, rows: list[int]) -> dict[int, bytes | ReadError]:
    """The image bytes of `rows` of an embedded-bytes Parquet file (a ReadError for an
    empty cell), reading only the row groups that hold them and only the image column."""
    import pyarrow.parquet as pq

    fs, path = resolve(file_uri)
    with open_random_access(fs, path) as f:
        pf = pq.ParquetFile(f)
        column = _embedded_column(fs, path)
        if column is None:
            raise ValueError(f"{file_uri}: has no image column (struct of bytes and path)")
        starts, total = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(total)
            total += pf.metadata.row_group(g).num_rows
        out: dict[int, bytes | ReadError] = {}
        by_group: dict[int, list[int]] = {}
        for row in rows:
            if row >= total:
                raise ValueError(f"{file_uri}: has {total} rows, no row {row}")
            group = max(g for g, start in enumerate(starts) if start <= row)
            by_group.setdefault(group, []).append(row)
        for group, wanted in by_group.items():
            cells = pf.read_row_group(group, columns=[column]).column(0)
            for row in wanted:
                cell = cells[row - starts[group]].as_py()
                data = cell.get("bytes") if cell else None
                out[row] = data if data is not None else ReadError(
                    f"{file_uri}#row={row}", "the image cell holds no bytes", 1, False)
        return out


# -- WebDataset shards -----------------------------------------------------------------------
def _list_shards(input: str, fs: pafs.FileSystem, scheme: str, shards: list[str],
                 base: str | None) -> pa.Table:
    """One row per key of each shard: its one image member, located by offset and size.
    image_id is the key for a single shard (`base` None), else `<shard relative to
    base>/<key>`."""
    image_ids, uris = [], []
    prefix = (base or "").rstrip("/") + "/"
    for shard in sorted(shards):
        shard_uri = to_uri(scheme, shard)
        name = shard[len(prefix):] if shard.startswith(prefix) else posixpath.basename(shard)
        keys: dict[str, tuple[str, int, int]] = {}
        try:
            with open_random_access(fs, shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base_name = posixpath.split(member.name)
                    stem, dot, ext = base_name.partition(".")
                    if not dot or not re.search(_IMAGE_RE, "." + ext.rsplit(".", 1)[-1]):
                        continue  # .json, .cls, .txt, ...: not the image
                    key = posixpath.join(folder, stem)
                    if key in keys:
                        raise InputError(
                            f"input {input}: shard {shard_uri} holds two images for key {key!r} "
                            f"({keys[key][0]}, {member.name}); WebDataset shards need one image "
                            "member per key")
                    keys[key] = (member.name, member.offset_data, member.size)
        except tarfile.TarError as exc:
            raise InputError(f"input {input}: shard {shard_uri} is not a readable tar file "
                             f"({exc})") from None
        for key, (member, offset, size) in keys.items():
            image_ids.append(key if base is None else f"{name}/{key}")
            uris.append(f"{shard_uri}#{member}@{offset}+{size}")
    if not image_ids and base is None:  # a glob's listing unit may hold no shards
        raise InputError(f"input {input}: no image members in the shard(s); WebDataset "
                         f"shards hold <key>.<ext> members with ext one of "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    return pa.table({"image_id": image_ids, "uri": uris,
                     "error": pa.nulls(len(uris), pa.string())}, schema=INPUT_SCHEMA)


def _read_member(uri: str, retries: int, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    match = _MEMBER_RE.match(uri)
    offset, size = int(match["offset"]), int(match["size"])
    if size > max_bytes:
        raise ReadError(uri, f"larger than the byte cap of {max_bytes:,} bytes (--max-bytes)",
                        1, False)
    return _with_retries(uri, retries, lambda: _read_range(match["file"], offset, size))


def _read_range(file_uri: str, offset: int, size: int) -> bytes:
    fs, path = resolve(file_uri)
    data = open_range(fs, path, offset, size)
    if len(data) != size:
        raise ValueError(f"the shard ends before the member's {size} bytes (truncated)")
    return data


# -- http(s) ---------------------------------------------------------------------------------
HTTP_TIMEOUT_S = 30.0
"""Connect and read timeout of one HTTP request (DRN_LABEL_HTTP_TIMEOUT overrides)."""
HTTP_PER_HOST = 8
"""Requests in flight to one host from one worker process (DRN_LABEL_HTTP_PER_HOST)."""
HTTP_MAX_BYTES = 256 << 20
_HOST_SLOTS: dict[str, threading.BoundedSemaphore] = {}
_HOST_LOCK = threading.Lock()


class HttpStatusError(OSError):
    """An HTTP answer other than 200; `transient` for 408, 429 and 5xx."""

    def __init__(self, status: int, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status, self.retry_after = status, retry_after
        self.transient = status in (408, 429) or status >= 500


def _host_slot(uri: str) -> threading.BoundedSemaphore:
    host = urlsplit(uri).netloc.lower()
    with _HOST_LOCK:
        slot = _HOST_SLOTS.get(host)
        if slot is None:
            limit = int(os.environ.get("DRN_LABEL_HTTP_PER_HOST", HTTP_PER_HOST))
            slot = _HOST_SLOTS[host] = threading.BoundedSemaphore(max(1, limit))
        return slot


def _get(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    import urllib.error
    import urllib.request

    timeout = float(os.environ.get("DRN_LABEL_HTTP_TIMEOUT", HTTP_TIMEOUT_S))
    cap = min(HTTP_MAX_BYTES, max_bytes)
    request = urllib.request.Request(uri, headers={"User-Agent": "drn-label"})
    with _host_slot(uri):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read(cap + 1)
        except urllib.error.HTTPError as exc:
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            try:
                wait = float(retry_after) if retry_after is not None else None
            except ValueError:
                wait = None
            raise HttpStatusError(exc.code, exc.reason or "", wait) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, OSError):
                raise reason from None
            raise ConnectionError(str(reason)) from None
    if len(data) > cap:
        raise TooLarge(f"larger than the byte cap of {cap:,} bytes (--max-bytes)")
    return data


def _with_retries(uri: str, retries: int, fetch, backoff: float = 0.2) -> bytes:
    """`fetch()` with read_bytes' retry rule: transient failures retried with jittered
    exponential backoff (an HTTP Retry-After is honoured, up to 30 s), then a ReadError."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return fetch()
        except TooLarge as exc:
            raise ReadError(uri, str(exc), attempts, False) from None
        except HttpStatusError as exc:
            if not exc.transient or attempts > retries:
                raise ReadError(uri, str(exc), attempts, exc.transient) from None
            delay = exc.retry_after if exc.retry_after is not None else \
                backoff * (2 ** (attempts - 1)) * random.uniform(0.5, 1.5)
        except (OSError, pa.ArrowException, ValueError, tarfile.TarError) as exc:
            transient = is_transient(exc)
            if not transient or attempts > retries:
                raise ReadError(uri, _reason(exc), attempts, transient) from exc
            delay = backoff * (2 ** (attempts - 1)) * random.uniform(0.5, 1.5)
        time.sleep(min(delay, 30.0))


def is_http(uri: str) -> bool:
    return uri[:8].lower().startswith(("http://", "https://"))


# -- reading a batch -------------------------------------------------------------------------
def read_all(uris: list[str | None], *, retries: int = 3,
             max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes | ReadError | None]:
    """The bytes of each URI, or the ReadError that names why not, in order (None for a
    None entry: a row that is not to be read).

    http(s) URLs are fetched concurrently (at most DRN_LABEL_HTTP_PER_HOST per host);
    rows of one embedded-bytes Parquet file are read together (one pass over the row
    groups that hold them); shard members are ranged reads; anything else goes through
    `read_bytes`.
    """
    out: list = [None] * len(uris)
    parquet_rows: dict[str, list[tuple[int, int]]] = {}
    web: list[int] = []
    for i, uri in enumerate(uris):
        row = _ROW_RE.match(uri) if uri is not None else None
        if uri is None:
            continue
        if row:
            parquet_rows.setdefault(row["file"], []).append((i, int(row["row"])))
        elif is_http(uri):
            web.append(i)
    for file_uri, wanted in parquet_rows.items():
        try:
            data = _with_retries(file_uri, retries,
                                 lambda: _read_rows(file_uri, [r for _, r in wanted]))
            for i, row in wanted:
                cell = data[row]
                if isinstance(cell, bytes) and len(cell) > max_bytes:
                    cell = ReadError(uris[i], f"larger than the byte cap of {max_bytes:,} bytes "
                                     "(--max-bytes)", 1, False)
                out[i] = cell
        except ReadError as exc:
            for i, _ in wanted:
                out[i] = ReadError(uris[i], exc.reason, exc.attempts, exc.transient)
    if web:
        def one(i: int) -> bytes | ReadError:
            try:
                return _with_retries(uris[i], retries, lambda: _get(uris[i], max_bytes))
            except ReadError as exc:
                return exc
        with ThreadPoolExecutor(max_workers=min(len(web), 32)) as pool:
            for i, result in zip(web, pool.map(one, web)):
                out[i] = result
    for i, uri in enumerate(uris):
        if out[i] is None and uri is not None:
            try:
                out[i] = _read_member(uri, retries, max_bytes) if _MEMBER_RE.match(uri) else \
                    read_bytes(uri, retries=retries, max_bytes=max_bytes)
            except ReadError as exc:
                out[i] = exc
    return out
