"""Throughput and memory of the predictor core alone (no Ray): the figure to run on a GPU.

The Ray wheel is too large to carry to a GPU machine, so this measures what each predict
actor does: uint8 RGB batches in, normalisation, forward, softmax statistics, arg-max,
masks and C floats back on the host. For each architecture, precision and batch size it
prints images/s and the peak device memory.

    python bench/predictor_gpu.py                      # 512 x 1024, drn_d_22 and drn_d_38
    python bench/predictor_gpu.py --device cpu --height 64 --width 128 --batches 1,2 --iters 2
    python bench/predictor_gpu.py --compile --precisions fp16 --batches 16,32   # torch.compile

TFLOP/s counts the model's forward pass only (torch.utils.flop_counter, one image), so it
reads against the GPU's peak: drn_d_22 costs 272.6 GFLOP per 512 x 1024 image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import drn  # noqa: E402
from drn.predictor import Predictor  # noqa: E402


def forward_flops(arch: str, height: int, width: int) -> float:
    """Floating-point operations of one forward pass of `arch` on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = drn.create_model(arch, num_classes=19).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, height, width))
    return float(counter.get_total_flops())


def run(arch: str, precision: str, batch: int, height: int, width: int, iters: int,
        device: str, channels_last: bool | None, compile: bool = False) -> tuple[float, float]:  # noqa: A002
    model = drn.create_model(arch, num_classes=19)
    pred = Predictor.from_model(model, device=device, precision=precision, batch_size=batch,
                                channels_last=channels_last, compile=compile)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch)]
    pred.predict(images)  # warm-up (cudnn benchmark picks kernels; torch.compile compiles)
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        pred.predict(images)
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if pred.device.type == "cuda" else float("nan")
    del pred, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return batch * iters / dt, peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="drn_d_22,drn_d_38")
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="Predictor(compile=True): torch.compile")
    args = ap.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"device {name}, torch {torch.__version__}, {args.height}x{args.width}, "
          f"{args.iters} iterations per point{', torch.compile' if args.compile else ''}")
    print(f"{'arch':<10} {'precision':<9} {'batch':>5} {'images/s':>9} {'TFLOP/s':>8} {'peak MiB':>9}")
    for arch in args.archs.split(","):
        flops = forward_flops(arch, args.height, args.width)
        print(f"{arch}: {flops / 1e9:.1f} GFLOP per {args.height}x{args.width} image")
        for precision in args.precisions.split(","):
            if precision == "fp16" and device == "cpu":
                continue
            for batch in (int(b) for b in args.batches.split(",")):
                try:
                    ips, peak = run(arch, precision, batch, args.height, args.width, args.iters,
                                    device, False if args.no_channels_last else None, args.compile)
                except torch.OutOfMemoryError:
                    print(f"{arch:<10} {precision:<9} {batch:>5} {'OOM':>9}")
                    torch.cuda.empty_cache()
                    continue
                print(f"{arch:<10} {precision:<9} {batch:>5} {ips:>9.1f} {ips * flops / 1e12:>8.1f} "
                      f"{peak:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
