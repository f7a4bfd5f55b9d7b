"""The per-batch functions of a labelling job: decode, predict, encode.

Each takes and returns a `pyarrow.Table` (Ray Data's "pyarrow" batch format), so blocks
stay plain Arrow between stages. Nothing here raises for one bad image: a failure becomes
an error row (status "error", a one-line reason) and the batch goes on.
Ray appears only in `report_labelled`, which is a no-op without a running job.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline.spec import JobSpec
from pipeline.store.decode import DEFAULT_MAX_PIXELS
from pipeline.store.output import (PROBS_TYPE, SCHEMA, UNCERTAINTY_COLUMNS, class_fraction_of,
                                   encode_mask, encode_probs, mask_dtype)
from pipeline.store.sources import DEFAULT_MAX_BYTES

# Columns between decode and predict: the source size, the inference size, raw RGB bytes.
DECODED = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("in_height", pa.int32()), ("in_width", pa.int32()), ("pixels", pa.large_binary()),
])
# Columns between predict and encode: the raw mask at inference size, C floats, the
# uncertainty figures and (with --save-probs) the quantised probabilities.
PREDICTED = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("mask_raw", pa.large_binary()), ("mask_height", pa.int32()), ("mask_width", pa.int32()),
    ("class_scores", pa.list_(pa.float32())), ("class_fraction", pa.list_(pa.float32())),
    ("confidence", pa.float32()), ("entropy", pa.float32()), ("margin", pa.float32()),
    ("uncertain_fraction", pa.float32()), ("probs", PROBS_TYPE),
])


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- decode (CPU tasks) ------------------------------------------------------------------
def decode_batch(batch: pa.Table, *, max_side: int, retries: int,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_private_urls: bool = False) -> pa.Table:
    """Read and decode each row's image; errors (from listing, reading or decoding) become rows."""
    from pipeline.store.decode import decode_image, fit_max_side
    from pipeline.store.sources import read_all

    out: dict[str, list] = {name: [] for name in DECODED.names}
    listed_errors = (batch.column("error").to_pylist() if "error" in batch.column_names
                     else [None] * batch.num_rows)
    uris = batch.column("uri").to_pylist()
    # One call for the batch: URLs are fetched concurrently, embedded rows read together.
    contents = read_all([None if e else u for u, e in zip(uris, listed_errors)],
                        retries=retries, max_bytes=max_bytes, allow_private_urls=allow_private_urls)
    for image_id, uri, listed_error, data in zip(batch.column("image_id").to_pylist(), uris,
                                                 listed_errors, contents):
        row = {"image_id": image_id, "uri": uri, "status": "ok", "error": None, "height": None,
               "width": None, "in_height": None, "in_width": None, "pixels": None}
        try:
            if listed_error:
                raise ValueError(f"{uri}: {listed_error}")
            if isinstance(data, Exception):
                raise data
            rgb = decode_image(data, uri, max_pixels=max_pixels)
            del data
            row["height"], row["width"] = int(rgb.shape[0]), int(rgb.shape[1])
            small = fit_max_side(rgb, max_side)
            row["in_height"], row["in_width"] = int(small.shape[0]), int(small.shape[1])
            row["pixels"] = np.ascontiguousarray(small).tobytes()
        except Exception as exc:  # noqa: BLE001 - any failure is this image's error row
            row["status"], row["error"] = "error", one_line(exc if str(exc) else repr(exc))
        for name in DECODED.names:
            out[name].append(row[name])
    return pa.table(out, schema=DECODED)


