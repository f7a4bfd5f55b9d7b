"""run_job(spec): list -> skip what is done -> decode -> predict -> encode -> commit.

The driver plans (how INPUT is listed, which of OUTPUT's files hold done rows), takes the
lease, and wires Ray Data stages; listing, the done set, the masks and the commits never
pass through it (pipeline.job.plan, pipeline.job.commit), so its memory and the time to
the first image do not grow with the number of inputs.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, TextIO

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import (EXIT_ERROR_RATE, EXIT_OK, Interrupted, JobError, StorageError,
                             stop_exit_code)
from pipeline.job.model import describe_model
from pipeline.job.precheck import check_inputs, nothing_to_do
from pipeline.job.progress import Progress, ProgressReporter, format_duration
from pipeline.job.stages import RowIdentity
from pipeline.spec import JobSpec
from pipeline.store.fs import (env_seconds, os_error_text, probe_writable, resolve,
                               storage_retry_s, write_bytes_atomic)
from pipeline.store.lease import Lease, LeaseLost, acquire_lease
from pipeline.store.output import (DATA_DIR, PROGRESS_FILE, RUNS_DIR, STATE_DIR, OutputMetadata,
                                   data_files, foreign_files, schema_with_metadata)
from pipeline.store.reconcile import clean_tmp, drop_replaced_rows, remove_identity_rows
from pipeline.store.sources import (InputError, InputPlan, must_list_something, no_inputs_error,
                                    plan_inputs)

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 20
"""Ray Data's target block size for a job. A stage's output leaves its task in blocks of
about this size, so listing and manifest tasks hand over their (image_id, uri) rows every
~10,000 rows while they go on listing (a larger size holds the first rows back until a
task ends: the time to the first image would grow with the listing). Decoded images
travel one or a few per block; the stages after decoding bundle whole batches (`Feed`),
so no per-image task is paid."""
SHARD_ROWS = 2_000_000
"""About this many done ids per shard writer (their memory: ~100 bytes an id)."""


@dataclass
class RunResult:
    run_id: str
    output: str
    state: str
    inputs: int
    skipped: int
    to_label: int
    ok: int = 0
    errors: int = 0
    files: list[str] = field(default_factory=list)
    files_committed: int = 0  # known from progress when the run did not finish
    duplicates: int = 0  # input rows dropped: an earlier row had their image id (one row kept)
    startup_s: float = 0.0
    label_s: float = 0.0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    exit_code: int = EXIT_OK

    def summary(self) -> str:
        """One line: counts, then the one images/s figure (images labelled over labelling
        time), with start-up apart."""
        labelled = self.ok + self.errors
        if self.state == "finished" and not (self.to_label or labelled):
            return (f"finished: nothing to label, {self.ok} ok, {self.errors} errors, {self.skipped} "
                    f"already labelled (of {self.inputs} inputs) in {format_duration(self.wall_s)}; "
                    f"output: {self.output}")
        if self.state == "interrupted" and not (self.to_label or labelled):
            return f"interrupted while starting, before any image was labelled; output: {self.output}"
        if self.state == "interrupted":
            counts = (f"interrupted: {self.ok} ok, {self.errors} errors committed, "
                      f"{max(self.to_label - labelled, 0)} of the {self.to_label} images listed "
                      f"so far not; {self.skipped} were already labelled")
        else:
            counts = (f"{self.state}: {self.ok} ok, {self.errors} errors, {self.skipped} already "
                      f"labelled (of {self.inputs} inputs)")
        return (f"{counts}; {labelled} images in {format_duration(self.label_s)} of labelling "
                f"({self.images_per_s:.1f} images/s) after {format_duration(self.startup_s)} of "
                f"start-up; output: {self.output}")


class RunInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped a run; `result` holds what it committed (its rows stay,
    and rerunning the same command labels the rest)."""

    def __init__(self, result: RunResult, stopped_by: BaseException) -> None:
        super().__init__(f"{result.summary()}; rerun the same command to label the rest")
        self.result = result
        self.exit_code = stop_exit_code(stopped_by) or self.exit_code


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


