"""Peak memory of reading a few rows of a Parquet file that holds image bytes.

Writes (with pyarrow's defaults: dictionary encoding, snappy, pages of up to 1,024
values) one row group of `--rows` cells of `--cell-kib` random bytes, and a file whose
middle cell is `--big-mib` MiB. Then, each in a fresh process, reads 16 rows from the
middle of the row group and the big cell with --max-bytes 256 MiB, and prints the
process's peak RSS and Arrow's peak allocation:
- "row group": what reading did before (the image column of the whole row group, then
  the wanted cells copied out);
- "read_all": what a decode task does now (pipeline.store.sources.read_all).

    python -m bench.embedded_memory --rows 8192 --cell-kib 256 --big-mib 300 --out /tmp/emb
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_READ = """
import json, resource, sys
import pyarrow as pa, pyarrow.parquet as pq
from pipeline.store.sources import read_all
how, path, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if how == "row group":
    cells = pq.ParquetFile(path).read_row_group(0, columns=["image"]).column(0)
    got = [cells[k].as_py()["bytes"] for k in range(first, first + count)]
    got = [g if len(g) <= 256 << 20 else "too large" for g in got]
else:
    got = read_all([f"{path}#row={k}" for k in range(first, first + count)], retries=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_mib": round(peak / 1024), "rss_after_imports_mib": round(base / 1024),
                  "arrow_peak_mib": round(pa.default_memory_pool().max_memory() / 2**20),
                  "ok": sum(isinstance(g, bytes) for g in got), "errors": sum(not isinstance(g, bytes) for g in got)}))
"""


def _write(path: Path, cell_sizes: list[int], fill) -> None:
    """One row group of cells of `cell_sizes` bytes (`fill(k, size)` makes cell k), built
    64 cells a chunk straight into Arrow buffers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    chunks = []
    for start in range(0, len(cell_sizes), 64):
        sizes = cell_sizes[start:start + 64]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        data = pa.py_buffer(b"".join(fill(start + k, size) for k, size in enumerate(sizes)))
        cells = pa.Array.from_buffers(pa.binary(), len(sizes), [None, pa.py_buffer(offsets), data])
        paths = pa.array([f"{start + k}.bin" for k in range(len(sizes))])
        chunks.append(pa.StructArray.from_arrays([cells, paths], fields=list(image)))
    table = pa.table({"image": pa.chunked_array(chunks, image)})
    pq.write_table(table, path, row_group_size=len(cell_sizes))


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cell-kib", type=int, default=256)
    parser.add_argument("--big-mib", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    group, big = args.out / "group.parquet", args.out / "big.parquet"
    if not args.write_only and not (group.exists() and big.exists()):
        # in a process of its own: a child's peak RSS starts from its parent's (it survives exec)
        subprocess.run([sys.executable, "-m", "bench.embedded_memory", *sys.argv[1:], "--write-only"],
                       check=True)
    if not group.exists():
        _write(group, [args.cell_kib << 10] * args.rows,
               lambda k, size: np.random.default_rng(k).bytes(size))
    if not big.exists():
        _write(big, [400, args.big_mib << 20, 400], lambda k, size: b"\0" * size)
    if args.write_only:
        return
    meta = pq.ParquetFile(group).metadata
    print(f"row group: {meta.num_rows} rows, {meta.row_group(0).total_byte_size / 2**30:.2f} GiB "
          f"({meta.num_row_groups} row group); big cell {args.big_mib} MiB")
    for what, path, first, count in (("16 rows of the row group", group, args.rows // 2, 16),
                                     (f"the {args.big_mib} MiB cell", big, 1, 1)):
        for how in ("row group", "read_all"):
            proc = subprocess.run([sys.executable, "-c", _READ, how, str(path), str(first),
                                   str(count)], capture_output=True, text=True)
            result = (json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0
                      else f"failed: {proc.stderr.strip().splitlines()[-1]}")
            print(f"{what:28s} {how:10s} {result}")


if __name__ == "__main__":
    main()
