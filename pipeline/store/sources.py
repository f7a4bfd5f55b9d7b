"""Where images come from: resolve URIs to pyarrow filesystems, list inputs, read bytes.

INPUT is one of
- a directory (local or ``s3://bucket/prefix``), listed recursively; image_id is the
  path relative to it with forward slashes;
- a glob (``photos/**/*.jpg``, ``s3://bucket/raw/*/cam?.png``): ``*``, ``?`` and
  ``[...]`` stay within one folder, ``**`` spans any number of folders, matching is
  case-sensitive as in a shell; image_id is relative to the glob's folder before the
  first wildcard;
- a manifest: ``.txt`` (one URI a line; blank lines and ``#`` comments skipped; the
  image_id is the URI as written) or ``.csv`` / ``.parquet`` with a ``uri`` column and
  an optional ``image_id`` column (the URI as written where absent); relative URIs
  resolve against the manifest's folder;
- a single image file (image_id: its file name).
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
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import DrnLabelError
from pipeline.store.fs import SCHEME_RE, is_local, resolve, split_uri, to_uri

__all__ = [
    "IMAGE_EXTENSIONS", "INPUT_SCHEMA", "InputError", "InputPlan", "ReadError", "is_transient",
    "list_inputs", "list_unit", "manifest_rows", "plan_inputs", "read_bytes", "resolve", "to_uri",
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

    kind: "directory", "glob", "txt", "csv", "parquet" or "image". `path` is the manifest
    or image file, or the folder that image_ids are relative to. On an object store a
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
        if scheme == "s3" and first == 0:
            raise InputError(f"input {input}: the bucket name cannot hold a wildcard")
        base = "/".join(parts[:first]) or "/"
        pattern = "/".join(parts[first:])
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise InputError(f"input {input}: the glob's folder {to_uri(scheme, base)} does not "
                             "exist; check the path before the first wildcard")
        recursive = "/" in pattern or "**" in pattern
        return InputPlan(input, "glob", scheme, base, glob_to_regex(pattern), recursive,
                         units=_units(fs, base) if recursive else ("",))
    if info.type == pafs.FileType.NotFound:
        raise InputError(
            f"input {input}: no such file or directory; give an existing directory, a glob "
            "(e.g. 'photos/**/*.jpg') or a manifest (.txt, .csv, .parquet)")
    if info.type == pafs.FileType.Directory:
        return InputPlan(input, "directory", scheme, path, units=_units(fs, path))
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
    return ("", *folders)


def list_unit(plan: InputPlan, unit: str) -> pa.Table:
    """The images of one listing unit of a directory or glob plan (see `InputPlan`), as
    `image_id` and `uri` sorted by image_id; image_ids are relative to `plan.path`."""
    fs, _ = resolve(plan.input)
    if unit == "*":  # the whole tree at once
        listed = _listing(fs, plan.path, recursive=plan.recursive)
    elif unit:
        listed = _listing(fs, f"{plan.path.rstrip('/')}/{unit}", recursive=True)
        listed = listed.set_column(1, "rel", pc.binary_join_element_wise(unit + "/", listed["rel"], ""))
    else:
        listed = _listing(fs, plan.path, recursive=False)
    wanted = pc.match_substring_regex(listed["rel"], plan.pattern or _IMAGE_RE)
    return _table(plan.scheme, listed.filter(wanted)).sort_by("image_id")


def no_inputs_error(plan: InputPlan) -> InputError:
    """The error for a directory or glob that listed nothing."""
    if plan.kind == "glob":
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
    uris = paths if scheme != "s3" else pc.binary_join_element_wise("s3://", paths, "")
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
            outside = scheme == "s3" and d and normal.split("/", 1)[0] != bucket
            paths.append(normal)
            problems.append(f"relative URI {w} leaves the manifest's bucket {bucket}; write the "
                            "full s3:// URI to read from another bucket" if outside else None)
        joined, errors = pa.array(paths, pa.string()), pa.array(problems, pa.string())
    if scheme == "s3":
        joined = pc.binary_join_element_wise("s3://", joined, "")
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