# -- fail-fast checks ---------------------------------------------------------------------
def check_output(output: str) -> None:
    """OUTPUT must be a directory we can write, or not exist yet: its data and state folders
    are probed now (under names no other run uses), not found read-only at the first commit."""
    fs, root = resolve(output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise JobError(f"OUTPUT {output} is a file; give a directory (it is created if missing)")
    for folder in (DATA_DIR, STATE_DIR):
        try:
            probe_writable(output, folder)
        except OSError as exc:
            raise JobError(f"OUTPUT {output} is not writable: {os_error_text(exc)}") from None


# -- Ray ------------------------------------------------------------------------------------
# What Ray's C++ logger prints on the driver's stderr when it starts and finds
# RAY_BACKEND_LOG_LEVEL (set by the CLI to hide its error-level notices): one INFO line,
# whatever the level asked for.
RAY_LEVEL_NOTICE = "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"


@contextlib.contextmanager
def held_stderr(drop: str):
    """Hold back what is written to file descriptor 2 (C++ code included) while the block
    runs, then pass it on without the lines that contain `drop`. Does nothing when stderr
    has no file descriptor (a test's captured stream)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", errors="replace")
            kept = "".join(line for line in text.splitlines(True) if drop not in line)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def ensure_ray(address: str | None) -> bool:
    """Connect to ADDRESS (or RAY_ADDRESS), else start an embedded local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    # Never credentials: Ray writes a runtime_env to its logs. Workers of an embedded Ray
    # inherit this process's environment (AWS_* included); a cluster's workers take theirs
    # from the cluster (service account, secret mounts: docs/clusters.md).
    # Emulator and mirror endpoints are addresses, not secrets; they reach a cluster's workers.
    env_vars = {k: v for k, v in os.environ.items()
                if k.startswith("DRN_LABEL_") or k in ("STORAGE_EMULATOR_HOST", "HF_ENDPOINT")}
    # Predict actors share the CPUs with decode and write tasks: idle OpenMP threads must
    # sleep, not spin (spinning threads slowed CPU inference many times over under load).
    env_vars.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    # The CLI asks for ERROR unless -v (DRN_LABEL_RAY_LOG_LEVEL): at WARNING, ray.init prints
    # its start-up notices (token authentication) on every run.
    level = logging.getLevelName(os.environ.get("DRN_LABEL_RAY_LOG_LEVEL", "WARNING").upper())
    level = level if isinstance(level, int) else logging.WARNING
    # ray.init replaces SIGTERM's handler (sys.exit(15), under a C++ one that aborts the
    # process if it is not gone within seconds); a caller's own (the CLI's: stop like
    # Ctrl-C, commit what the writers hold, exit 143) is put back afterwards.
    import signal
    import threading

    own_sigterm = (signal.getsignal(signal.SIGTERM)
                   if threading.current_thread() is threading.main_thread() else None)
    quiet = held_stderr(RAY_LEVEL_NOTICE) if os.environ.get("RAY_BACKEND_LOG_LEVEL") else contextlib.nullcontext()
    if address:
        with quiet:
            ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=False,
                     logging_level=level)
    else:
        # An embedded Ray's workers inherit this environment (the DRN_LABEL_* and endpoint
        # variables are already in it); without a runtime_env they are the workers Ray
        # starts with the node, not new ones started for the job.
        os.environ.setdefault("OMP_WAIT_POLICY", env_vars["OMP_WAIT_POLICY"])
        full = ray_temp_full()
        if full:  # Ray would wait half a minute for files it cannot write, then fail
            raise JobError(f"cannot start a local Ray: {full}")
        try:
            with quiet:
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                         logging_level=level)
        except Exception as exc:  # noqa: BLE001 - Ray's start-up failures are its internals' tracebacks
            raise JobError(f"cannot start a local Ray: {ray_start_failure(exc)}") from None
    if callable(own_sigterm):
        signal.signal(signal.SIGTERM, own_sigterm)
    return True


def ray_temp_full() -> str | None:
    """Why Ray's temp folder (RAY_TMPDIR, else the system's) cannot hold a local Ray's
    session (its logs, sockets and spilled objects), or None: under 64 MiB free."""
    import shutil
    import tempfile

    temp = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    try:
        free = shutil.disk_usage(temp).free
    except OSError:
        return None
    if free >= 64 << 20:
        return None
    return (f"its temp folder {temp} has {free >> 20} MiB free; free some space there, or point "
            "RAY_TMPDIR at a disk that has some")


