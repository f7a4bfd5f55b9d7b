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

`--incremental N --new M` measures a rerun instead: OUTPUT already holds N committed rows
(copies of one real row under N ids, in files of `--file-rows` rows, written straight to
Parquet), the manifest lists those N ids and M new ones, and the rerun labels the M to the
end. While it runs, the proportional memory (PSS from /proc/PID/smaps_rollup: anonymous +
shared memory, which the done sets live in, apart from file-backed pages the kernel can
drop) of every process of the run is summed every 0.5 s; the peak of the sum, the driver's
peak RSS and the peak per process kind are printed:

    python bench/scale.py --incremental 10000000 --new 2000 --run-arg=--rows-per-file --run-arg=10000
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



def stop_run(proc, mark: str, ray_tmp, *, graceful: bool) -> None:
    """End a benchmarked run: SIGTERM to its process group (SIGKILL after 60 s) or SIGKILL
    at once, then any process left with the run's mark, then its Ray folder."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
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
        stop_run(proc, mark, ray_tmp, graceful=True)
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


def smaps_rollup(pid: int) -> dict[str, int]:
    """Pss_Anon, Pss_Shmem and Pss_File of one process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss_Anon", "Pss_Shmem", "Pss_File"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def kind_of(proc: psutil.Process) -> str:
    """A process's role: Ray's process title (ray::ShardWriter, ray::IDLE, raylet, ...)."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    first = cmd[0] if cmd else proc.name()
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0].split("(")[0][:40]
    if "pipeline.cli" in " ".join(cmd):
        return "driver"
    return os.path.basename(first)[:40]


def seed_output(output: Path, template_run: list[str], manifest_small: Path, n: int,
                file_rows: int) -> None:
    """OUTPUT with `n` committed rows: a real run labels a few images (the output's metadata
    and one real row), then copies of its first row under ids img-0 .. img-(n-1) are written
    as data files of `file_rows` rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.rmtree(output, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(manifest_small), str(output),
                    *template_run], env=env, check=True, stdout=subprocess.DEVNULL)
    data = output / "data"
    files = sorted(data.glob("*.parquet"))
    template = pq.read_table(files[0])
    row = template.slice(0, 1)
    for f in files:
        f.unlink()
    for start in range(0, n, file_rows):
        count = min(file_rows, n - start)
        ids = pc.binary_join_element_wise(
            "img-", pc.cast(pa.array(range(start, start + count), pa.int64()), pa.string()), "")
        table = row.take(pa.array([0] * count, pa.int64()))
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id", ids)
        pq.write_table(table, data / f"part-seed-{start // file_rows:07d}.parquet")


def measure_incremental(manifest: Path, output: Path, run_args: list[str]) -> dict:
    """Run to the end over a seeded OUTPUT; peak summed PSS of the run's processes."""
    mark = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="drnscale-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(DRN_BENCH_MARK=mark, RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(manifest), str(output),
                             *run_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    peak_total, peak_split, peak_kinds, driver_rss = 0, {}, {}, 0
    try:
        while proc.poll() is None:
            total, split, kinds = 0, {"anon+shmem": 0, "file": 0}, {}
            for p in marked(mark) + [psutil.Process(proc.pid)]:
                try:
                    r = smaps_rollup(p.pid)
                except (OSError, psutil.Error):
                    continue
                mine = r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0)
                split["anon+shmem"] += mine
                split["file"] += r.get("Pss_File", 0)
                kind = kind_of(p)
                kinds[kind] = kinds.get(kind, 0) + mine
                total += mine
                if p.pid == proc.pid:
                    driver_rss = max(driver_rss, p.memory_info().rss)
            if total > peak_total:
                peak_total, peak_split, peak_kinds = total, split, kinds
            time.sleep(0.5)
        log = proc.stdout.read().decode(errors="replace")
    finally:
        stop_run(proc, mark, ray_tmp, graceful=False)
    return {"rc": proc.returncode, "wall_s": time.time() - t0,
            "peak_pss_anon_shmem_mib": peak_total / 2**20,
            "file_backed_at_peak_mib": peak_split.get("file", 0) / 2**20,
            "driver_peak_rss_mib": driver_rss / 2**20,
            "by_kind_at_peak_mib": {k: round(v / 2**20) for k, v in
                                    sorted(peak_kinds.items(), key=lambda kv: -kv[1])},
            "last_lines": log.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--window", type=float, default=60.0, help="seconds after the first image")
    parser.add_argument("--pool", type=int, default=2000, help="distinct image files")
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workdir", default="/tmp/drn-scale")
    parser.add_argument("--run-arg", action="append", default=[],
                        help="extra `drn-label run` argument (repeat)")
    parser.add_argument("--incremental", type=int, default=None,
                        help="N: measure a rerun over an OUTPUT of N committed rows")
    parser.add_argument("--new", type=int, default=2000, help="with --incremental: new images")
    parser.add_argument("--file-rows", type=int, default=10000, help="with --incremental: rows a file")
    args = parser.parse_args()
    work = Path(args.workdir)
    pool = make_pool(work / "pool", args.pool, args.side)
    run_args = ["--model", "drn_d_22", "--num-classes", "3", "--batch-size", "8", *args.run_arg]
    if args.incremental is not None:
        n = args.incremental
        output = work / f"out-incremental-{n}"
        small = make_manifest(work / "manifest-8.parquet", 8, pool)
        t = time.time()
        seed_output(output, run_args, small, n, args.file_rows)
        print(f"seeded {output} with {n:,} rows in {time.time() - t:.0f}s", flush=True)
        manifest = make_manifest(work / f"manifest-{n + args.new}.parquet", n + args.new, pool)
        figures = measure_incremental(manifest, output, run_args)
        print(json.dumps({"committed": n, "new": args.new, **figures}, indent=1))
        return
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
