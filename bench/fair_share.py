"""Does training hold its fair share of the cores beside other work? Not a test.

    python bench/fair_share.py [--busy 0,1,2] [--modes default,passive,t1,t2,tuned] [--epochs 3]

Writes the demo's training scenes once (`drn-label demo`'s recipe: 300 synthetic scenes,
drn_d_22, 64 px crops, batch 8), then for every mode and every count of CPU-bound
processes beside it (each spinning `while True: pass`), trains in a fresh process and
prints the median time of the epochs after the first, and its ratio to the same mode with
nothing beside it. Modes:

- ``default``: torch as it comes (OpenMP's default wait policy: idle threads spin);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (what `drn-label` sets unless given);
- ``tN``: passive, and N torch threads fixed (``train(threads=N)``);
- ``tuned``: passive, and the thread count `train` picks itself (its default);
- ``spinN`` / ``spinN-tuned``: OpenMP's default policy with ``GOMP_SPINCOUNT=N`` (idle
  threads spin N times before they sleep; libgomp's default is 300,000, PASSIVE is 0),
  all threads / the tuner.

The first epoch is left out: it holds one-off costs (the allocator's first batches) and
most of the tuner's probing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys
from pipeline.tools.demo import DEMO_ARCH, DEMO_FIT
from pipeline.training.train import train
import torch
threads = json.loads(sys.argv[3])
threads = torch.get_num_threads() if threads == "all" else threads
fit = dict(DEMO_FIT, epochs=int(sys.argv[4]))
chosen = []
result = train(sys.argv[1], arch=DEMO_ARCH, out=sys.argv[2], resume=False, patience=None,
               threads=threads, log=lambda m: chosen.append(m.split(": ")[1].split(" ")[0])
               if m.startswith("torch threads") else None, **fit)
print(json.dumps([[h.seconds for h in result.history], chosen]))
"""


def spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def train_epochs(data: Path, mode: str, epochs: int, scratch: Path) -> tuple[list[float], list[str]]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    threads: int | str = 0  # the tuner
    if mode == "default":
        threads = "all"
    elif mode.startswith("spin"):
        count, _, tuned = mode[4:].partition("-")
        env["GOMP_SPINCOUNT"] = count
        threads = 0 if tuned == "tuned" else "all"
    else:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        if mode.startswith("t") and mode[1:].isdigit():
            threads = int(mode[1:])
        elif mode == "passive":
            threads = "all"
        elif mode != "tuned":
            raise SystemExit(f"unknown mode {mode!r}")
    out = scratch / f"{mode}-{time.monotonic_ns()}.pth"
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), json.dumps(threads),
                           str(epochs)], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"training ({mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # epoch seconds, thread choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--busy", default="0,1,2", help="counts of CPU-bound processes beside it")
    parser.add_argument("--modes", default="default,passive,t1,tuned")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    from pipeline.tools.demo import DEMO_TRAIN
    from pipeline.training.synth import make_synthetic_set

    busy_counts = [int(b) for b in args.busy.split(",")]
    modes = args.modes.split(",")
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; "
          f"{args.epochs} epochs each, median of epochs 2..{args.epochs}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fair-share-") as tmp:
        data = Path(tmp) / "train"
        make_synthetic_set(data, **DEMO_TRAIN)
        idle: dict[str, float] = {}
        for busy in busy_counts:
            for mode in modes:
                hogs = [spin() for _ in range(busy)]
                try:
                    seconds, chosen = train_epochs(data, mode, args.epochs, Path(tmp))
                finally:
                    for hog in hogs:
                        hog.kill()
                        hog.wait()
                epoch = statistics.median(seconds[1:] or seconds)
                if busy == 0:
                    idle[mode] = epoch
                ratio = f"{epoch / idle[mode]:.2f}x" if mode in idle else "-"
                print(f"busy {busy}  {mode:8s}  epoch {epoch:6.1f}s  ({ratio} its idle)  "
                      f"epochs {' '.join(f'{s:.1f}' for s in seconds)}"
                      + (f"  threads chosen {' -> '.join(chosen)}" if chosen else ""), flush=True)


if __name__ == "__main__":
    main()
