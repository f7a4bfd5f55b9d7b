"""How fast a run says "nothing to do" without Ray, and what the check costs a run that has
work; not a test.

    python bench/nothing_to_do.py [--rows 1000000] [--keep DIR]

Writes a manifest of N image URIs (Parquet and CSV) and an OUTPUT holding an ok row of
each for the model identity that `run --num-classes 3` (no weights) has, directly with
pyarrow in the output schema (100,000 rows per file). Then, each in a fresh process:

1. `drn-label run MANIFEST OUTPUT --num-classes 3` (everything labelled): wall time and
   peak RSS (/usr/bin/time), and whether a Ray session appeared in its own RAY_TMPDIR;
2. the pre-check alone (`pipeline.job.precheck.nothing_to_do`) when the manifest holds
   one image more than OUTPUT, at its first row and at its last: what it adds to a run
   that has work before that run starts Ray.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS_PER_FILE = 100_000


def identity():
    from pipeline.job.run import describe_model
    from pipeline.spec import JobSpec

    return describe_model(JobSpec(input="x", output="y", num_classes=3))


def synthesise(root: Path, rows: int) -> tuple[Path, Path, Path]:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from pipeline.store.fs import write_table_atomic
    from pipeline.store.output import data_file_name, schema_with_metadata

    meta = identity()
    uris = pa.array([f"images/{i:09d}.jpg" for i in range(rows)], pa.string())
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris}), manifest, row_group_size=ROWS_PER_FILE)
    pcsv.write_csv(pa.table({"uri": uris}), root / "manifest.csv")
    output = root / "out"
    schema = schema_with_metadata(meta)
    now = datetime.now(timezone.utc)
    for start in range(0, rows, ROWS_PER_FILE):
        ids = uris.slice(start, ROWS_PER_FILE)
        n = len(ids)
        table = pa.table({"image_id": ids, "uri": ids, "status": pa.array(["ok"] * n),
                          "model": pa.array([meta.model] * n),
                          "weights_sha256": pa.array([meta.weights_sha256] * n),
                          "run_id": pa.array(["bench"] * n),
                          "labelled_at": pa.array([now] * n, pa.timestamp("us", tz="UTC"))})
        table = pa.Table.from_batches(table.to_batches(), table.schema)
        full = pa.table({f.name: table.column(f.name) if f.name in table.column_names
                         else pa.nulls(n, f.type) for f in schema}, schema=schema)
        write_table_atomic(str(output), data_file_name("bench", ids.to_pylist()), full)
    with_one_more = root / "manifest_plus_one.parquet"
    pq.write_table(pa.table({"uri": pa.concat_arrays([uris, pa.array(["images/new.jpg"])])}),
                   with_one_more, row_group_size=ROWS_PER_FILE)
    return manifest, root / "manifest.csv", with_one_more


def timed_run(manifest: Path, output: Path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="drnb-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "pipeline.cli", "run",
                          str(manifest), str(output), "--num-classes", "3"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    wall, rss_kb = out.stderr.strip().splitlines()[-1].split()
    said = next((line for line in out.stderr.splitlines() if line.startswith("nothing to do")), "-")
    started_ray = bool(os.listdir(ray_tmp))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"  run {manifest.name}: exit {out.returncode}, {float(wall):.2f} s wall, peak RSS "
          f"{int(rss_kb) / 1024:.0f} MiB, Ray session started: {started_ray}")
    print(f"    {said[:110]}")


def timed_check(manifest: Path, output: Path) -> None:
    code = (
        "import time, sys; sys.path.insert(0, %r)\n"
        "from bench.nothing_to_do import identity\n"
        "from pipeline.job.precheck import nothing_to_do\n"
        "from pipeline.spec import JobSpec\n"
        "from pipeline.store.sources import plan_inputs\n"
        "meta = identity(); spec = JobSpec(input=%r, output=%r, num_classes=3)\n"
        "t = time.time(); verdict = nothing_to_do(spec, plan_inputs(spec.input), spec.output, meta)\n"
        "print(f'{time.time() - t:.2f}', verdict)\n" % (str(ROOT), str(manifest), str(output)))
    out = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", code], capture_output=True,
                         text=True, cwd=ROOT, timeout=900)
    seconds, verdict = out.stdout.split(maxsplit=1)
    rss = int(out.stderr.strip().splitlines()[-1]) / 1024
    print(f"  check alone, {manifest.name}: {seconds} s -> {verdict.strip()}; peak RSS {rss:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, default=None, help="Build here and keep it.")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="drn-nothing-"))
    root.mkdir(parents=True, exist_ok=True)
    t = time.time()
    parquet, csv, plus_one = synthesise(root, args.rows)
    print(f"{args.rows} inputs, an OUTPUT holding all of them ({time.time() - t:.0f} s to build), "
          f"{datetime.now().isoformat(timespec='minutes')}, load {os.getloadavg()[0]:.1f}")
    for manifest in (parquet, csv):
        timed_run(manifest, root / "out")
    timed_check(plus_one, root / "out")
    plus_first = root / "manifest_new_first.csv"
    plus_first.write_text("uri\nimages/new.jpg\n" + csv.read_text().split("\n", 1)[1])
    timed_check(plus_first, root / "out")


if __name__ == "__main__":
    main()