# -- predict (actor pool) ----------------------------------------------------------------
class PredictActor:
    """Holds one model for its lifetime; labels the ok rows of each batch.

    `spec` is the run's job spec with its `auto` values resolved by the driver, so the
    actor builds the model the driver checked (pipeline.job.model); `counter` is the run's
    progress counter actor (or None)."""

    def __init__(self, spec: JobSpec, counter=None) -> None:
        import torch

        from pipeline.job.model import build_model, predictor_for

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec, self.counter = spec, counter
        model = build_model(spec)
        self.num_classes = model.drn_config.num_classes
        self.predictor = predictor_for(spec, model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pydict()
        n = batch.num_rows
        ok = [i for i in range(n) if rows["status"][i] == "ok"]
        images = []
        for i in ok:
            h, w = rows["in_height"][i], rows["in_width"][i]
            images.append(np.frombuffer(rows["pixels"][i], np.uint8).reshape(h, w, 3))
        preds = self.predictor.predict(images) if images else []
        out = {name: [None] * n for name in PREDICTED.names}
        for name in ("image_id", "uri", "status", "error", "height", "width"):
            out[name] = list(rows[name])
        for i, pred in zip(ok, preds):
            if pred.error is not None:
                out["status"][i], out["error"][i] = "error", f"{rows['uri'][i]}: {pred.error}"
                continue
            out["mask_raw"][i] = pred.mask.tobytes()
            out["mask_height"][i], out["mask_width"][i] = pred.mask.shape
            out["class_scores"][i] = pred.class_scores.tolist()
            out["class_fraction"][i] = pred.class_fraction.tolist()
            out["confidence"][i] = pred.confidence
            for name in UNCERTAINTY_COLUMNS:
                out[name][i] = getattr(pred, name)
            if pred.probs is not None:
                out["probs"][i] = encode_probs(pred.probs)
        table = pa.table(out, schema=PREDICTED)
        report_labelled(self.counter, table)
        return table


# -- encode (CPU tasks, fused with the write) ----------------------------------------------
@dataclass(frozen=True)
class RowIdentity:
    model: str
    weights_sha256: str
    run_id: str
    num_classes: int
    png_compression: int = 4


def encode_batch(batch: pa.Table, *, identity: RowIdentity) -> pa.Table:
    """Masks to PNG at the source size; the final output rows (`SCHEMA`)."""
    from pipeline.store.decode import resize_mask

    rows = batch.to_pydict()
    n = batch.num_rows
    dtype = mask_dtype(identity.num_classes)
    masks: list = [None] * n
    fractions = list(rows["class_fraction"])
    status, error = list(rows["status"]), list(rows["error"])
    for i in range(n):
        if status[i] != "ok":
            continue
        try:
            mask = np.frombuffer(rows["mask_raw"][i], dtype).reshape(
                rows["mask_height"][i], rows["mask_width"][i])
            h, w = rows["height"][i], rows["width"][i]
            if mask.shape != (h, w):  # inferred at a smaller size (--max-side): back to source
                mask = resize_mask(mask, h, w)
                fractions[i] = class_fraction_of(mask, identity.num_classes).tolist()
            masks[i] = {"bytes": encode_mask(mask, identity.png_compression), "path": None}
        except Exception as exc:  # noqa: BLE001
            status[i], error[i] = "error", one_line(f"{rows['uri'][i]}: cannot encode mask: {exc}")
            fractions[i] = None
    now = datetime.now(timezone.utc)
    table = pa.table({
        "image_id": rows["image_id"], "uri": rows["uri"], "status": status, "error": error,
        "height": rows["height"], "width": rows["width"], "mask": masks,
        "class_scores": [s if st == "ok" else None for s, st in zip(rows["class_scores"], status)],
        "class_fraction": [f if st == "ok" else None for f, st in zip(fractions, status)],
        "confidence": [c if st == "ok" else None for c, st in zip(rows["confidence"], status)],
        **{name: [v if st == "ok" else None for v, st in zip(rows[name], status)]
           for name in (*UNCERTAINTY_COLUMNS, "probs")},
        "model": [identity.model] * n, "weights_sha256": [identity.weights_sha256] * n,
        "run_id": [identity.run_id] * n, "labelled_at": [now] * n,
    }, schema=SCHEMA)
    return table


def report_labelled(counter, table: pa.Table) -> None:
    """Tell the run's progress counter (an actor handle, or None) about labelled rows;
    fire and forget."""
    if counter is None:
        return
    errors = sum(1 for s in table.column("status").to_pylist() if s != "ok")
    try:
        counter.add_labelled.remote(table.num_rows - errors, errors, time.time())
    except Exception:  # noqa: BLE001 - progress must never fail a batch
        pass
