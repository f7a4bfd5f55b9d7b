"""Reading OUTPUT back: its data files, one model identity at a time, streamed.

``select_identity`` is the one way to choose which rows a command reads: OUTPUT may
hold rows of several model identities (architecture + checkpoint sha256), and a
``model`` and/or a ``weights_sha256`` (the full digest or any unique prefix, as
``inspect`` prints it) choose among them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import NoRows, UnreadableData, UsageError
from pipeline.store.fs import read_bytes_or_none, resolve
from pipeline.store.output import (LEGACY_PROGRESS_FILE, LEGACY_RUNS_DIR, METADATA_KEY, PROGRESS_FILE,
                                   RUNS_DIR, SCHEMA, OutputMetadata,
                                   data_files, decode_mask, decode_probs)

BATCH_ROWS = 64
"""Rows decoded at a time: a few dozen masks, whatever their size."""


def open_dataset(output: str):
    """A ``pyarrow.dataset`` over OUTPUT's committed data files (None when there are none)."""
    import pyarrow.dataset as ds

    files = data_files(output)
    if not files:
        return None
    fs, _ = resolve(output)
    return ds.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA)


def read_metadata(output: str) -> list[OutputMetadata]:
    """The distinct ``drn_label`` metadata blocks found in OUTPUT's files."""
    import pyarrow.parquet as pq

    fs, _ = resolve(output)
    seen: dict[str, OutputMetadata] = {}
    for path in data_files(output):
        try:
            md = pq.read_schema(path, filesystem=fs).metadata or {}
        except (pa.ArrowInvalid, OSError) as exc:
            raise UnreadableData(f"{output}: data file {path} is not readable Parquet "
                                 f"({' '.join(str(exc).split())[:200]}); move it out of OUTPUT/data "
                                 "(rerunning relabels its images)") from None
        raw = md.get(METADATA_KEY)
        if raw is not None and raw not in seen:
            seen[raw] = OutputMetadata.from_json(raw)
    return list(seen.values())


@dataclass(frozen=True)
class MaskRow:
    image_id: str
    uri: str
    status: str
    error: str | None
    mask: np.ndarray | None
    class_scores: list[float] | None
    class_fraction: list[float] | None
    confidence: float | None
    model: str
    weights_sha256: str
    entropy: float | None = None  # schema version 2; None in version-1 outputs
    margin: float | None = None
    uncertain_fraction: float | None = None


def read_masks(
    output: str,
    *,
    columns: Sequence[str] = (),
    status: str | None = "ok",
    batch_size: int = 256,
) -> Iterator[MaskRow]:
    """Iterate OUTPUT's rows with masks decoded, streaming (bounded memory).

    ``status="ok"`` (default) skips error rows; ``None`` yields every row.
    """
    import pyarrow.compute as pc

    dataset = open_dataset(output)
    if dataset is None:
        return
    wanted = [
        "image_id", "uri", "status", "error", "mask", "class_scores",
        "class_fraction", "confidence", "model", "weights_sha256", "entropy", "margin",
        "uncertain_fraction", *columns,
    ]
    flt = pc.field("status") == status if status else None
    for batch in dataset.to_batches(columns=list(dict.fromkeys(wanted)), filter=flt,
                                    batch_size=batch_size):
        for row in batch.to_pylist():
            yield MaskRow(
                image_id=row["image_id"],
                uri=row["uri"],
                status=row["status"],
                error=row["error"],
                mask=decode_mask(row["mask"]),
                class_scores=row["class_scores"],
                class_fraction=row["class_fraction"],
                confidence=row["confidence"],
                model=row["model"],
                weights_sha256=row["weights_sha256"],
                entropy=row["entropy"],
                margin=row["margin"],
                uncertain_fraction=row["uncertain_fraction"],
            )


