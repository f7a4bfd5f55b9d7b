"""A Parquet file whose image column holds the bytes (the Hugging Face ``datasets`` ``Image``
struct ``{bytes, path}``; no ``uri`` column). image_id is the ``image_id`` column, else the
struct's ``path`` when every row has one, else ``<file name>#<row>``; the row's uri is
``<file>#row=<row index>``.

Listing reads one row group per unit and only the small columns (ids, paths), never the
bytes. Reading streams the image column of a row group page by page (`READ_BUFFER` bytes
at a time) up to the last row a batch wants, keeps only the wanted cells, and checks each
cell's length (its Arrow offsets) against --max-bytes before copying it out: a task holds
at most one page of the file and the batch's own images, never the whole row group.
"""
from __future__ import annotations

import posixpath
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.store.fs import open_random_access, resolve, to_uri
from pipeline.store.sources.base import (INPUT_SCHEMA, InputError, InputPlan, ReadError, ReadOptions,
                                         Source, Target, row_group_failed, too_large)
from pipeline.store.sources.manifest import as_string, row_groups
from pipeline.store.sources.retry import with_retries

ROW_RE = re.compile(r"^(?P<file>.+\.parquet)#row=(?P<row>\d+)$", re.IGNORECASE)

READ_BUFFER = 1 << 20
"""Bytes read from the file at a time while a row group's image column is streamed."""
READ_BATCH_ROWS = 1
"""Cells decoded at a time while streaming (each unwanted one is dropped at once)."""


