"""run_job(spec): list -> skip what is done -> decode -> predict -> encode -> commit.

The driver plans (how INPUT is listed, which of OUTPUT's files hold done rows), takes the
lease, and wires Ray Data stages; listing, the done set, the masks and the commits never
pass through it (pipeline.job.plan, pipeline.job.commit), so its memory and the time to
the first image do not grow with the number of inputs.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, TextIO

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import EXIT_ERROR_RATE, EXIT_OK, JobError, StorageError
from pipeline.job.progress import Progress, ProgressReporter
from pipeline.job.stages import ModelSpec, RowIdentity
from pipeline.spec import JobSpec
from pipeline.store.fs import os_error_text, probe_writable, resolve, write_bytes_atomic
from pipeline.store.lease import Lease, LeaseLost, acquire_lease
from pipeline.store.output import (DATA_DIR, PROBS_STRIDE, PROGRESS_FILE, RUNS_DIR, STATE_DIR,
                                   OutputMetadata, data_files, foreign_files, schema_with_metadata)
from pipeline.store.reconcile import clean_tmp, drop_replaced_rows, remove_identity_rows
from pipeline.store.sources import InputError, InputPlan, no_inputs_error, plan_inputs

log = logging.getLogger(__name__)

INPUT_BLOCK_ROWS = 16
"""Images a decode call reads and decodes at a time."""
BLOCK_BYTES = 64 << 10
"""Ray Data's target block size for a job. Blocks of (image_id, uri) rows are cut at this
size (about a thousand rows), so a large manifest or listing becomes many blocks that
decode tasks share; decoded pixels leave a decode task every 64 KiB (one image, unless
images are tiny), so the first image reaches the model at once whatever N is, and a
predict actor's task holds a batch or two, not hundreds of labelled rows."""
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
        return (f"{self.state}: {self.ok} ok, {self.errors} errors, {self.skipped} already labelled "
                f"(of {self.inputs} inputs) in {self.wall_s:.1f}s "
                f"({self.images_per_s:.1f} img/s); output: {self.output}")


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


def describe_model(spec: JobSpec):
    """Build the model once on the driver: bad weights or classes fail here, before any image."""
    import drn

    from pipeline.store.weights import local_weights

    weights = local_weights(spec.weights)  # s3://, gs://, hf:// -> a cached local file
    try:
        model = drn.create_model(spec.model, weights=weights, classes=spec.classes,
                                 num_classes=spec.num_classes, task="segment")
    except Exception as exc:
        # The library speaks Python; the CLI user needs the option to change.
        message = re.sub(r"use create_model\('([\w]+)', \.\.\.\)", r"use --model \1", str(exc))
        raise JobError(f"cannot build model {spec.model}"
                       f"{' from ' + spec.weights if spec.weights else ''}: {message}") from None
    cfg = model.drn_config
    del model
    return OutputMetadata.from_model(spec.model, spec.weights, cfg)


# -- Ray ------------------------------------------------------------------------------------
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
    if address:
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
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     logging_level=level)
        except Exception as exc:  # noqa: BLE001 - Ray's start-up failures are its internals' tracebacks
            raise JobError(f"cannot start a local Ray: {ray_start_failure(exc)}") from None
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


def default_torch_threads(spec: JobSpec) -> int | None:
    """On CPU, give each predict actor the cores decoding does not need (Ray's default is 1)."""
    if spec.torch_threads:
        return spec.torch_threads
    if spec.gpus_per_worker > 0:
        return None
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // spec.worker_range()[1])  # the most actors that may share them


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