def read_probs(output: str, *, model: str | None = None, weights_sha256: str | None = None,
               full_size: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """(image_id, float32 C x H x W class probabilities) of one model identity's rows that
    were labelled with ``--save-probs``, streamed. `full_size` resizes them (bilinearly)
    to the source image's size, the mask's; otherwise they come at the stored size, one
    value per 8 x 8 block (docs/output.md). Raises UsageError when no row has them."""
    meta = select_identity(output, model=model, weights_sha256=weights_sha256)
    where = (pc.field("status") == "ok") & pc.field("probs").is_valid()
    found = 0
    for batch in iter_batches(output, meta, ["image_id", "height", "width", "probs"], where=where):
        for row in batch.to_pylist():
            size = (row["height"], row["width"]) if full_size else None
            found += 1
            yield row["image_id"], decode_probs(row["probs"], size)
    if not found:
        raise UsageError(f"{output}: no rows of {meta.model} (weights {meta.weights_sha256[:12]}) "
                         "hold probabilities; label with `drn-label run ... --save-probs "
                         "--overwrite` to store them")


# -- which rows ------------------------------------------------------------------------------
def select_identity(output: str, *, model: str | None = None,
                    weights_sha256: str | None = None) -> OutputMetadata:
    """The one model identity (model, weights_sha256) of OUTPUT to read.

    `model` and `weights_sha256` (the full digest or any prefix of it) choose among the
    identities OUTPUT holds. Raises NoRows when OUTPUT has no rows at all, UsageError
    when the choice matches none or more than one, listing what OUTPUT holds.
    """
    metas = {(m.model, m.weights_sha256): m for m in read_metadata(output)}
    if not metas:
        raise NoRows(f"{output}: no labelled rows (no Parquet data files); run `drn-label run` first")
    chosen = [m for m in metas.values()
              if (model is None or m.model == model)
              and (weights_sha256 is None or m.weights_sha256.startswith(weights_sha256))]
    held = ", ".join(f"{m.model} (weights {m.weights_sha256[:12]})" for m in metas.values())
    if not chosen:
        raise UsageError(f"{output}: no rows of model {model or 'any'} with weights "
                         f"{weights_sha256 or 'any'}; it holds {held}")
    if len(chosen) > 1:
        raise UsageError(f"{output} holds rows of several models: {held}; choose one with "
                         "--model and/or --weights-sha256")
    return chosen[0]


def identity_filter(meta: OutputMetadata) -> pc.Expression:
    """Rows of `meta`'s model identity, as a dataset filter."""
    return (pc.field("model") == meta.model) & (pc.field("weights_sha256") == meta.weights_sha256)


def identity_mask(table, meta: OutputMetadata):
    """Rows of `meta`'s model identity in an in-memory table (False, never null, for rows
    whose model columns are null)."""
    same = pc.and_(pc.equal(table["model"], meta.model),
                   pc.equal(table["weights_sha256"], meta.weights_sha256))
    return pc.fill_null(same, False)


def iter_batches(output: str, meta: OutputMetadata, columns: Sequence[str], *,
                 where: pc.Expression | None = None, batch_size: int = BATCH_ROWS):
    """Record batches of OUTPUT's rows of `meta`'s identity: projected, streamed, one batch
    read ahead at most. Files are scanned one at a time, each as its own dataset, so that
    no file's Parquet metadata outlives its scan (memory does not grow with OUTPUT)."""
    import pyarrow.dataset as ds


    fs, _ = resolve(output)
    flt = identity_filter(meta) if where is None else identity_filter(meta) & where
    for path in data_files(output):
        dataset = ds.dataset(path, filesystem=fs, format="parquet", schema=SCHEMA)
        yield from dataset.to_batches(columns=list(columns), filter=flt, batch_size=batch_size,
                                      batch_readahead=1, fragment_readahead=1)


def ids_filter(image_ids: Sequence[str] | None) -> pc.Expression | None:
    """Rows whose image_id is one of `image_ids` (None: every row), as a dataset filter."""
    if image_ids is None:
        return None
    import pyarrow as pa

    return pc.field("image_id").isin(pa.array(list(image_ids), pa.string()))


def iter_mask_rows(output: str, meta: OutputMetadata, columns: Sequence[str] = (), *,
                   image_ids: Sequence[str] | None = None) -> Iterator[dict]:
    """Rows with status ``ok`` of `meta`'s identity (only `image_ids`, when given), ``mask``
    decoded to an H x W array."""
    wanted = list(dict.fromkeys(["image_id", "uri", "height", "width", "mask", "confidence",
                                 *columns]))
    where = pc.field("status") == "ok"
    if image_ids is not None:
        where = where & ids_filter(image_ids)
    for batch in iter_batches(output, meta, wanted, where=where):
        for row in batch.to_pylist():
            row["mask"] = decode_mask(row["mask"])
            yield row


def count_errors(output: str, meta: OutputMetadata, *, image_ids: Sequence[str] | None = None) -> int:
    n = 0
    where = pc.field("status") != "ok"
    if image_ids is not None:
        where = where & ids_filter(image_ids)
    for batch in iter_batches(output, meta, ["status"], where=where, batch_size=65536):
        n += batch.num_rows
    return n


def read_progress(output: str) -> dict | None:
    raw = read_bytes_or_none(output, PROGRESS_FILE) or read_bytes_or_none(output, LEGACY_PROGRESS_FILE)
    return json.loads(raw) if raw else None


def read_run(output: str, run_id: str) -> dict | None:
    """One run's record (None when it is not there)."""
    raw = (read_bytes_or_none(output, f"{RUNS_DIR}/{run_id}.json")
           or read_bytes_or_none(output, f"{LEGACY_RUNS_DIR}/{run_id}.json"))
    return json.loads(raw) if raw else None


def read_runs(output: str) -> list[dict]:
    """The run records in OUTPUT/_state/runs (and the flat layout's _runs), oldest first."""
    fs, root = resolve(output)
    runs = []
    infos = [info for folder in (RUNS_DIR, LEGACY_RUNS_DIR)
             for info in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True))]
    for info in infos:
        if info.type == pafs.FileType.File and info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                runs.append(json.loads(f.read()))
    return sorted(runs, key=lambda r: r.get("run_id", ""))