def is_image_struct(arrow_type: pa.DataType) -> bool:
    """The Hugging Face ``datasets`` Image layout: struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(arrow_type):
        return False
    names = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
    return "bytes" in names and (pa.types.is_binary(names["bytes"])
                                 or pa.types.is_large_binary(names["bytes"]))


def image_column(schema: pa.Schema) -> str | None:
    """The image column of a Parquet file that holds image bytes and no ``uri`` column:
    ``image`` if it has the Image layout, else the first column that does."""
    if "uri" in schema.names:
        return None
    candidates = [f.name for f in schema if is_image_struct(f.type)]
    return "image" if "image" in candidates else (candidates[0] if candidates else None)


def _has_path(arrow_type: pa.DataType) -> bool:
    return any(arrow_type.field(i).name == "path" for i in range(arrow_type.num_fields))


class EmbeddedSource(Source):
    kinds = ("embedded",)

    def plan(self, target: Target) -> InputPlan | None:
        import pyarrow.parquet as pq

        if target.is_glob or target.info.type != pafs.FileType.File \
                or not target.path.lower().endswith(".parquet"):
            return None
        try:
            with target.fs.open_input_file(target.path) as f:
                file = pq.ParquetFile(f)
                schema, meta = file.schema_arrow, file.metadata
        except (pa.ArrowInvalid, OSError):
            return None  # not Parquet: the manifest source names the problem
        column = image_column(schema)
        if column is None:
            return None
        if meta.num_rows == 0:
            raise InputError(f"input {target.input}: the Parquet file has no rows")
        if "image_id" in schema.names:
            ids = "image_id"
        elif _has_path(schema.field(column).type) and _every_path_set(target, column, meta):
            ids = f"{column}.path"
        else:
            ids = None
        return InputPlan(target.input, "embedded", target.scheme, target.path,
                         image_column=column, id_column=ids)

    def units(self, plan: InputPlan) -> list[str]:
        return [f"{group}:{first}" for group, first in row_groups(plan)]

    def list(self, plan: InputPlan, unit: str, *, block_rows: int = 1024) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        group, first_row = (int(part) for part in unit.split(":"))
        fs, _ = resolve(plan.input)
        columns = [plan.id_column] if plan.id_column else []
        file_uri = to_uri(plan.scheme, plan.path)
        with fs.open_input_file(plan.path) as f:
            file = pq.ParquetFile(f)
            n = file.metadata.row_group(group).num_rows
            if columns:  # only the small columns: the ids or the image paths, never the bytes
                table = file.read_row_group(group, columns=columns)
                given = table.column(0).combine_chunks()
                given = given.field("path") if pa.types.is_struct(given.type) else given
                given = as_string(given)
            else:
                given = pa.nulls(n, pa.string())
        rows = pc.cast(pa.array(range(first_row, first_row + n), pa.int64()), pa.string())
        uris = pc.binary_join_element_wise(file_uri + "#row=", rows, "")
        fallback = pc.binary_join_element_wise(posixpath.basename(plan.path) + "#", rows, "")
        image_ids = pc.if_else(pc.fill_null(pc.equal(given, ""), True), fallback, given)
        yield pa.table({"image_id": image_ids, "uri": uris, "error": pa.nulls(n, pa.string())},
                       schema=INPUT_SCHEMA)

    def unit_failed(self, plan: InputPlan, unit: str, reason: str) -> pa.Table:
        return row_group_failed(plan, unit, reason, "images")

    def reads(self, uri: str) -> bool:
        return ROW_RE.match(uri) is not None

    def read(self, uris: list[str], options: ReadOptions) -> list[bytes | ReadError]:
        """Rows of one file are read together, a row group at a time: a row group that
        cannot be read fails only its own rows."""
        out: list[bytes | ReadError | None] = [None] * len(uris)
        by_file: dict[str, list[tuple[int, int]]] = {}
        for i, uri in enumerate(uris):
            match = ROW_RE.match(uri)
            by_file.setdefault(match["file"], []).append((i, int(match["row"])))
        for file_uri, wanted in by_file.items():
            try:
                groups = with_retries(file_uri, lambda: rows_by_group(file_uri, [r for _, r in wanted]),
                                      retries=options.retries, backoff=options.backoff)
            except ReadError as exc:
                groups = {None: (exc, [r for _, r in wanted])}
            cells: dict[int, bytes | str | ReadError] = {}
            for group, (start, rows) in groups.items():
                if isinstance(start, (ReadError, str)):  # the file, or rows past its end
                    cells.update({row: start for row in rows})
                    continue
                try:
                    cells.update(with_retries(
                        file_uri, lambda: read_group(file_uri, group, start, set(rows), options.max_bytes),
                        retries=options.retries, backoff=options.backoff))
                except ReadError as exc:
                    cells.update({row: exc for row in rows})
            for i, row in wanted:
                cell = cells[row]
                if isinstance(cell, ReadError):
                    out[i] = ReadError(uris[i], cell.reason, cell.attempts, cell.transient)
                else:
                    out[i] = cell if isinstance(cell, bytes) else ReadError(uris[i], cell, 1, False)
        return out


def _every_path_set(target: Target, column: str, meta) -> bool:
    """Whether every row has an image path: the footer's null counts say so without
    reading the column; a file written without statistics has its paths read."""
    import pyarrow.parquet as pq

    leaf = f"{column}.path"
    index = next((k for k in range(meta.num_columns)
                  if meta.row_group(0).column(k).path_in_schema == leaf), None) \
        if meta.num_row_groups else None
    if index is None:
        return False
    nulls = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(index).statistics
        if stats is None or not stats.has_null_count:
            paths = pq.read_table(target.path, filesystem=target.fs, columns=[leaf]).column(0)
            paths = paths.combine_chunks().field("path")
            return bool(pc.all(pc.is_valid(paths)).as_py())
        nulls += stats.null_count
    return nulls == 0


def rows_by_group(file_uri: str, rows: list[int]) -> dict[int | None, tuple[int | str, list[int]]]:
    """Row group -> (its first row, the wanted rows in it), from the file's footer; rows
    past the end are under None, with the reason they are not read."""
    import pyarrow.parquet as pq

    fs, path = resolve(file_uri)
    with open_random_access(fs, path) as f:
        meta = pq.ParquetFile(f).metadata
    starts, total = [], 0
    for g in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(g).num_rows
    out: dict[int | None, tuple[int | str, list[int]]] = {}
    for row in rows:
        if row >= total:
            out.setdefault(None, (f"past the end of the file ({total} rows)", []))[1].append(row)
            continue
        group = max(g for g, start in enumerate(starts) if start <= row)
        out.setdefault(group, (starts[group], []))[1].append(row)
    return out


def read_group(file_uri: str, group: int, first_row: int, wanted: set[int],
               max_bytes: int) -> dict[int, bytes | str]:
    """The image bytes of the `wanted` rows of row group `group`, or the reason a cell is
    not read (empty, or above `max_bytes`). Only the image column's `bytes` field is read,
    streamed a page at a time, and only up to the last wanted row."""
    import pyarrow.parquet as pq

    fs, path = resolve(file_uri)
    out: dict[int, bytes | str] = {}
    with open_random_access(fs, path) as f:
        file = pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)
        column = image_column(file.schema_arrow)
        if column is None:
            raise ValueError(f"{file_uri}: has no image column (struct of bytes and path)")
        row, last = first_row, max(wanted)
        for batch in file.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group],
                                       columns=[f"{column}.bytes"], use_threads=False):
            cells = batch.column(0).field("bytes")
            lengths = pc.binary_length(cells).to_pylist()  # from the offsets, no copy
            for k, length in enumerate(lengths):
                if row + k not in wanted:
                    continue
                if length is None:
                    out[row + k] = "the image cell holds no bytes"
                elif length > max_bytes:
                    out[row + k] = too_large(max_bytes)
                else:
                    out[row + k] = cells[k].as_py()
            row += batch.num_rows
            del batch, cells
            if row > last:
                break
    return out


SOURCE = EmbeddedSource()
