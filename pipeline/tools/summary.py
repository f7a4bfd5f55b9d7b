"""Read back what a run left in OUTPUT: progress, run records, and a summary of the rows."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import UsageError
from pipeline.store.fs import resolve
from pipeline.store.output import error_reason, foreign_files
from pipeline.store.reader import open_dataset, read_metadata, read_runs


def summarise(output: str, *, top_errors: int = 5) -> dict:
    """Rows, ok/error counts, runs, mean class fraction by class name, the most common errors."""
    fs, root = resolve(output)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise UsageError(f"OUTPUT {output} does not exist")
    dataset = open_dataset(output)
    metas = read_metadata(output)
    summary: dict = {"output": output, "rows": 0, "ok": 0, "errors": 0, "models": [],
                     "runs": [], "mean_class_fraction": {}, "common_errors": [],
                     "foreign_files": [f[len(root):].lstrip("/") for f in foreign_files(output)]}
    summary["runs"] = [{"run_id": r["run_id"], "state": r.get("state"), **r.get("counts", {})}
                       for r in read_runs(output)]
    if dataset is None:
        return summary
    errors: Counter = Counter()
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts: Counter = Counter()
    for batch in dataset.to_batches(columns=["status", "error", "class_fraction", "model",
                                             "weights_sha256"]):
        summary["rows"] += batch.num_rows
        status = batch.column("status")
        n_ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
        summary["ok"] += n_ok
        summary["errors"] += batch.num_rows - n_ok
        for err in batch.column("error").drop_null().to_pylist():
            errors[error_reason(err)] += 1
        for model, sha, frac in zip(batch.column("model").to_pylist(),
                                    batch.column("weights_sha256").to_pylist(),
                                    batch.column("class_fraction").to_pylist()):
            if frac is None:
                continue
            key = (model, sha)
            arr = np.asarray(frac, dtype=np.float64)
            sums[key] = sums[key] + arr if key in sums else arr
            counts[key] += 1
    by_identity = {(m.model, m.weights_sha256): m for m in metas}
    for key, total in sums.items():
        meta = by_identity.get(key)
        names = list(meta.classes) if meta else [f"class_{i}" for i in range(len(total))]
        label = f"{key[0]} ({key[1][:12]})"
        summary["models"].append(label)
        summary["mean_class_fraction"][label] = {
            name: round(float(v), 4) for name, v in zip(names, total / counts[key])}
    summary["common_errors"] = [{"error": e, "count": c} for e, c in errors.most_common(top_errors)]
    return summary


def format_summary(s: dict) -> str:
    lines = [f"{s['output']}: {s['rows']} rows, {s['ok']} ok, {s['errors']} errors"]
    if s["runs"]:
        lines.append(f"runs ({len(s['runs'])}):")
        for r in s["runs"]:
            duplicates = f"  duplicate input rows {r['duplicates']} (one row kept each)" \
                if r.get("duplicates") else ""
            lines.append(f"  {r['run_id']}  {r.get('state')}  ok {r.get('ok', 0)}  "
                         f"errors {r.get('errors', 0)}  skipped {r.get('skipped_existing', 0)}{duplicates}")
    for label, fractions in s["mean_class_fraction"].items():
        lines.append(f"mean class fraction, {label}:")
        for name, v in sorted(fractions.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<20} {v:7.2%}")
    if s.get("foreign_files"):
        shown = ", ".join(s["foreign_files"][:3]) + (", ..." if len(s["foreign_files"]) > 3 else "")
        lines.append(f"not labels (Parquet files drn-label did not write here, left alone): {shown}")
    if s["common_errors"]:
        lines.append("most common errors:")
        for e in s["common_errors"]:
            lines.append(f"  {e['count']:>6}  {e['error']}")
    return "\n".join(lines)
