"""Read back what a run left in OUTPUT: progress, run records, and a summary of the rows."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import UsageError
from pipeline.store.fs import resolve
from pipeline.store.output import error_reason, foreign_files
from pipeline.job.progress import format_duration
from pipeline.store.reader import open_dataset, read_metadata, read_progress, read_run, read_runs

STALE_S = 60.0
"""A running run refreshes its progress every few seconds; this long without means it died."""


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


# -- `status OUTPUT`: the last run's progress --------------------------------------------------
def run_status(output: str) -> dict:
    """The last run's progress (OUTPUT/_state/progress.json: its keys unchanged) with where
    it ran and its start-up time, from its run record: `host`, `input`, `startup_s`."""
    progress = read_progress(output)
    if progress is None:
        raise UsageError(f"{output} has no _state/progress.json: no run has written there yet")
    record = read_run(output, progress.get("run_id", "")) or {}
    timings = record.get("timings", {})
    return {**progress, "host": record.get("host"), "input": record.get("spec", {}).get("input"),
            "startup_s": timings.get("startup_s") or None}


def format_status(s: dict, now: datetime | None = None) -> str:
    """`run_status` as a person reads it: state, counts, rate, ETA, when, where."""
    now = now or datetime.now(timezone.utc)
    state, total, labelled = s.get("state", "?"), s.get("total", 0), s.get("labelled", 0)
    host = f" on {s['host']}" if s.get("host") else ""
    lines = [f"{s.get('output')}: {state} (run {s.get('run_id')}{host})"]
    percent = f" ({100 * labelled / total:.0f}%)" if total else ""
    lines.append(f"  labelled {labelled} of {total}{percent}: {s.get('labelled_ok', 0)} ok, "
                 f"{s.get('labelled_errors', 0)} errors; {s.get('committed', 0)} committed in "
                 f"{s.get('committed_files', 0)} files; {s.get('skipped', 0)} already labelled before")
    rate = (f"  {s.get('images_per_s') or 0:.1f} images/s over "
            f"{format_duration(s.get('elapsed_s') or 0)} of labelling")
    if s.get("startup_s"):
        rate += f", after {format_duration(s['startup_s'])} of start-up"
    if state == "running" and s.get("eta_s") is not None:
        rate += f"; ETA {format_duration(s['eta_s'])}"
    lines.append(rate)
    updated = _parse_time(s.get("updated_at"))
    ago = (now - updated).total_seconds() if updated else None
    when = f"  started {_show_time(s.get('started_at'))}, last update {_show_time(s.get('updated_at'))}"
    lines.append(when + (f" ({format_duration(ago)} ago)" if ago is not None else ""))
    if s.get("input"):
        lines.append(f"  input {s['input']}")
    left = max(total - s.get("committed", 0), 0)
    if state == "running" and ago is not None and ago > STALE_S:
        lines.append(f"  no update for {format_duration(ago)}: if its process is gone, the run was "
                     f"killed; rerun the same command to label the {left} images not committed")
    elif state in ("interrupted", "failed") and left:
        lines.append(f"  rerun the same command to label the {left} images not committed "
                     "(committed rows are kept)")
    return "\n".join(lines)


def _parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _show_time(text: str | None) -> str:
    parsed = _parse_time(text)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else "?"
