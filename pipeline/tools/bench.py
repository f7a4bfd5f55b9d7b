"""`drn-label bench`: the pipeline against its ceiling, measured in one run.

On the same generated images it measures
  (a) the bare model: forward passes on tensors already decoded and on the device, the
      ceiling (arg-max included, nothing else);
  (b) the full pipeline: `drn-label run` in a fresh process, encoded files to committed
      Parquet, with its own embedded Ray (start-up included in the wall time);
  (c) one plain process doing the pipeline's work batch by batch: read, decode, predict,
      PNG, Parquet (measured before and after (b): the machine's noise shows);
and prints images/s for each, the ratios b/a and b/c, the pipeline's wall time with and
without start-up, and the peak memory of the driver and of each kind of Ray worker.
`--stand-in` replaces the model by one that costs nothing: (b)/(c) is then the feed.
`--png-levels` adds bytes and encode time per mask for each PNG compression level.
`--memory-sizes 1000,5000` runs the pipeline at those image counts and compares peaks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.errors import JobError
from pipeline.store.reader import read_progress, read_runs


# -- inputs ---------------------------------------------------------------------------------
def make_images(root: Path, count: int, size: int, *, fmt: str = "jpg", seed: int = 0,
                width: int | None = None) -> list[Path]:
    """`count` synthetic scenes of size x `width` (default size) as JPEG (or PNG) files,
    cached by name; made by a process per core when there are many."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{i:06d}.{fmt}" for i in range(count)]
    todo = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    jobs = [(i, str(p), size, width or size, fmt, seed) for i, p in todo]
    if len(jobs) >= 200 and (os.cpu_count() or 1) > 2:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned: a fork of a process that already runs Ray's threads can hang
        with ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_make_image, jobs, chunksize=16))
    else:
        for job in jobs:
            _make_image(job)
    return paths


def _make_image(job: tuple) -> None:
    import cv2

    from pipeline.training.synth import render_sample

    i, path, size, width, fmt, seed = job
    rgb, _ = render_sample(i % 997, size=size, seed=seed)
    if width != size:
        rgb = cv2.resize(rgb, (width, size), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == "jpg" else [])


# -- memory sampling ------------------------------------------------------------------------
@dataclass
class MemorySampler:
    """Peak RSS of a process tree and of Ray's worker processes, sampled every 0.2 s."""

    root_pid: int | None = None
    interval: float = 0.2
    peaks: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _kind(self, proc) -> str | None:
        try:
            title = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - processes come and go
            return None
        if proc.pid == self.root_pid:
            return "driver"
        if "ray::" in title:
            name = title.split("ray::", 1)[1].split()[0]
            if "PredictActor" in name:
                return "predict actor"
            if "decode_batch" in name:
                return "decode task"
            if "encode_batch" in name or "Write" in name:
                return "encode+write task"
            if name.startswith("IDLE"):
                return None
            return "other ray worker"
        for daemon in ("raylet", "gcs_server"):
            if daemon in title:
                return daemon
        return None

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            for proc in psutil.process_iter():
                kind = self._kind(proc)
                if kind is None:
                    continue
                try:
                    rss = proc.memory_info().rss
                except Exception:  # noqa: BLE001
                    continue
                self.peaks[kind] = max(self.peaks[kind], rss)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(timeout=5)
        return dict(self.peaks)


