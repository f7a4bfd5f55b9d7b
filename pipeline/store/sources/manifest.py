"""Manifests: ``.txt`` (one URI a line; blank lines and ``#`` comments skipped; the image_id
is the URI as written) or ``.csv`` / ``.parquet`` with a ``uri`` column and an optional
``image_id`` column (the URI as written where absent). Relative URIs resolve against the
manifest's folder; on an object store they must stay in the manifest's bucket.

A manifest only lists: its rows name files, URLs, embedded rows or shard members that the
sources owning them read. Every kind streams: a text or CSV manifest block by block, a
Parquet manifest one unit per row group, page by page.
"""
from __future__ import annotations

import posixpath
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.store.fs import SCHEME_RE, resolve
from pipeline.store.sources.base import (INPUT_SCHEMA, InputError, InputPlan, Source, Target,
                                         row_group_failed)

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")

_TEXT_CHUNK = 1 << 20
"""Bytes of a text manifest decoded at a time."""


class ManifestSource(Source):
    kinds = ("txt", "csv", "parquet")

    def plan(self, target: Target) -> InputPlan | None:
        if target.is_glob or target.info.type != pafs.FileType.File:
            return None
        if not target.path.lower().endswith(MANIFEST_EXTENSIONS):
            return None
        suffix = target.path.lower().rsplit(".", 1)[-1]
        names = _columns(target.input, target.fs, target.path, suffix) if suffix != "txt" else []
        return InputPlan(target.input, suffix, target.scheme, target.path,
                         has_image_id="image_id" in names)

    def units(self, plan: InputPlan) -> list[str]:
        if plan.kind != "parquet":
            return [""]
        return [f"{group}:{first}" for group, first in row_groups(plan)]

    def list(self, plan: InputPlan, unit: str, *, block_rows: int = 1024) -> Iterator[pa.Table]:
        fs, _ = resolve(plan.input)
        if plan.kind == "txt":
            yield from _text_blocks(plan, fs)
        elif plan.kind == "csv":
            yield from _csv_blocks(plan, fs)
        else:
            group, first_row = (int(part) for part in unit.split(":"))
            yield from _parquet_blocks(plan, fs, group, first_row, block_rows)

    def unit_failed(self, plan: InputPlan, unit: str, reason: str) -> pa.Table:
        if plan.kind != "parquet":
            return super().unit_failed(plan, unit, reason)
        return row_group_failed(plan, unit, reason, "manifest rows")


def _columns(input: str, fs: pafs.FileSystem, path: str, suffix: str) -> list[str]:  # noqa: A002
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


def manifest_columns(plan: InputPlan) -> tuple[str, ...]:
    """The columns of a csv/parquet manifest that are read."""
    return ("uri", "image_id") if plan.has_image_id else ("uri",)


def row_groups(plan: InputPlan) -> list[tuple[int, int]]:
    """(row group, its first row) of a Parquet file, from its footer: the units its rows
    are read in, however many rows it holds."""
    import pyarrow.parquet as pq

    fs, _ = resolve(plan.input)
    with fs.open_input_file(plan.path) as f:
        meta = pq.ParquetFile(f).metadata
    units, first = [], 0
    for i in range(meta.num_row_groups):
        units.append((i, first))
        first += meta.row_group(i).num_rows
    return units


def _text_blocks(plan: InputPlan, fs: pafs.FileSystem) -> Iterator[pa.Table]:
    """A text manifest's lines, a chunk of about _TEXT_CHUNK bytes at a time (cut after a
    newline, so no line is split)."""
    with fs.open_input_stream(plan.path) as stream:
        rest, offset = b"", 0
        while True:
            chunk = stream.read(_TEXT_CHUNK)
            data = rest + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            block, rest = data[:cut], data[cut:]
            try:
                text = block.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"input {plan.input}: manifest is not UTF-8 text "
                                 f"({exc.reason} at byte {offset + exc.start})") from None
            offset += len(block)
            if text:
                yield manifest_rows(plan, pa.table({"text": pa.array(text.splitlines(), pa.string())}))
            if not chunk:
                return


def _csv_blocks(plan: InputPlan, fs: pafs.FileSystem) -> Iterator[pa.Table]:
    import pyarrow.csv as pcsv

    columns = manifest_columns(plan)
    options = pcsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                  include_columns=list(columns), strings_can_be_null=True)
    quoted_newlines = pcsv.ParseOptions(newlines_in_values=True)  # as the CSV format allows
    with fs.open_input_stream(plan.path) as stream:
        first_row = 0
        for batch in pcsv.open_csv(stream, parse_options=quoted_newlines, convert_options=options):
            yield manifest_rows(plan, pa.Table.from_batches([batch]), first_row=first_row)
            first_row += batch.num_rows


def _parquet_blocks(plan: InputPlan, fs: pafs.FileSystem, group: int, first_row: int,
                    block_rows: int) -> Iterator[pa.Table]:
    """The manifest rows of one row group, `block_rows` at a time: only the manifest's
    columns are read, page by page."""
    import pyarrow.parquet as pq

    with fs.open_input_file(plan.path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=block_rows, row_groups=[group],
                                                    columns=list(manifest_columns(plan))):
            yield manifest_rows(plan, pa.Table.from_batches([batch]), first_row=first_row)
            first_row += batch.num_rows


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
        written = pc.utf8_trim_whitespace(as_string(table.column("uri")))
        empty = pc.fill_null(pc.equal(written, ""), True)
        if pc.any(empty).as_py():
            row = pc.index(empty, True).as_py()
            where = f"row {first_row + row + 1}" if first_row is not None else "a row"
            raise InputError(f"input {plan.input}: {where} has an empty uri; every row "
                             "needs the path or URI of one image")
        image_ids = written
        if "image_id" in table.column_names:
            given = as_string(table.column("image_id"))
            image_ids = pc.if_else(pc.fill_null(pc.equal(given, ""), True), written, given)
    uris, errors = _resolve_relative(written, plan.scheme, posixpath.dirname(plan.path))
    return pa.table({"image_id": image_ids, "uri": uris, "error": errors}, schema=INPUT_SCHEMA)


def as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
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


SOURCE = ManifestSource()
