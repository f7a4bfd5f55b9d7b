"""Scale benchmark: does a run start, and commit, the same way at 10 thousand and 1 million images?

For each size N it writes a Parquet manifest of N rows (distinct image ids over a pool of
small distinct PNG files), starts `drn-label run MANIFEST OUTPUT` in a fresh process with
its own embedded Ray, and samples every 0.2 s:

- time to first image: from the command's start to the first labelled image (progress
  file, written every 2 s; the earliest `labelled_at` of the committed rows is printed
  too, which is exact to the row);
- driver peak RSS: the `drn-label` process alone (Ray's own processes are separate);
- commit lag: the most rows labelled but not yet committed, and for each committed count
  how many seconds after the same count was labelled it was committed (the largest);
- images/s over the window.

The labelling need not finish: after `--window` seconds from the first image the run is
stopped the way `drn-label stop` does (SIGTERM to its process group) and anything left of
its Ray is killed. Usage:

    python bench/scale.py --sizes 10000,100000,1000000 --window 60
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil


def make_pool(folder: Path, count: int, side: int) -> list[str]:
    """`count` distinct small PNGs (cached)."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"p{i:05d}.png"
        if not path.exists():
            cv2.imwrite(str(path), rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def make_manifest(path: Path, n: int, pool: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if path.exists() and pq.read_metadata(path).num_rows == n:
        return path
    ids = pc.cast(pa.array(range(n), pa.int64()), pa.string())
    uris = pa.array(pool).take(pa.array([i % len(pool) for i in range(n)]))
    pq.write_table(pa.table({"image_id": pc.binary_join_element_wise("img-", ids, ""), "uri": uris}),
                   path)
    return path


def marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DRN_BENCH_MARK") == mark:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def measure(manifest: Path, output: Path, window: float, run_args: list[str]) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    mark = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="drnscale-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DRN_BENCH_MARK=mark, RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    command = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), str(output), *run_args]
    t0 = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    driver = psutil.Process(proc.pid)
    peak = 0
    first_t = None
    samples: list[tuple[float, int, int]] = []  # (t, labelled, committed)
    progress_file = output / "_state" / "progress.json"
    try:
        while proc.poll() is None:
            try:
                peak = max(peak, driver.memory_info().rss)
            except psutil.Error:
                pass
            try:
                p = json.loads(progress_file.read_text())
                samples.append((time.time() - t0, p["labelled"], p["committed"]))
                if first_t is None and p["labelled"] > 0:
                    first_t = time.time() - t0
            except (OSError, ValueError, KeyError):
                pass
            if first_t is not None and time.time() - t0 > first_t + window:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for left in marked(mark):
            try:
                left.kill()
            except psutil.Error:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lags, uncommitted = [], 0
    for t, labelled, committed in samples:
        uncommitted = max(uncommitted, labelled - committed)
        if committed:
            when = next(s for s, lab, _ in samples if lab >= committed)
            lags.append(t - when)
    exact_first = None
    data = output / "data"
    if data.is_dir() and any(data.iterdir()):
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        first = pc.min(ds.dataset(str(data)).to_table(columns=["labelled_at"])["labelled_at"]).as_py()
        exact_first = first.timestamp() - t0 if first else None
    span = samples[-1][0] - first_t if samples and first_t else 0
    return {"first_image_s": first_t, "first_row_labelled_at_s": exact_first,
            "driver_peak_rss_mib": peak / 2**20, "max_uncommitted_rows": uncommitted,
            "max_commit_lag_s": max(lags) if lags else None,
            "labelled": samples[-1][1] if samples else 0,
            "committed": samples[-1][2] if samples else 0,
            "images_per_s": samples[-1][1] / span if span else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--window", type=float, default=60.0, help="seconds after the first image")
    parser.add_argument("--pool", type=int, default=2000, help="distinct image files")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/drn-scale")
    parser.add_argument("--run-arg", action="append", default=[],
                        help="extra `drn-label run` argument (repeat)")
    args = parser.parse_args()
    work = Path(args.workdir)
    pool = make_pool(work / "pool", args.pool, args.side)
    run_args = ["--model", "drn_d_22", "--num-classes", "3", "--batch-size", "8", *args.run_arg]
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        manifest = make_manifest(work / f"manifest-{n}.parquet", n, pool)
        figures = measure(manifest, work / f"out-{n}", args.window, run_args)
        rows.append((n, figures))
        print(json.dumps({"images": n, **figures}), flush=True)
    print("\n| images | first image (s) | driver peak RSS (MiB) | max uncommitted rows | "
          "max commit lag (s) | images/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, f in rows:
        lag = f"{f['max_commit_lag_s']:.1f}" if f["max_commit_lag_s"] is not None else "-"
        print(f"| {n:,} | {f['first_image_s'] or float('nan'):.1f} | {f['driver_peak_rss_mib']:.0f} | "
              f"{f['max_uncommitted_rows']} | {lag} | {f['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