# -- (a) the bare model ---------------------------------------------------------------------
def bench_model(arch: str, num_classes: int, images: list[np.ndarray], batch_size: int,
                device: str, precision: str = "fp32") -> float:
    """Images/s of forward + arg-max on tensors already normalised and on the device."""
    import torch

    import drn
    from drn.predictor import Predictor

    model = drn.create_model(arch, num_classes=num_classes)
    predictor = Predictor.from_model(model, device=device, precision=precision, batch_size=batch_size)
    batches = [torch.from_numpy(np.stack(images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
    tensors = [predictor.normalise(b) for b in batches]
    with torch.inference_mode(), predictor._autocast():
        predictor.model(tensors[0]).argmax(1)  # warm-up
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in tensors:
            predictor.model(x).argmax(1)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


# -- (c) one plain process ------------------------------------------------------------------
def bench_plain(files: list[Path], out: Path, *, job) -> float:
    """The pipeline's work in one plain process, batch by batch: read each file, decode it
    (the pipeline's decode path), predict (the same Predictor: statistics on the device),
    encode the masks as PNG and write them to one Parquet file. Images/s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.job.model import build_model, predictor_for
    from pipeline.store.decode import decode_image
    from pipeline.store.output import encode_mask

    predictor = predictor_for(job, build_model(job))
    t0 = time.perf_counter()
    rows = []
    for start in range(0, len(files), job.batch_size):
        chunk = files[start:start + job.batch_size]
        images = [decode_image(path.read_bytes(), str(path)) for path in chunk]
        for path, pred in zip(chunk, predictor.predict(images)):
            rows.append({"image_id": path.name, "mask": encode_mask(pred.mask, job.png_compression),
                         "class_scores": pred.class_scores.tolist(),
                         "class_fraction": pred.class_fraction.tolist(),
                         "confidence": pred.confidence})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(files) / (time.perf_counter() - t0)


# -- (b) the pipeline -----------------------------------------------------------------------
@dataclass
class PipelineFigures:
    images: int
    wall_s: float  # process start to exit: Ray start-up, model load, labelling, commit
    label_s: float  # from the first image read to the last file committed
    steady_images_per_s: float
    startup_s: float
    peaks: dict[str, int]


def bench_pipeline(input_dir: Path, output: Path, *, arch: str, num_classes: int,
                   batch_size: int | None, stand_in: bool = False,
                   extra: Sequence[str] = ()) -> PipelineFigures:
    """`drn-label run` in a fresh process (its own embedded Ray), sampled for memory."""
    if output.exists():
        shutil.rmtree(output)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(input_dir), str(output),
           "--model", arch, "--num-classes", str(num_classes), "--rows-per-file", "500",
           *(["--batch-size", str(batch_size)] if batch_size else []),
           *(["--stand-in"] if stand_in else []), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(root_pid=proc.pid).start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    peaks = sampler.stop()
    if proc.returncode != 0:
        raise JobError(f"pipeline run failed ({proc.returncode}):\n{stderr[-3000:]}")
    record = read_runs(str(output))[-1]
    progress = read_progress(str(output))
    return PipelineFigures(images=record["counts"]["ok"] + record["counts"]["errors"], wall_s=wall,
                           label_s=record["timings"]["label_s"],
                           steady_images_per_s=progress.get("steady_images_per_s") or 0.0,
                           startup_s=record["timings"]["startup_s"], peaks=peaks)


# -- PNG levels -----------------------------------------------------------------------------
def bench_png_levels(masks: list[np.ndarray], levels=range(0, 10)) -> list[tuple[int, float, float]]:
    import cv2

    rows = []
    for level in levels:
        t0 = time.perf_counter()
        sizes = [len(cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, level])[1]) for m in masks]
        rows.append((level, float(np.mean(sizes)), (time.perf_counter() - t0) / len(masks) * 1e3))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def run_bench(*, count: int, size: int, arch: str, num_classes: int, batch_size: int | None,
              workdir: Path | None, device: str, skip_plain: bool, png_levels: bool,
              memory_sizes: str | None, run_args: Sequence[str], stand_in: bool = False,
              width: int | None = None, echo: Callable[[str], None] = print) -> None:
    """Measure the bare model, the full pipeline and one plain process on the same images;
    print the figures with `echo` (one run, so ratios compare like with like).

    With `stand_in` the model is replaced by one that costs nothing (drn.standin): (b)
    against (c) then shows how fast the pipeline alone feeds a model, on any machine."""
    import cv2
    import torch

    from drn.predictor import pick_device
    from pipeline.spec import JobSpec

    dev = str(pick_device(device))
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="drn-label-bench-")
        workdir = Path(tmp.name)
    width = width or size
    img_dir = workdir / (f"images-{size}-{count}" if width == size else f"images-{size}x{width}-{count}")
    model_name = "the stand-in (zero logits)" if stand_in else arch
    echo(f"machine: {os.cpu_count()} CPUs, device {dev}, torch {torch.__version__} "
         f"({torch.get_num_threads()} threads); {count} images {size}x{width} JPEG; "
         f"{model_name}, {num_classes} classes, batch {batch_size or 'default'}")
    files = make_images(img_dir, count, size, width=width)
    # The plain process runs with the batch size the pipeline chose (its run record says).
    plain_job = lambda batch: JobSpec(input=str(img_dir), output=str(workdir), model=arch,  # noqa: E731
                                      num_classes=num_classes, batch_size=batch,
                                      stand_in=stand_in).validate()
    plain = []
    if not skip_plain and batch_size:
        plain.append(bench_plain(files, workdir / "plain.parquet", job=plain_job(batch_size)))
    fig = bench_pipeline(img_dir, workdir / "out-pipeline", arch=arch, num_classes=num_classes,
                         batch_size=batch_size, stand_in=stand_in, extra=list(run_args))
    batch_used = read_runs(str(workdir / "out-pipeline"))[-1]["spec"]["batch_size"]
    if not skip_plain:
        plain.append(bench_plain(files, workdir / "plain.parquet", job=plain_job(batch_used)))
    wall_ips = fig.images / fig.wall_s
    steady = fig.steady_images_per_s
    if not stand_in:
        rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in files]
        model_ips = bench_model(arch, num_classes, rgb, batch_used, dev)
        echo(f"(a) bare model            {model_ips:8.2f} images/s")
        echo(f"(b) pipeline steady state {steady:8.2f} images/s   b/a = {steady / model_ips:.3f}")
        echo(f"    pipeline incl. start-up {wall_ips:7.2f} images/s   (wall {fig.wall_s:.1f}s, "
             f"of which start-up {fig.startup_s:.1f}s; labelling {fig.label_s:.1f}s)   "
             f"wall/a = {wall_ips / model_ips:.3f}")
    else:
        echo(f"(b) pipeline steady state {steady:8.2f} images/s   (batch {batch_used})")
        echo(f"    pipeline incl. start-up {wall_ips:7.2f} images/s   (wall {fig.wall_s:.1f}s, "
             f"of which start-up {fig.startup_s:.1f}s; labelling {fig.label_s:.1f}s)")
    if plain:
        plain_ips = sum(plain) / len(plain)
        echo(f"(c) one plain process     {plain_ips:8.2f} images/s   (" +
             ", ".join(f"{p:.2f}" for p in plain) + ")   b/c = "
             f"{steady / plain_ips:.3f}   (b incl. start-up)/c = {wall_ips / plain_ips:.3f}")
    echo("peak memory (RSS): " + ", ".join(f"{k} {_mib(v)}" for k, v in sorted(fig.peaks.items())))

    if png_levels:
        import pyarrow.parquet as pq

        from pipeline.store.output import data_files, decode_mask

        table = pq.read_table(data_files(str(workdir / "out-pipeline")), columns=["mask"])
        masks = [decode_mask(m) for m in table.column("mask").to_pylist()[:200] if m]
        echo("PNG level  bytes/mask  encode ms/mask")
        for level, nbytes, ms in bench_png_levels(masks):
            echo(f"{level:>9}  {nbytes:>10,.0f}  {ms:>14.3f}")

    if memory_sizes:
        sizes = [int(s) for s in memory_sizes.split(",")]
        totals = []
        for n in sizes:
            d = workdir / f"images-64-{n}"
            make_images(d, n, 64, fmt="png")
            f = bench_pipeline(d, workdir / f"out-mem-{n}", arch=arch, num_classes=num_classes,
                               batch_size=batch_size, stand_in=stand_in, extra=list(run_args))
            total = sum(f.peaks.values())
            totals.append(total)
            echo(f"memory, {n} images 64x64: wall {f.wall_s:.1f}s; peaks " +
                 ", ".join(f"{k} {_mib(v)}" for k, v in sorted(f.peaks.items())) +
                 f"; sum of peaks {_mib(total)}")
        if len(totals) > 1:
            echo(f"peak memory ratio {sizes[-1]} vs {sizes[0]} images: {totals[-1] / totals[0]:.3f}")
    if tmp is not None:
        tmp.cleanup()
