"""Soak: label many small images while predict workers keep dying; not a test (minutes).

    python bench/soak.py [--images 5000] [--workers 2] [--kill-every 5] [--keep DIR]

Writes `--images` 32 x 32 PNGs, starts a private local Ray (never a `ray start` cluster
the machine may have), and runs the labelling job in this process (drn_d_22, 3 classes,
no weights, batch size 4, 100 rows per file). Meanwhile a thread SIGKILLs one predict
worker, picked at random among this process's descendants, every `--kill-every` seconds
(+-50%). At the end it reads OUTPUT and prints the rows lost (images without an ok row),
the rows duplicated (rows beyond one per image) and the wall time; it exits 1 unless
both counts are 0.

On a 2-core machine `--workers 2` leaves no whole CPU for decoding, so each predict
worker reserves `--cpus-per-worker 0.5` (and one torch thread) by default.
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREDICT_TITLE = "ray::MapWorker(MapBatches(PredictActor))"


def write_images(folder: Path, count: int, side: int) -> list[str]:
    import cv2

    from tests.imagegen import scene

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"{i // 1000:03d}/img_{i:06d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / name), scene(side, side, i)[..., ::-1])
        names.append(name)
    return names


def predict_workers() -> list:
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).strip().startswith(PREDICT_TITLE):
                found.append(proc)
        except psutil.Error:
            pass
    return found


class Killer(threading.Thread):
    """SIGKILLs a random predict worker every `every` seconds (+-50%) until stopped."""

    def __init__(self, every: float, seed: int) -> None:
        super().__init__(name="soak-killer", daemon=True)
        self.every, self.rng = every, random.Random(seed)
        self.stop = threading.Event()
        self.kills: list[tuple[float, int, str]] = []

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.wait(self.every * self.rng.uniform(0.5, 1.5)):
            workers = predict_workers()
            if not workers:
                continue
            victim = self.rng.choice(workers)
            try:
                state = " ".join(victim.cmdline()).strip()
                victim.send_signal(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - it may have gone already
                continue
            busy = "busy" if state.endswith(".submit") else "idle"
            self.kills.append((time.time() - t0, victim.pid, busy))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()

    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.store.output import SCHEMA, data_files
    from pipeline.job.run import run_job
    from pipeline.spec import JobSpec

    work = args.keep or Path(tempfile.mkdtemp(prefix="drn-soak-"))
    inputs, output = work / "in", work / "out"
    t0 = time.time()
    image_ids = write_images(inputs, args.images, args.side)
    print(f"wrote {len(image_ids)} images of {args.side}x{args.side} in {time.time() - t0:.1f}s",
          flush=True)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t_start = time.time()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    spec = JobSpec(input=str(inputs), output=str(output), model="drn_d_22", num_classes=3,
                   batch_size=4, rows_per_file=100, workers=args.workers,
                   cpus_per_worker=args.cpus_per_worker, torch_threads=1)
    killer = Killer(args.kill_every, args.seed)
    killer.start()
    try:
        result = run_job(spec, echo=lambda m: print(m, flush=True))
    finally:
        killer.stop.set()
        killer.join()
    wall = time.time() - t_start
    ray.shutdown()

    rows = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in data_files(str(output))])
    ids = rows.column("image_id").to_pylist()
    ok_ids = {i for i, s in zip(ids, rows.column("status").to_pylist()) if s == "ok"}
    lost = len(set(image_ids) - ok_ids)
    duplicated = len(ids) - len(set(ids))
    busy = sum(1 for _, _, state in killer.kills if state == "busy")
    errors = Counter(rows.column("status").to_pylist())["error"]
    print(f"images: {len(image_ids)}  workers: {args.workers}  predict workers killed: "
          f"{len(killer.kills)} ({busy} while labelling a batch), one every ~{args.kill_every:g}s")
    print(f"rows: {len(ids)}  ok: {len(ok_ids)}  errors: {errors}  "
          f"files: {len(data_files(str(output)))}  run state: {result.state}")
    print(f"rows lost: {lost}")
    print(f"rows duplicated: {duplicated}")
    print(f"wall time: {wall:.1f}s ({len(image_ids) / wall:.1f} images/s, Ray start-up included)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if lost == 0 and duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
