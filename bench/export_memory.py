"""Peak memory of `drn-label export` (and `report`) on a synthetic OUTPUT; not a test.

    python bench/export_memory.py [--rows 2500 10000] [--side 64] [--keep DIR]

For each row count, writes an OUTPUT of that many ok rows directly with pyarrow, in the
output schema with its file metadata (19 Cityscapes classes; side x side masks of a few
rectangles, encoded with pipeline.store.output.encode_mask; 1000 rows per file), then runs each
export (png, png --colour, coco, label-studio) and the report in a fresh Python process and
prints that process's peak RSS (getrusage ru_maxrss) before and after the work. Bounded
memory shows as a peak that does not grow with the row count.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS_PER_FILE = 1000


def synthesise(output: Path, rows: int, side: int) -> None:
    import numpy as np
    import pyarrow as pa

    import drn
    from pipeline.store.output import OutputMetadata, class_fraction_of, encode_mask, schema_with_metadata
    from pipeline.job.sink import write_table_atomic

    labels = drn.get_preset("cityscapes")
    n = len(labels.class_names)
    meta = OutputMetadata(model="drn_d_22", weights="synthetic.pth", weights_sha256="0" * 64,
                          num_classes=n, classes=labels.class_names, palette=labels.palette,
                          mean=labels.mean, std=labels.std)
    schema = schema_with_metadata(meta)
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    for start in range(0, rows, ROWS_PER_FILE):
        count = min(ROWS_PER_FILE, rows - start)
        cols: dict[str, list] = {name: [] for name in schema.names}
        for i in range(start, start + count):
            mask = np.full((side, side), rng.integers(n), np.uint8)
            for _ in range(int(rng.integers(2, 6))):
                y, x = rng.integers(0, side, 2)
                h, w = rng.integers(1, side // 2, 2)
                mask[y:y + h, x:x + w] = rng.integers(n)
            scores = rng.dirichlet(np.ones(n)).astype(np.float32)
            row = {"image_id": f"dir{i % 10}/img{i:06d}.jpg", "uri": f"/nowhere/img{i:06d}.jpg",
                   "status": "ok", "error": None, "height": side, "width": side,
                   "mask": {"bytes": encode_mask(mask), "path": None},
                   "class_scores": scores.tolist(),
                   "class_fraction": class_fraction_of(mask, n).tolist(),
                   "confidence": float(rng.uniform(0.3, 1.0)), "model": meta.model,
                   "weights_sha256": meta.weights_sha256, "run_id": "synthetic",
                   "labelled_at": now}
            for k, v in row.items():
                cols[k].append(v)
        table = pa.table(cols, schema=schema)
        write_table_atomic(str(output), f"part-synthetic-{start:08d}.parquet", table)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(kind: str, output: str, out: str) -> None:
    """One measurement, in its own process: import, then export (or report)."""
    from pipeline.tools.export import export
    from pipeline.tools.report import write_report

    import cv2  # noqa: F401  (imported by the work anyway; count it in the baseline)
    import pycocotools.mask  # noqa: F401

    before = peak_mb()
    t0 = time.perf_counter()
    if kind == "report":
        result = write_report(output, Path(out), limit=50)
        done = {"rows": result.rows}
    else:
        fmt, _, colour = kind.partition("+")
        result = export(output, fmt, Path(out), colour=bool(colour))
        done = {"images": result.images, "annotations": result.annotations}
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).rglob("*")) if Path(out).is_dir() else Path(out).stat().st_size
    print(json.dumps({"kind": kind, "baseline_mb": round(before, 1), "peak_mb": round(peak_mb(), 1),
                      "seconds": round(seconds, 2), "out_mb": round(size / 2**20, 2), **done}))


KINDS = ["png", "png+colour", "coco", "label-studio", "report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2500, 10000])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it.")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "OUTPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="export_memory_"))
    print(f"{'rows':>6} {'export':<13} {'baseline MiB':>12} {'peak MiB':>9} {'growth MiB':>10} "
          f"{'seconds':>8} {'written MiB':>11}")
    for rows in args.rows:
        output = work / f"out_{rows}"
        if not output.exists():
            synthesise(output, rows, args.side)
        for kind in KINDS:
            suffix = {"coco": ".json", "label-studio": ".json", "report": ".html"}.get(kind, "")
            out = work / f"{kind}_{rows}{suffix}"
            res = subprocess.run([sys.executable, __file__, "--child", kind, str(output), str(out)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{rows:>6} {kind:<13} {r['baseline_mb']:>12.1f} {r['peak_mb']:>9.1f} "
                  f"{r['peak_mb'] - r['baseline_mb']:>10.1f} {r['seconds']:>8.2f} {r['out_mb']:>11.2f}")
    if args.keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
