"""The output contract (schema version 2): layout, Parquet columns, file metadata, mask PNGs.

Everything that reads or writes OUTPUT goes through here, so the contract has one home.

Layout of OUTPUT::

    OUTPUT/data/part-<run_id>-<digest>.parquet   the rows; nothing else lives in data/
    OUTPUT/_state/progress.json                  the running (or last) run's progress
    OUTPUT/_state/runs/<run_id>.json             one record per run
    OUTPUT/_state/lease.json                     which run may write OUTPUT now

Readers are pointed at ``OUTPUT/data``: it holds Parquet files only, which Polars and
Hugging Face ``datasets`` require. ``OUTPUT`` itself also reads in pandas, pyarrow and
DuckDB (``_``-prefixed names are skipped). Outputs of the earlier flat layout
(``OUTPUT/part-*.parquet``, ``OUTPUT/_progress.json``, ``OUTPUT/_runs/``) read and resume
as they are; new files go to the new places.

Version 2 adds, after ``confidence``, the per-image uncertainty (``entropy``, ``margin``,
``uncertain_fraction``) and ``probs`` (class probabilities, only with ``--save-probs``).
The change is additive: readers open every file with `SCHEMA`, and Arrow fills the
columns a version-1 file lacks with nulls, so version-1 outputs still read and resume.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from drn.labels import mask_dtype  # noqa: F401 - part of the contract: 8-bit up to 256 classes

SCHEMA_VERSION = 2
METADATA_KEY = b"drn_label"
DATA_DIR = "data"
STATE_DIR = "_state"
PROGRESS_FILE = f"{STATE_DIR}/progress.json"
RUNS_DIR = f"{STATE_DIR}/runs"
LEASE_FILE = f"{STATE_DIR}/lease.json"
LEGACY_PROGRESS_FILE = "_progress.json"  # the flat layout's (read, never written)
LEGACY_RUNS_DIR = "_runs"
DATA_FILE_RE = re.compile(r"^part-[A-Za-z0-9_.-]+\.parquet$")
"""Names of the data files the project writes (``data_file_name``); nothing else is read
as rows, rewritten or deleted."""

MASK_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PROBS_TYPE = pa.struct([("bytes", pa.binary()), ("height", pa.int32()), ("width", pa.int32())])
"""``--save-probs``: C x height x width uint8 bytes, class-major, value = probability * 255,
each value the mean over one PROBS_STRIDE x PROBS_STRIDE block of the inference-size image."""
PROBS_STRIDE = 8
UNCERTAINTY_COLUMNS = ("entropy", "margin", "uncertain_fraction")

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask", MASK_TYPE),
        ("class_scores", pa.list_(pa.float32())),
        ("class_fraction", pa.list_(pa.float32())),
        ("confidence", pa.float32()),
        ("entropy", pa.float32()),
        ("margin", pa.float32()),
        ("uncertain_fraction", pa.float32()),
        ("probs", PROBS_TYPE),
        ("model", pa.string()),
        ("weights_sha256", pa.string()),
        ("run_id", pa.string()),
        ("labelled_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class OutputMetadata:
    """What travels with every Parquet file as the ``drn_label`` key-value metadata."""

    model: str
    weights: str | None
    weights_sha256: str
    num_classes: int
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    ignore_index: int = 255
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": self.schema_version,
                "model": self.model,
                "weights": self.weights,
                "weights_sha256": self.weights_sha256,
                "num_classes": self.num_classes,
                "classes": list(self.classes),
                "palette": [list(c) for c in self.palette],
                "mean": list(self.mean),
                "std": list(self.std),
                "ignore_index": self.ignore_index,
            },
            sort_keys=True,
        )

    @classmethod
    def from_model(cls, arch: str, weights: str | None, config) -> "OutputMetadata":
        """From a built model's ``drn_config`` (its label set is always set)."""
        ls = config.label_set
        return cls(model=arch, weights=weights, weights_sha256=config.weights_sha256,
                   num_classes=config.num_classes, classes=tuple(ls.class_names),
                   palette=tuple(tuple(c) for c in ls.palette), mean=tuple(ls.mean),
                   std=tuple(ls.std), ignore_index=ls.ignore_index)

    @classmethod
    def from_json(cls, text: str | bytes) -> "OutputMetadata":
        d = json.loads(text)
        return cls(
            model=d["model"],
            weights=d.get("weights"),
            weights_sha256=d["weights_sha256"],
            num_classes=int(d["num_classes"]),
            classes=tuple(d["classes"]),
            palette=tuple(tuple(int(v) for v in c) for c in d["palette"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            ignore_index=int(d.get("ignore_index", 255)),
            schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
        )


HF_METADATA_KEY = b"huggingface"


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """Hugging Face ``datasets`` features of `schema`, the mask as an ``Image``.

    Written as the ``huggingface`` schema metadata so that ``load_dataset("parquet",
    data_dir="OUTPUT/data")`` yields the mask as a PIL image with no ``cast_column``.
    Lists are written as ``Sequence``, which datasets 2.x to 5.x all parse (``List`` only
    from 4.0). Derived from the schema so that added columns are covered too.
    """
    def feature(arrow_type: pa.DataType) -> dict[str, Any]:
        if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
            return {"feature": feature(arrow_type.value_type), "_type": "Sequence"}
        if pa.types.is_timestamp(arrow_type):
            tz = f", tz={arrow_type.tz}" if arrow_type.tz else ""
            return {"dtype": f"timestamp[{arrow_type.unit}{tz}]", "_type": "Value"}
        if pa.types.is_struct(arrow_type):  # a dict of features (e.g. the probs cell)
            return {arrow_type.field(i).name: feature(arrow_type.field(i).type)
                    for i in range(arrow_type.num_fields)}
        return {"dtype": str(arrow_type), "_type": "Value"}

    return {f.name: {"_type": "Image"} if f.name == "mask" else feature(f.type) for f in schema}


def schema_with_metadata(meta: OutputMetadata) -> pa.Schema:
    """The schema every data file is written with: the ``drn_label`` metadata (classes,
    palette, model identity) and the ``huggingface`` features (the mask as an Image)."""
    hf = json.dumps({"info": {"features": hf_features(SCHEMA)}})
    return SCHEMA.with_metadata({METADATA_KEY: meta.to_json().encode(),
                                 HF_METADATA_KEY: hf.encode()})


def encode_mask(mask: np.ndarray, compression: int = 4) -> bytes:
    """One-channel PNG of class indices. Level 4: 23% smaller than level 1 for +0.3 ms per
    512 x 512 mask; above 7 the time grows fast (docs/benchmarks.md)."""
    import cv2

    ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:  # pragma: no cover - OpenCV only fails on unsupported dtypes
        raise ValueError(f"cannot encode a mask of dtype {mask.dtype} as PNG")
    return buf.tobytes()


def decode_mask(data: bytes | dict | None) -> np.ndarray | None:
    """Decode a ``mask`` cell (the struct or its PNG bytes) to an H x W array of class ids."""
    import cv2

    if data is None:
        return None
    if isinstance(data, dict):
        data = data.get("bytes")
        if data is None:
            return None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("mask cell is not a PNG image")
    return arr


def encode_probs(probs: np.ndarray) -> dict:
    """A ``probs`` cell from uint8 C x h x w quantised probabilities."""
    if probs.dtype != np.uint8 or probs.ndim != 3:
        raise ValueError(f"probabilities must be uint8 C x h x w, got {probs.dtype} {probs.shape}")
    return {"bytes": np.ascontiguousarray(probs).tobytes(), "height": int(probs.shape[1]),
            "width": int(probs.shape[2])}


def decode_probs(cell: dict | None, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """A ``probs`` cell as float32 C x h x w probabilities (value / 255; classes sum to
    1 within C / 510). `size` (height, width), e.g. the mask's, resizes each class plane
    bilinearly to it. None when the row has no probabilities (saved without --save-probs)."""
    import cv2

    if cell is None or cell.get("bytes") is None:
        return None
    height, width = int(cell["height"]), int(cell["width"])
    flat = np.frombuffer(cell["bytes"], np.uint8)
    if height * width == 0 or flat.size % (height * width):
        raise ValueError(f"probs cell of {flat.size} bytes does not hold {height} x {width} planes")
    probs = flat.reshape(-1, height, width).astype(np.float32) / 255.0
    if size is not None and tuple(size) != (height, width):
        h, w = int(size[0]), int(size[1])
        # OpenCV resizes up to 512 channels at once in H x W x C order.
        planes = [cv2.resize(np.ascontiguousarray(probs[i:i + 512].transpose(1, 2, 0)), (w, h),
                             interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
                  for i in range(0, probs.shape[0], 512)]
        probs = np.concatenate(planes, axis=2).transpose(2, 0, 1)
    return np.ascontiguousarray(probs)


def class_fraction_of(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """The mask's own histogram divided by its pixel count (float32, length C)."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    return (counts / max(mask.size, 1)).astype(np.float32)


def error_reason(error: str | None) -> str:
    """An error row's reason, for grouping: without the file name it starts with, and with
    numbers as N ("a/x.jpg: not a decodable image (3 bytes)" -> "not a decodable image (N bytes)")."""
    import re

    return re.sub(r"\d+", "N", (error or "(no message)").split(": ", 1)[-1])


def data_file_name(run_id: str, image_ids: list[str]) -> str:
    """``data/part-<run_id>-<digest>.parquet``, the digest taken over the rows' image ids: a
    retried write task rewrites the same name with the same rows, never a second copy."""
    import hashlib

    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]
    return f"{DATA_DIR}/part-{run_id}-{digest}.parquet"


def data_files(output: str) -> list[str]:
    """OUTPUT's committed data files: ``part-*.parquet`` in ``OUTPUT/data/`` (and, from the
    flat layout, in ``OUTPUT/`` itself). Other files, and anything in sub-folders (another
    output nested inside this one), are not this OUTPUT's: see `foreign_files`."""
    return _listed(output)[0]


def foreign_files(output: str) -> list[str]:
    """Parquet files under OUTPUT that are not its data files (a user's file, an output
    nested inside this one): never read as rows, rewritten or deleted."""
    return _listed(output)[1]


def _listed(output: str) -> tuple[list[str], list[str]]:
    import pyarrow.fs as pafs

    from pipeline.store.fs import resolve

    fs, root = resolve(output)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return [], []
    ours, foreign = [], []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = f.path[len(root):].lstrip("/")
        if f.type != pafs.FileType.File or not rel.endswith(".parquet"):
            continue
        parts = rel.split("/")
        if any(part.startswith(("_", ".")) for part in parts):
            continue  # side files, and the part files of writes in progress
        own_depth = len(parts) == 1 or (len(parts) == 2 and parts[0] == DATA_DIR)
        (ours if own_depth and DATA_FILE_RE.match(parts[-1]) else foreign).append(f.path)
    return sorted(ours), sorted(foreign)


def to_json_safe(value: Any) -> Any:
    """Convert numpy scalars/arrays for json.dumps."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