def build_dataset(spec: JobSpec, plan: InputPlan, meta: OutputMetadata, run_id: str,
                  writers: list, progress=None):
    """input -> skip done -> 16-row blocks -> decode -> predict -> encode (not executed)."""

    from pipeline.job.commit import skip_done
    from pipeline.job.plan import input_dataset, plan_map_args
    from pipeline.job.stages import PredictActor, decode_batch, encode_batch

    ds = input_dataset(plan)
    ds = ds.map_batches(skip_done, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"writers": writers, "progress": progress}, **plan_map_args())
    # Ray fuses consecutive stages whose resources match; on a CPU-only cluster that would
    # run decoding inside the predict actors, in series with the model. Decode tasks
    # reserve the memory a block of the largest images takes, which also keeps them a
    # separate stage on purpose, so that decoding overlaps prediction.
    decode_memory = INPUT_BLOCK_ROWS * spec.max_side * spec.max_side * 3 * 2
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=INPUT_BLOCK_ROWS,
                        num_cpus=spec.decode_cpus, memory=decode_memory,
                        fn_kwargs={"max_side": spec.max_side, "retries": spec.retries,
                                   "max_bytes": spec.max_bytes, "max_pixels": spec.max_pixels})
    model_spec = ModelSpec(model=spec.model, weights=spec.weights, classes=spec.classes,
                           num_classes=spec.num_classes, precision=spec.precision,
                           batch_size=spec.batch_size, torch_threads=default_torch_threads(spec),
                           size_bucket=spec.size_bucket,
                           tta_scales=spec.tta_scales if spec.tta else None,
                           tta_flip=spec.tta and spec.tta_flip,
                           probs_stride=PROBS_STRIDE if spec.save_probs else None)
    ds = ds.map_batches(PredictActor, batch_format="pyarrow", batch_size=spec.batch_size,
                        compute=actor_pool(spec),
                        fn_constructor_args=(model_spec, progress), num_cpus=spec.cpus_per_worker,
                        num_gpus=spec.gpus_per_worker or None)
    identity = RowIdentity(model=meta.model, weights_sha256=meta.weights_sha256, run_id=run_id,
                           num_classes=meta.num_classes, png_compression=spec.png_compression)
    # Encoding and handing rows to the shard writers reserve no CPU: labelled rows must
    # never wait behind decode tasks for a core (they would pile up uncommitted). Without a
    # CPU to bound them, two tasks per predict worker keep pace (each is one PNG encode per
    # row and a hand-over) without a worker process per waiting block.
    from ray.data import TaskPoolStrategy

    ds = ds.map_batches(encode_batch, batch_format="pyarrow", batch_size=None, num_cpus=0,
                        compute=TaskPoolStrategy(size=2 * spec.worker_range()[1]),
                        fn_kwargs={"identity": identity})
    return ds


# -- the job --------------------------------------------------------------------------------
def run_job(spec: JobSpec, *, echo: Callable[[str], None] | None = None,
            stream: TextIO | None = None) -> RunResult:
    """Run one labelling job to completion. Raises JobError for what cannot start."""
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    spec = spec.validate()
    t_start = time.time()
    output = spec.output.rstrip("/") if "://" in spec.output else os.path.abspath(spec.output)
    spec = spec.replace(output=output)
    for key in ("weights", "classes"):  # predict actors may run in another working directory
        value = getattr(spec, key)
        if value and "://" not in value and os.path.isfile(value):
            spec = spec.replace(**{key: os.path.abspath(value)})
    run_id = new_run_id()

    check_output(output)
    foreign = foreign_files(output)
    if foreign:
        shown = ", ".join(f[len(resolve(output)[1]):].lstrip("/") for f in foreign[:3])
        echo(f"warning: OUTPUT {output} holds {len(foreign)} Parquet file(s) drn-label did not "
             f"write there ({shown}{', ...' if len(foreign) > 3 else ''}): they are left alone "
             "and never read as labels")
    meta = describe_model(spec)
    if meta.weights_sha256.startswith("init"):
        echo(f"warning: {spec.model} has no weights (random initialisation): labels will be "
             f"meaningless; pass --weights")
    try:
        plan = plan_inputs(spec.input)
    except (ValueError, OSError) as exc:
        raise JobError(str(exc)) from None
    lease = acquire_lease(output, run_id)
    try:
        # The heartbeat runs from the moment the lease is held: the scan of existing rows
        # and --overwrite rewrites come after, and may take longer than the lease lasts.
        with lease.keeper():
            return _run_leased(RunContext(spec=spec, meta=meta, plan=plan, run_id=run_id,
                                          output=output, t_start=t_start, echo=echo,
                                          stream=stream, lease=lease))
    finally:
        lease.release()


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
    lease: Lease