def ray_start_failure(exc: BaseException) -> str:
    """Why a local Ray did not start, in one line (a disk that filled meanwhile, else the
    last line of Ray's own message)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return ray_temp_full() or (lines[-1][:300] if lines else type(exc).__name__)


def cluster_size() -> dict[str, float]:
    """The Ray cluster this process is connected to: its CPUs and GPUs, its live nodes with
    CPUs, and the CPUs of the smallest of them (`JobSpec.resolved`'s arguments)."""
    import ray

    resources = ray.cluster_resources()
    per_node = [float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    per_node = [c for c in per_node if c > 0] or [float(resources.get("CPU", 1))]
    return {"cpus": float(resources.get("CPU", 1)), "gpus": float(resources.get("GPU", 0)),
            "nodes": len(per_node), "node_cpus": min(per_node)}


def actor_pool(spec: JobSpec):
    """A fixed pool of N predict actors, or one that Ray Data grows from MIN to MAX actors
    while batches queue for them (``--workers MIN-MAX``) and shrinks when they idle."""
    from ray.data import ActorPoolStrategy

    low, high = spec.worker_range()
    if low == high:
        return ActorPoolStrategy(size=low)
    return ActorPoolStrategy(min_size=low, max_size=high)


def shard_count(spec: JobSpec, existing_files: int) -> int:
    """Shard writers for a run: one per four predict workers (commit throughput), and
    enough that no shard's done set exceeds about SHARD_ROWS ids (estimated from the
    number of data files, without reading them)."""
    by_workers = -(-spec.worker_range()[1] // 4)
    by_rows = -(-existing_files * spec.rows_per_file // SHARD_ROWS)
    return max(1, min(256, max(by_workers, by_rows)))


@dataclass(frozen=True)
class Feed:
    """How the stages of a run are sized, from the spec and the cluster (`feed_for`).

    Images a decode task reads is one forward batch, so decoding spreads over the cores
    a batch at a time (rows are re-cut after the skip stage: a listing block of thousands
    of rows would otherwise be decoded by one task, one image after another). A predict
    call takes `batches_per_call` forward batches: on a GPU, two, so that the copies and
    host work of one overlap the other's compute (drn.predictor's pipeline). Encoding and
    handing rows to the shard writers takes a predict call's rows per task."""

    decode_rows: int
    decode_memory: int  # bytes a decode task reserves: its images at --max-side, RGB
    call_rows: int  # images per predict call
    encode_tasks: int  # encode + hand-over tasks at once

    def describe(self) -> str:
        return (f"{self.decode_rows} images per decode task, {self.call_rows} per predict call, "
                f"{self.encode_tasks} encode tasks")


def feed_for(spec: JobSpec, cluster_cpus: float) -> Feed:
    """The `Feed` of a run whose auto values are resolved, on a cluster of that many CPUs."""
    batch = int(spec.batch_size)
    on_gpu = spec.gpus_per_worker > 0
    call_rows = batch * (2 if on_gpu else 1)
    decode_rows = max(4, min(batch, 64))
    workers = spec.worker_range()[1]
    return Feed(decode_rows=decode_rows,
                decode_memory=decode_rows * spec.max_side * spec.max_side * 3,
                call_rows=call_rows,
                encode_tasks=max(2 * workers, int(cluster_cpus) // 4, 2))


def build_dataset(spec: JobSpec, plan: InputPlan, meta: OutputMetadata, run_id: str,
                  writers: list, counter=None, feed: Feed | None = None):
    """input -> skip done -> decode -> predict -> encode (not executed)."""
    from ray.data import TaskPoolStrategy

    from pipeline.job.commit import skip_done
    from pipeline.job.plan import input_dataset, plan_map_args, rebundle
    from pipeline.job.stages import PredictActor, decode_batch, encode_batch

    spec = spec.resolved(cpus=2, gpus=0) if feed is None else spec  # tests call it directly
    feed = feed or feed_for(spec, cluster_cpus=2)
    ds = input_dataset(plan)
    ds = ds.map_batches(skip_done, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"writers": writers, "counter": counter}, **plan_map_args())
    ds = rebundle(ds, feed.decode_rows)
    # Ray fuses consecutive stages whose resources match; on a CPU-only cluster that would
    # run decoding inside the predict actors, in series with the model. Decode tasks
    # reserve the memory their block of images takes, which also keeps them a separate
    # stage on purpose, so that decoding overlaps prediction.
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=feed.decode_rows,
                        num_cpus=spec.decode_cpus, memory=feed.decode_memory,
                        fn_kwargs={"max_side": spec.max_side, "retries": spec.retries,
                                   "max_bytes": spec.max_bytes, "max_pixels": spec.max_pixels,
                                   "allow_private_urls": spec.allow_private_urls})
    ds = ds.map_batches(PredictActor, batch_format="pyarrow", batch_size=feed.call_rows,
                        compute=actor_pool(spec),
                        fn_constructor_args=(spec, counter), num_cpus=spec.cpus_per_worker,
                        num_gpus=spec.gpus_per_worker or None)
    identity = RowIdentity(model=meta.model, weights_sha256=meta.weights_sha256, run_id=run_id,
                           num_classes=meta.num_classes, png_compression=spec.png_compression)
    # Encoding and handing rows to the shard writers reserve no CPU: labelled rows must
    # never wait behind decode tasks for a core (they would pile up uncommitted). Without a
    # CPU to bound them, a cap keeps pace (each task is one PNG encode per row and a
    # hand-over) without a worker process per waiting block.
    ds = ds.map_batches(encode_batch, batch_format="pyarrow", batch_size=feed.call_rows,
                        num_cpus=0, compute=TaskPoolStrategy(size=feed.encode_tasks),
                        fn_kwargs={"identity": identity})
    return ds


# -- the job --------------------------------------------------------------------------------
def run_job(spec: JobSpec, *, echo: Callable[[str], None] | None = None,
            stream: TextIO | None = None,
            show: Callable[[Progress, bool], None] | None = None) -> RunResult:
    """Run one labelling job to completion. Raises JobError for what cannot start.

    The live progress line goes to `stream` (stderr); `show(progress, final)`, when
    given, is called instead (the demo draws one bar for all its steps)."""
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    spec = _absolute(spec.validate())
    t_start = time.time()
    run_id = new_run_id()

    check_output(spec.output)
    try:
        plan = plan_inputs(spec.input)
    except (ValueError, OSError) as exc:
        raise JobError(str(exc)) from None
    check_inputs(plan)  # an empty folder says so now, not after Ray has started
    _warn_of_foreign_files(spec.output, echo)
    meta = describe_model(spec)
    if meta.weights_sha256.startswith("init"):
        echo(f"warning: {spec.model} has no weights (random initialisation): labels will be "
             f"meaningless; pass --weights")
    idle = nothing_to_do(spec, plan, spec.output, meta)  # a rerun of a finished job: no Ray
    if idle is not None:
        echo(f"nothing to do: {spec.input} lists no images" if not idle.inputs else
             f"nothing to do: the {idle.inputs} images {spec.input} lists already have rows of "
             f"{meta.model} ({meta.weights_sha256[:12]}) in {spec.output} (--retry-errors "
             f"relabels error rows, --overwrite everything)")
        return RunResult(run_id=run_id, output=spec.output, state="finished", inputs=idle.inputs,
                         skipped=idle.inputs, to_label=0, wall_s=time.time() - t_start)
    lease = acquire_lease(spec.output, run_id)
    try:
        # The heartbeat runs from the moment the lease is held: the scan of existing rows
        # and --overwrite rewrites come after, and may take longer than the lease lasts.
        with lease.keeper():
            return LeasedRun(RunContext(spec=spec, meta=meta, plan=plan, run_id=run_id,
                                        output=spec.output, t_start=t_start, echo=echo,
                                        stream=stream, show=show, lease=lease)).run()
    finally:
        lease.release()


def _absolute(spec: JobSpec) -> JobSpec:
    """OUTPUT, weights and classes as absolute paths: predict actors may run in another
    working directory."""
    output = spec.output.rstrip("/") if "://" in spec.output else os.path.abspath(spec.output)
    spec = spec.replace(output=output)
    for key in ("weights", "classes"):
        value = getattr(spec, key)
        if value and "://" not in value and os.path.isfile(value):
            spec = spec.replace(**{key: os.path.abspath(value)})
    return spec


def _warn_of_foreign_files(output: str, echo: Callable[[str], None]) -> None:
    foreign = foreign_files(output)
    if foreign:
        shown = ", ".join(f[len(resolve(output)[1]):].lstrip("/") for f in foreign[:3])
        echo(f"warning: OUTPUT {output} holds {len(foreign)} Parquet file(s) drn-label did not "
             f"write there ({shown}{', ...' if len(foreign) > 3 else ''}): they are left alone "
             "and never read as labels")


@dataclass(frozen=True)
class RunContext:
    """What a leased run works from (all fixed before the lease is taken)."""

    spec: JobSpec
    meta: OutputMetadata
    plan: InputPlan
    run_id: str
    output: str
    t_start: float
    echo: Callable[[str], None]
    stream: TextIO | None
    show: Callable[[Progress, bool], None] | None
    lease: Lease


class LeasedRun:
    """One run while it holds OUTPUT's lease, phase by phase: prepare OUTPUT, start the
    workers (Ray, the progress counter, the shard writers with their done sets), label
    (the Ray Data graph), collect what the writers committed, reconcile, and close (the
    progress line, the run record)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.spec = ctx.spec  # with its `auto` values resolved once Ray is up
        self.result = RunResult(run_id=ctx.run_id, output=ctx.output, state="running",
                                inputs=0, skipped=0, to_label=0)
        self.progress = Progress(run_id=ctx.run_id, output=ctx.output)
        self.reporter: ProgressReporter | None = None
        self.counter = None  # the progress counter actor
        self.writers: list = []  # the shard writer actors
        self.schema: pa.Schema | None = None
        self.feed: Feed | None = None
        self.t_label = time.time()  # set again when labelling starts
        self.stall = StallAlarm()

    def run(self) -> RunResult:
        state, stopped_by, stalled = "failed", None, None
        try:
            self.prepare_output()
            self.start_workers()
            with self.stall:  # labelling is watched; reconciling may take long on its own
                self.label()
                shard_results = self.collect()
            self.reconcile(shard_results)
            state = "finished"
        except Stalled as exc:  # the writers still commit what they hold
            stalled = exc
        except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (a SystemExit)
            if stop_exit_code(exc) is None:
                state = "interrupted"
                raise
            state, stopped_by = "interrupted", exc
        finally:
            self.close(state, stopped=stopped_by is not None or stalled is not None)
        if stopped_by is not None:
            raise RunInterrupted(self.result, stopped_by) from None
        if stalled is not None:
            raise JobError(self.stalled_error(stalled.seconds)) from None
        result, spec = self.result, self.spec
        labelled = result.ok + result.errors
        if spec.max_error_rate is not None and labelled and result.errors / labelled > spec.max_error_rate:
            result.exit_code = EXIT_ERROR_RATE
        return result

    # -- phases ----------------------------------------------------------------------------
    def prepare_output(self) -> None:
        """Remove part files of killed runs, apply --overwrite, write the first run record."""
        ctx = self.ctx
        clean_tmp(ctx.output)
        if self.spec.overwrite:
            dropped = remove_identity_rows(ctx.output, ctx.meta)
            if dropped:
                ctx.echo(f"--overwrite: removed {dropped} rows of {ctx.meta.model} "
                         f"({ctx.meta.weights_sha256[:12]})")
        self.write_record()
        ctx.echo(f"run {ctx.run_id}: labelling {self.spec.input} with {ctx.meta.model} (inputs "
                 f"are listed as the run goes; images already labelled are skipped)")

    def start_workers(self) -> None:
        """Ray, the progress counter, and the shard writers holding the done sets."""
        import ray
        from ray.data import DataContext

        from pipeline.job.commit import COMMIT_INTERVAL_S, load_done_set, start_shard_writers
        from pipeline.job.progress import start_counter_actor

        ctx = self.ctx
        ensure_ray(self.spec.address)
        size = cluster_size()
        cpus, gpus, nodes = size["cpus"], size["gpus"], int(size["nodes"])
        self.spec = ctx.spec.resolved(**size)
        self.feed = feed_for(self.spec, cpus)
        chosen = self.spec.chosen(ctx.spec)
        if chosen:
            on = f" on {nodes} nodes" if nodes > 1 else ""
            ctx.echo(f"auto for {cpus:g} CPUs, {gpus:g} GPUs{on}: {chosen}")
        data_ctx = DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.print_on_execution_start = False
        data_ctx.target_max_block_size = BLOCK_BYTES
        self.counter = start_counter_actor()
        # Resume: the done set is read by Ray tasks, one piece per shard, never here.
        files = data_files(ctx.output)
        shards = shard_count(self.spec, len(files))
        skip_status = ("ok",) if self.spec.retry_errors else ("ok", "error")
        done_refs = load_done_set(ctx.output, files, ctx.meta, shards, skip_status)
        self.schema = schema_with_metadata(ctx.meta)
        self.writers = start_shard_writers(
            shards, output=ctx.output, run_id=ctx.run_id, generation=ctx.lease.generation,
            schema=self.schema, rows_per_file=self.spec.rows_per_file,
            commit_interval_s=COMMIT_INTERVAL_S, done_refs=done_refs, skip_status=skip_status,
            counter=self.counter)
        self.result.startup_s = time.time() - ctx.t_start
        self.t_label = time.time()
        counter = self.counter
        self.reporter = ProgressReporter(
            self.progress, lambda: ray.get(counter.snapshot.remote(), timeout=10),
            save=self.save_progress, stream=ctx.stream, show=ctx.show,
            stall_s=self.stall.after_s(), on_stall=self.stall.ring).start()

    def label(self) -> None:
        """Run the Ray Data graph to its end; a lost lease, bad input and storage that kept
        failing become JobErrors."""
        from pipeline.job.sink import LabelDatasink

        ctx = self.ctx
        sink = LabelDatasink(self.writers, self.schema)
        error = None
        try:
            build_dataset(self.spec, ctx.plan, ctx.meta, ctx.run_id, self.writers,
                          self.counter, self.feed).write_datasink(sink, ray_remote_args={"num_cpus": 0})
        except Exception as exc:  # noqa: BLE001 - a lost lease, bad input, storage are translated
            error = self.translated(exc)
            if error is None:
                raise
        if error is not None:
            # Raised here, not in the except block: Ray's error would stay chained to ours,
            # and its traceback holds the executor and with it the predict actors, which a
            # caller that keeps the error (one process running run after run) never gets back.
            raise error
        self.result.label_s = time.time() - self.t_label

    def translated(self, exc: Exception) -> JobError | None:
        """The JobError a lost lease, bad input or storage that kept failing becomes; None
        for anything else."""
        import ray

        from pipeline.job.commit import uncommitted_error

        ctx = self.ctx
        lost = _find_cause(exc, LeaseLost)
        if lost is not None:
            return _lost(ctx, str(lost).split(":")[0])
        bad = _find_cause(exc, InputError)
        if bad is not None:
            return JobError(str(bad))
        storage = _find_cause(exc, StorageError)
        if storage is not None:
            snap = ray.get(self.counter.snapshot.remote(), timeout=30)
            return uncommitted_error(str(storage), snap["committed_ok"], snap["committed_errors"],
                                     snap["committed_files"])
        return None

    def collect(self) -> list:
        """The writers commit what they still hold; count what was committed. Returns the
        writers' ShardResults."""
        import ray

        from pipeline.job.commit import uncommitted_error

        ctx, result = self.ctx, self.result
        shard_results = ray.get([w.finish.remote() for w in self.writers])
        snap = ray.get(self.counter.snapshot.remote())
        result.inputs, result.skipped = snap["listed"], snap["skipped"]
        result.to_label = result.inputs - result.skipped
        committed = [f for r in shard_results for f in r.files]
        result.files = [f.file for f in committed]
        result.ok = sum(f.ok for f in committed)
        result.errors = sum(f.errors for f in committed)
        lost = next((r.lost for r in shard_results if r.lost), None) or ctx.lease.lost
        if lost is not None:
            raise _lost(ctx, lost.split(":")[0])
        uncommitted = sum(r.uncommitted for r in shard_results)
        if uncommitted:  # rows the writers accepted and could not commit: never a success
            failed = next((r.failed for r in shard_results if r.failed), None)
            raise uncommitted_error(failed or f"OUTPUT {ctx.output}: labelled rows were not committed",
                                    result.ok, result.errors, len(result.files), uncommitted)
        if result.inputs == 0 and must_list_something(ctx.plan):
            raise JobError(str(no_inputs_error(ctx.plan)))
        repeated = result.duplicates = sum(r.repeated for r in shard_results)
        if repeated:
            ctx.echo(f"warning: input {self.spec.input}: {repeated} rows repeated the image_id of "
                     f"another row; one row of each image_id was labelled and kept, the first "
                     f"(give each row its own image_id)")
        return shard_results

    def reconcile(self, shard_results: list) -> None:
        """One row per image: --retry-errors replaces error rows, and an earlier run may
        have been killed between writing such rows and removing the ones they replace."""
        ctx = self.ctx
        if ctx.lease.lost or not ctx.lease.renew():  # lost after the last commit: touch nothing
            raise _lost(ctx, ctx.lease.lost or f"run {ctx.run_id} lost the lease on OUTPUT {ctx.output}")
        if self.spec.retry_errors or any(r.existing_duplicates for r in shard_results):
            replaced = drop_replaced_rows(ctx.output, ctx.meta)
            if replaced:
                ctx.echo(f"removed {replaced} rows that newer rows of {ctx.meta.model} replace")
        clean_tmp(ctx.output)

    def close(self, state: str, *, stopped: bool = False) -> None:
        """Final progress, the Ray actors stopped, the run record (unless the lease was lost).
        A run stopped by Ctrl-C or SIGTERM first has its writers commit what they hold."""
        import ray

        result = self.result
        stopped_files = _stop_writers(self.writers) if stopped else None
        if self.reporter is not None:
            if state != "finished":
                result.label_s = time.time() - self.t_label
            final = self.reporter.finish(state, label_s=result.label_s)
            if state != "finished":  # the writers never reported back: count what was committed
                result.ok, result.errors = final.committed_ok, final.committed_errors
                result.files_committed = final.committed_files
                result.skipped, result.to_label = final.skipped, final.total
                result.inputs = final.skipped + final.total
            if stopped_files is not None:  # exactly what the writers committed
                result.files = [f.file for f in stopped_files]
                result.ok = sum(f.ok for f in stopped_files)
                result.errors = sum(f.errors for f in stopped_files)
            # One images/s figure, labelled images over labelling time: the last line of the
            # bar, the summary and the run record agree.
            result.images_per_s = final.images_per_s
        else:
            self.progress.state = state
            self.save_progress(self.progress)
        for actor in [self.counter, *self.writers]:
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001
                    pass
        if state != "finished":
            # A failed graph leaves its executor in reference cycles (Ray's error and its
            # traceback) that hold the predict actors and their CPUs and GPUs: free them now,
            # so that a next run in this process gets the cluster back.
            gc.collect()
        result.state = state
        result.wall_s = time.time() - self.ctx.t_start
        if not self.ctx.lease.lost:  # a run that lost the lease writes nothing more into OUTPUT
            try:
                self.write_record()
            except OSError as exc:  # the storage failure itself is what the run reports
                self.ctx.echo(f"warning: cannot write the run record {RUNS_DIR}/"
                              f"{self.ctx.run_id}.json: {os_error_text(exc)}")

    def stalled_error(self, seconds: float) -> str:
        import ray

        result, size = self.result, ""
        try:
            free, total = ray.available_resources(), ray.cluster_resources()
            size = (f"; the Ray cluster now has {len([n for n in ray.nodes() if n.get('Alive')])} "
                    f"live nodes, {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs and "
                    f"{free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPUs free")
        except Exception:  # noqa: BLE001 - the message stands without the figures
            pass
        return (f"no image was listed, labelled or committed for {seconds:.0f} s: the run's "
                f"Ray workers are stuck (a node lost with one of them on it, or --workers/"
                f"--cpus-per-worker/--gpus-per-worker asking for more than the cluster "
                f"holds){size}. OUTPUT {self.ctx.output} holds {result.ok + result.errors} rows "
                f"of this run ({result.ok} ok, {result.errors} errors); rerun the same command "
                f"once the cluster has room (nothing is labelled twice). {STALL_ENV} sets this "
                f"wait in seconds (0: wait for ever)")

    # -- records -----------------------------------------------------------------------------
    def save_progress(self, progress: Progress) -> None:
        write_bytes_atomic(self.ctx.output, PROGRESS_FILE, progress.to_json().encode())

    def write_record(self) -> None:
        record = _record(self.spec, self.ctx.meta, self.result, self.ctx.t_start)
        write_bytes_atomic(self.ctx.output, f"{RUNS_DIR}/{self.ctx.run_id}.json",
                           json.dumps(record, indent=2).encode())


def _lost(ctx: RunContext, why: str) -> JobError:
    return JobError(f"{why}; it committed nothing after losing it and leaves the rest to the "
                    f"run that holds the lease")


STALL_S = 900.0
"""How long a run waits with nothing listed, labelled or committed before it ends itself."""
STALL_ENV = "DRN_LABEL_STALL_S"


class Stalled(BaseException):
    """Raised in the main thread when a run's counts stood still for the stall time (a
    BaseException, so that no `except Exception` on the way swallows it, like Ctrl-C)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no progress for {seconds:.0f} s")
        self.seconds = seconds


class StallAlarm:
    """Ends a stalled run from the progress thread: `ring` makes the main thread raise
    Stalled wherever it waits (a Ray Data loop, a `ray.get`). The signal is simulated
    (`_thread.interrupt_main(SIGUSR1)`), never sent, and only while the alarm is armed (while
    the run labels, in the main thread); outside the main thread a run waits as before."""

    def __init__(self) -> None:
        self.armed, self.seconds, self._old = False, 0.0, None

    @staticmethod
    def after_s() -> float | None:
        """`DRN_LABEL_STALL_S` (default 900 s; 0 turns the alarm off), at least a minute
        more than storage writes are retried (a writer waiting on a full disk is not a stall)."""
        seconds = env_seconds(STALL_ENV, STALL_S)
        return None if seconds <= 0 else max(seconds, storage_retry_s() + 60.0)

    def __enter__(self) -> "StallAlarm":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGUSR1, self._raise)
            self.armed = True
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self.armed = False
        if self._old is not None:
            signal.signal(signal.SIGUSR1, self._old)
            self._old = None

    def ring(self, seconds: float) -> None:
        import _thread
        import signal

        self.seconds = seconds
        if self.armed:
            _thread.interrupt_main(signal.SIGUSR1)

    def _raise(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise Stalled(self.seconds)


STOP_COMMIT_S = 10.0
"""How long a stopped run (Ctrl-C, SIGTERM) waits for its writers to commit what they hold."""


def _stop_writers(writers: list) -> list | None:
    """Commit what the shard writers hold, then end them, so a stopped run keeps every row
    it labelled and can say exactly what it committed; None when they could not answer
    (the caller then counts from the progress actor)."""
    if not writers:  # stopped before they started (and perhaps before Ray did)
        return None
    import ray

    try:
        results = ray.get([w.finish.remote() for w in writers], timeout=STOP_COMMIT_S)
    except Exception:  # noqa: BLE001 - Ray itself was stopped, or a writer died
        results = None
    for writer in writers:
        try:
            ray.kill(writer)
        except Exception:  # noqa: BLE001
            pass
    return None if results is None else [f for r in results for f in r.files]


def _find_cause(exc: BaseException, cls: type) -> BaseException | None:
    """`exc` or the exception it wraps (Ray's task errors, chained causes) of type `cls`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc) is cls:
            return exc
        wrapped = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(wrapped, cls):
            return wrapped
        exc = exc.__cause__ or exc.__context__ or wrapped
    return None


def _record(spec: JobSpec, meta: OutputMetadata, result: RunResult, t_start: float) -> dict:
    import ray
    import torch

    return {
        "run_id": result.run_id,
        "state": result.state,
        "spec": spec.to_toml_dict(),
        "model": {"arch": meta.model, "weights": meta.weights,
                  "weights_sha256": meta.weights_sha256, "num_classes": meta.num_classes},
        "counts": {"inputs": result.inputs, "skipped_existing": result.skipped,
                   "to_label": result.to_label, "ok": result.ok, "errors": result.errors,
                   "duplicates": result.duplicates,
                   "files": max(len(result.files), result.files_committed)},
        "timings": {"started_at": datetime.fromtimestamp(t_start, timezone.utc).isoformat(),
                    # Unrounded: the progress bar and the summary print these very figures,
                    # and a rounded copy can print differently (8.1496 -> 8.1s, 8.150 -> 8.2s).
                    "wall_s": round(result.wall_s, 3), "startup_s": result.startup_s,
                    "label_s": result.label_s, "images_per_s": result.images_per_s},
        "files": result.files,
        "host": socket.gethostname(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": ray.__version__, "pyarrow": pa.__version__},
    }