def _lost(ctx: RunContext, why: str) -> JobError:
    return JobError(f"{why}; it committed nothing after losing it and leaves the rest to the "
                    f"run that holds the lease")


def _run_leased(ctx: RunContext) -> RunResult:
    import ray

    spec, meta, plan, run_id, output = ctx.spec, ctx.meta, ctx.plan, ctx.run_id, ctx.output
    t_start, echo, stream = ctx.t_start, ctx.echo, ctx.stream

    clean_tmp(output)
    if spec.overwrite:
        dropped = remove_identity_rows(output, meta)
        if dropped:
            echo(f"--overwrite: removed {dropped} rows of {meta.model} ({meta.weights_sha256[:12]})")
    result = RunResult(run_id=run_id, output=output, state="running", inputs=0, skipped=0,
                       to_label=0)
    write_bytes_atomic(output, f"{RUNS_DIR}/{run_id}.json",
                       json.dumps(_record(spec, meta, result, t_start), indent=2).encode())
    echo(f"run {run_id}: labelling {spec.input} with {meta.model} (inputs are listed as the "
         f"run goes; images already labelled are skipped)")
    progress = Progress(run_id=run_id, output=output)
    save = lambda p: write_bytes_atomic(output, PROGRESS_FILE, p.to_json().encode())  # noqa: E731
    state = "failed"
    reporter = counter = None
    writers: list = []
    try:
        ensure_ray(spec.address)
        from ray.data import DataContext

        from pipeline.job.commit import (COMMIT_INTERVAL_S, load_done_set, start_shard_writers,
                                         uncommitted_error)
        from pipeline.job.progress import start_counter_actor
        from pipeline.job.sink import LabelDatasink

        data_ctx = DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.print_on_execution_start = False
        data_ctx.target_max_block_size = BLOCK_BYTES
        counter = start_counter_actor()
        # Resume: the done set is read by Ray tasks, one piece per shard, never here.
        files = data_files(output)
        shards = shard_count(spec, len(files))
        done_refs = load_done_set(output, files, meta, shards)
        schema = schema_with_metadata(meta)
        writers = start_shard_writers(
            shards, output=output, run_id=run_id, generation=ctx.lease.generation,
            schema=schema, rows_per_file=spec.rows_per_file, commit_interval_s=COMMIT_INTERVAL_S,
            done_refs=done_refs, skip_status=("ok",) if spec.retry_errors else ("ok", "error"),
            progress=counter)
        del files, done_refs
        result.startup_s = time.time() - t_start
        reporter = ProgressReporter(progress, lambda: ray.get(counter.snapshot.remote(), timeout=10),
                                    save=save, stream=stream).start()
        t_label = time.time()
        sink = LabelDatasink(writers, schema)
        try:
            build_dataset(spec, plan, meta, run_id, writers, counter).write_datasink(
                sink, ray_remote_args={"num_cpus": 0})
        except Exception as exc:  # noqa: BLE001 - a lost lease, bad input, storage are translated
            for cls in (LeaseLost, InputError):
                cause = _find_cause(exc, cls)
                if cause is not None:
                    raise (_lost(ctx, str(cause).split(":")[0]) if cls is LeaseLost
                           else JobError(str(cause))) from None
            cause = _find_cause(exc, StorageError)
            if cause is not None:
                snap = ray.get(counter.snapshot.remote(), timeout=30)
                raise uncommitted_error(str(cause), snap["committed_ok"], snap["committed_errors"],
                                        snap["committed_files"]) from None
            raise
        shard_results = ray.get([w.finish.remote() for w in writers])
        result.label_s = time.time() - t_label
        snap = ray.get(counter.snapshot.remote())
        result.inputs, result.skipped = snap["listed"], snap["skipped"]
        result.to_label = result.inputs - result.skipped
        files_written = [f for r in shard_results for f in r["files"]]
        result.files = [f["file"] for f in files_written]
        result.ok = sum(f["ok"] for f in files_written)
        result.errors = sum(f["errors"] for f in files_written)
        lost = next((r["lost"] for r in shard_results if r["lost"]), None) or ctx.lease.lost
        if lost is not None:
            raise _lost(ctx, lost.split(":")[0])
        uncommitted = sum(r["uncommitted"] for r in shard_results)
        if uncommitted:  # rows the writers accepted and could not commit: never a success
            failed = next((r["failed"] for r in shard_results if r["failed"]), None)
            raise uncommitted_error(failed or f"OUTPUT {output}: labelled rows were not committed",
                                    result.ok, result.errors, len(result.files), uncommitted)
        if result.inputs == 0 and plan.kind in ("directory", "glob", "shards"):
            raise JobError(str(no_inputs_error(plan)))
        repeated = result.duplicates = sum(r["repeated"] for r in shard_results)
        if repeated:
            echo(f"warning: input {spec.input}: {repeated} rows repeated the image_id of another "
                 f"row; one row of each image_id was labelled and kept, the first (give each row "
                 f"its own image_id)")
        if ctx.lease.lost or not ctx.lease.renew():  # lost after the last commit: touch nothing
            raise _lost(ctx, ctx.lease.lost or f"run {run_id} lost the lease on OUTPUT {output}")
        # Rows to reconcile: --retry-errors replaces error rows, and an earlier run may have
        # been killed between writing such rows and removing the ones they replace.
        if spec.retry_errors or any(r["existing_duplicates"] for r in shard_results):
            replaced = drop_replaced_rows(output, meta)
            if replaced:
                echo(f"removed {replaced} rows that newer rows of {meta.model} replace")
        clean_tmp(output)
        state = "finished"
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or `drn-label stop` (SIGTERM -> SystemExit)
        state = "interrupted"
        raise
    finally:
        if reporter is not None:
            final = reporter.finish(state)
            if state != "finished":  # the sink never reported back: count what was committed
                result.ok, result.errors = final.committed_ok, final.committed_errors
                result.files_committed = final.committed_files
            # One images/s figure: the progress line's (since the first labelled image),
            # so the summary and the last line of the bar agree.
            result.images_per_s = final.images_per_s
        else:
            progress.state = state
            save(progress)
        for actor in [counter, *writers]:
            if actor is not None:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001
                    pass
        result.state = state
        result.wall_s = time.time() - t_start
        if not ctx.lease.lost:  # a run that lost the lease writes nothing more into OUTPUT
            try:
                write_bytes_atomic(output, f"{RUNS_DIR}/{run_id}.json",
                                   json.dumps(_record(spec, meta, result, t_start), indent=2).encode())
            except OSError as exc:  # the storage failure itself is what the run reports
                echo(f"warning: cannot write the run record {RUNS_DIR}/{run_id}.json: {os_error_text(exc)}")
    labelled = result.ok + result.errors
    if spec.max_error_rate is not None and labelled and result.errors / labelled > spec.max_error_rate:
        result.exit_code = EXIT_ERROR_RATE
    return result


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
                    "wall_s": round(result.wall_s, 3), "startup_s": round(result.startup_s, 3),
                    "label_s": round(result.label_s, 3),
                    "images_per_s": round(result.images_per_s, 3)},
        "files": result.files,
        "host": socket.gethostname(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": ray.__version__, "pyarrow": pa.__version__},
    }
