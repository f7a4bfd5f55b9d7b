"""run_job(spec): list -> skip what is done -> decode -> predict -> encode -> Parquet.

The driver lists inputs, reads which image ids OUTPUT already holds for this model
identity, and then only wires Ray Data stages: the masks never pass through it.
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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.output import (LEASE_FILE, PROGRESS_FILE, RUNS_DIR, SCHEMA, OutputMetadata,
                             data_files, open_dataset, schema_with_metadata)
from pipeline.progress import Progress, ProgressReporter
from pipeline.sink import (TMP_DIR, LeaseLost, lease_holder, read_bytes_or_none,
                           write_bytes_atomic, write_table_atomic)
from pipeline.sources import list_inputs, resolve
from pipeline.spec import JobSpec
from pipeline.stages import ModelSpec, RowIdentity

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_ERROR_RATE, EXIT_LEASE = 0, 1, 3, 4
LEASE_TTL_S = 60.0
INPUT_BLOCK_ROWS = 16


class JobError(RuntimeError):
    """A job that cannot start or finish; the message says why and what to do."""

    exit_code = EXIT_FAILED


class LeaseHeld(JobError):
    exit_code = EXIT_LEASE


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
    startup_s: float = 0.0
    label_s: float = 0.0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    exit_code: int = EXIT_OK

    def summary(self) -> str:
        return (f"{self.state}: {self.ok} ok, {self.errors} errors, {self.skipped} already labelled "
                f"(of {self.inputs} inputs) in {self.wall_s:.1f}s "
                f"({self.images_per_s:.2f} images/s labelling); output: {self.output}")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


# -- fail-fast checks ---------------------------------------------------------------------
def check_output(output: str) -> None:
    """OUTPUT must be a directory we can write, or not exist yet."""
    fs, root = resolve(output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise JobError(f"OUTPUT {output} is a file; give a directory (it is created if missing)")
    try:
        fs.create_dir(root, recursive=True)
        write_bytes_atomic(output, "_write_check", b"ok")
        fs.delete_file(f"{root}/_write_check")
    except OSError as exc:
        raise JobError(f"OUTPUT {output} is not writable: {' '.join(str(exc).split())}") from None


def describe_model(spec: JobSpec):
    """Build the model once on the driver: bad weights or classes fail here, before any image."""
    import drn

    try:
        model = drn.create_model(spec.model, weights=spec.weights, classes=spec.classes,
                                 num_classes=spec.num_classes, task="segment")
    except Exception as exc:
        # The library speaks Python; the CLI user needs the option to change.
        message = re.sub(r"use create_model\('([\w]+)', \.\.\.\)", r"use --model \1", str(exc))
        raise JobError(f"cannot build model {spec.model}"
                       f"{' from ' + spec.weights if spec.weights else ''}: {message}") from None
    cfg = model.drn_config
    label_set = cfg.label_set
    n = cfg.num_classes
    if label_set is not None:
        classes, palette = tuple(label_set.class_names), tuple(tuple(c) for c in label_set.palette)
        mean, std, ignore = tuple(label_set.mean), tuple(label_set.std), label_set.ignore_index
    else:
        classes = tuple(f"class_{i}" for i in range(n))
        palette = tuple(default_palette(n))
        mean, std, ignore = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255
    meta = OutputMetadata(model=spec.model, weights=spec.weights, weights_sha256=cfg.weights_sha256,
                          num_classes=n, classes=classes, palette=palette, mean=mean, std=std,
                          ignore_index=ignore)
    del model
    return meta


def default_palette(n: int) -> list[tuple[int, int, int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n)]


# -- lease: one writer per OUTPUT ---------------------------------------------------------
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _holder_is_gone(lease: dict) -> bool:
    """Whether the lease was written by a process of this machine that no longer exists.

    Only a lease from this host and pid namespace can be checked; a pid that is alive but
    now belongs to a younger process (pid reuse) counts as gone. Anything else is assumed
    alive until its heartbeat expires.
    """
    pid = lease.get("pid")
    if (lease.get("host") != socket.gethostname() or lease.get("pid_ns") != _pid_namespace()
            or not isinstance(pid, int) or pid <= 0):
        return False
    started = _process_started(pid)
    if started is None:
        return True
    recorded = lease.get("pid_started")
    return isinstance(recorded, (int, float)) and abs(started - recorded) > 1.0


def acquire_lease(output: str, run_id: str) -> None:
    raw = read_bytes_or_none(output, LEASE_FILE)
    if raw:
        try:
            lease = json.loads(raw)
        except ValueError:
            lease = {}
        age = time.time() - float(lease.get("heartbeat", 0))
        holder = lease.get("run_id")
        gone = holder != run_id and age < LEASE_TTL_S and _holder_is_gone(lease)
        if holder != run_id and age < LEASE_TTL_S and not gone:
            raise LeaseHeld(
                f"OUTPUT {output} is being written by run {holder} "
                f"(host {lease.get('host')}, pid {lease.get('pid')}, last seen {age:.0f}s ago); "
                f"wait for it to finish (`drn-label status {output}`), or remove {LEASE_FILE} "
                f"if that run is dead (it expires {LEASE_TTL_S:.0f}s after its last heartbeat)")
        if gone:
            log.warning("taking over the lease of run %s: its process (pid %s on this host) "
                        "is gone", holder, lease.get("pid"))
        elif holder and holder != run_id:
            log.warning("taking over the expired lease of run %s", holder)
    renew_lease(output, run_id)
    # Last writer wins: read back after a moment so two simultaneous starters agree.
    time.sleep(0.2)
    holder = lease_holder(output)
    if holder != run_id:
        raise LeaseHeld(f"OUTPUT {output} was taken by run {holder} as this run started; "
                        f"wait for it to finish (`drn-label status {output}`)")


def renew_lease(output: str, run_id: str) -> None:
    lease = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
             "pid_ns": _pid_namespace(), "pid_started": _process_started(os.getpid()),
             "heartbeat": time.time()}
    write_bytes_atomic(output, LEASE_FILE, json.dumps(lease).encode())


def heartbeat_lease(output: str, run_id: str) -> None:
    """Keep this run's lease fresh, but never write over a lease another run has taken
    (the sink then refuses to commit, see `pipeline.sink.check_lease`)."""
    holder = lease_holder(output)
    if holder is not None and holder != run_id:
        log.error("run %s lost the lease on OUTPUT %s to run %s", run_id, output, holder)
        return
    renew_lease(output, run_id)


def release_lease(output: str, run_id: str) -> None:
    if lease_holder(output) == run_id:
        fs, root = resolve(output)
        fs.delete_file(f"{root}/{LEASE_FILE}")


# -- what is already done -----------------------------------------------------------------
def existing_rows(output: str, meta: OutputMetadata,
                  columns: tuple[str, ...] = ("image_id", "status", "run_id")) -> pa.Table:
    """`columns` of the committed rows with this model identity."""
    dataset = open_dataset(output)
    if dataset is None:
        return pa.table({c: pa.array([], SCHEMA.field(c).type) for c in columns})
    flt = (pc.field("model") == meta.model) & (pc.field("weights_sha256") == meta.weights_sha256)
    return dataset.to_table(columns=list(columns), filter=flt)


def has_duplicates(image_ids: pa.ChunkedArray) -> bool:
    return len(image_ids) > 0 and len(pc.unique(image_ids)) < len(image_ids)


def remove_identity_rows(output: str, meta: OutputMetadata) -> int:
    """--overwrite: drop every committed row of this model identity (file by file, atomically)."""
    return _rewrite_files(output, lambda t: pc.invert(
        pc.and_(pc.equal(t["model"], meta.model), pc.equal(t["weights_sha256"], meta.weights_sha256))))


def drop_replaced_rows(output: str, meta: OutputMetadata) -> int:
    """Keep one row per image of this model identity: an ok row over an error row, else
    the newest row. --retry-errors writes the new row beside the old error row and
    removes the old one here; a run killed before this step leaves both, and the next
    run finishes the job (`_run_leased` calls this whenever it finds duplicates)."""
    rows = existing_rows(output, meta, ("image_id", "status", "run_id", "labelled_at"))
    counts = pc.value_counts(rows["image_id"])
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return 0
    best: dict[str, tuple] = {}
    for row in rows.filter(pc.is_in(rows["image_id"], repeated)).to_pylist():
        rank = (row["status"] == "ok", row["labelled_at"], row["run_id"])
        if row["image_id"] not in best or rank > best[row["image_id"]]:
            best[row["image_id"]] = rank

    def keep(t: pa.Table):
        same = pc.and_(pc.equal(t["model"], meta.model), pc.equal(t["weights_sha256"], meta.weights_sha256))
        candidates = pc.and_(same, pc.is_in(t["image_id"], repeated)).to_pylist()
        mask = [True] * t.num_rows
        picked = t.select(["image_id", "status", "run_id", "labelled_at"]).to_pylist()
        for i, candidate in enumerate(candidates):
            if candidate:
                row = picked[i]
                mask[i] = (row["status"] == "ok", row["labelled_at"], row["run_id"]) == best[row["image_id"]]
        return pa.array(mask)

    return _rewrite_files(output, keep)


def _rewrite_files(output: str, keep: Callable[[pa.Table], pa.Array]) -> int:
    import pyarrow.parquet as pq

    fs, root = resolve(output)
    dropped = 0
    for path in data_files(output):
        table = pq.read_table(path, filesystem=fs)
        mask = keep(table)
        kept = table.filter(mask)
        if kept.num_rows == table.num_rows:
            continue
        dropped += table.num_rows - kept.num_rows
        name = path[len(root):].lstrip("/")
        if kept.num_rows == 0:
            fs.delete_file(path)
        else:
            write_table_atomic(output, name, kept.replace_schema_metadata(table.schema.metadata))
    return dropped


def clean_tmp(output: str) -> None:
    """Remove what killed writers left half-written (never visible to readers)."""
    fs, root = resolve(output)
    if fs.get_file_info(f"{root}/{TMP_DIR}").type == pafs.FileType.Directory:
        fs.delete_dir(f"{root}/{TMP_DIR}")


# -- Ray ------------------------------------------------------------------------------------
def ensure_ray(address: str | None) -> bool:
    """Connect to ADDRESS (or RAY_ADDRESS), else start an embedded local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "DRN_LABEL_"))}
    # Predict actors share the CPUs with decode and write tasks: idle OpenMP threads must
    # sleep, not spin (spinning threads slowed CPU inference many times over under load).
    env_vars.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env=runtime_env, logging_level=logging.WARNING)
    return True


def default_torch_threads(spec: JobSpec) -> int | None:
    """On CPU, give each predict actor the cores decoding does not need (Ray's default is 1)."""
    if spec.torch_threads:
        return spec.torch_threads
    if spec.gpus_per_worker > 0:
        return None
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // spec.workers)


def build_dataset(spec: JobSpec, todo: pa.Table, meta: OutputMetadata, run_id: str,
                  progress_actor: str | None):
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.stages import PredictActor, decode_batch, encode_batch

    chunks = [todo.slice(i, INPUT_BLOCK_ROWS) for i in range(0, todo.num_rows, INPUT_BLOCK_ROWS)]
    ds = ray.data.from_arrow(chunks)
    # Ray fuses consecutive stages whose resources match; on a CPU-only cluster that would
    # run decoding inside the predict actors, in series with the model. Decode tasks
    # reserve the memory a block of the largest images takes, which also keeps them a
    # separate stage on purpose, so that decoding overlaps prediction.
    decode_memory = INPUT_BLOCK_ROWS * spec.max_side * spec.max_side * 3 * 2
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None,
                        num_cpus=spec.decode_cpus, memory=decode_memory,
                        fn_kwargs={"max_side": spec.max_side, "retries": spec.retries})
    model_spec = ModelSpec(model=spec.model, weights=spec.weights, classes=spec.classes,
                           num_classes=spec.num_classes, precision=spec.precision,
                           batch_size=spec.batch_size, torch_threads=default_torch_threads(spec),
                           size_bucket=spec.size_bucket,
                           tta_scales=spec.tta_scales if spec.tta else None,
                           tta_flip=spec.tta and spec.tta_flip)
    ds = ds.map_batches(PredictActor, batch_format="pyarrow", batch_size=spec.batch_size,
                        compute=ActorPoolStrategy(size=spec.workers),
                        fn_constructor_args=(model_spec, progress_actor), num_cpus=spec.cpus_per_worker,
                        num_gpus=spec.gpus_per_worker or None)
    identity = RowIdentity(model=meta.model, weights_sha256=meta.weights_sha256, run_id=run_id,
                           num_classes=meta.num_classes, png_compression=spec.png_compression)
    ds = ds.map_batches(encode_batch, batch_format="pyarrow", batch_size=None,
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
    run_id = new_run_id()

    check_output(output)
    meta = describe_model(spec)
    if meta.weights_sha256.startswith("init"):
        echo(f"warning: {spec.model} has no weights (random initialisation): labels will be "
             f"meaningless; pass --weights")
    try:
        inputs = list_inputs(spec.input)
    except (ValueError, OSError) as exc:
        raise JobError(str(exc)) from None
    acquire_lease(output, run_id)
    try:
        return _run_leased(spec, meta, inputs, run_id, output, t_start, echo, stream)
    finally:
        release_lease(output, run_id)


def _run_leased(spec, meta, inputs, run_id, output, t_start, echo, stream) -> RunResult:
    import ray

    clean_tmp(output)
    if spec.overwrite:
        dropped = remove_identity_rows(output, meta)
        if dropped:
            echo(f"--overwrite: removed {dropped} rows of {meta.model} ({meta.weights_sha256[:12]})")
    done = existing_rows(output, meta)
    # Rows to reconcile: --retry-errors replaces error rows, and an earlier run may have
    # been killed between writing such rows and removing the ones they replace.
    reconcile = spec.retry_errors or has_duplicates(done["image_id"])
    skip_status = ["ok"] if spec.retry_errors else ["ok", "error"]
    done_ids = pc.filter(done["image_id"], pc.is_in(done["status"], pa.array(skip_status)))
    todo = inputs.filter(pc.invert(pc.is_in(inputs["image_id"], done_ids)))
    skipped = inputs.num_rows - todo.num_rows
    result = RunResult(run_id=run_id, output=output, state="running", inputs=inputs.num_rows,
                       skipped=skipped, to_label=todo.num_rows)
    record = _record(spec, meta, result, t_start)
    write_bytes_atomic(output, f"{RUNS_DIR}/{run_id}.json", json.dumps(record, indent=2).encode())
    echo(f"run {run_id}: {inputs.num_rows} inputs, {skipped} already labelled, "
         f"{todo.num_rows} to label with {meta.model}")

    progress = Progress(run_id=run_id, output=output, total=todo.num_rows, skipped=skipped)
    save = lambda p: write_bytes_atomic(output, PROGRESS_FILE, p.to_json().encode())  # noqa: E731
    state = "failed"
    reporter = None
    try:
        if todo.num_rows:
            started_ray = ensure_ray(spec.address)
            from ray.data import DataContext

            from pipeline.progress import start_counter_actor
            from pipeline.sink import make_datasink

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            actor_name = f"progress-{run_id}"
            counter = start_counter_actor(actor_name)
            result.startup_s = time.time() - t_start
            reporter = ProgressReporter(progress, lambda: ray.get(counter.snapshot.remote(), timeout=10),
                                        save=save, stream=stream,
                                        heartbeat=lambda: heartbeat_lease(output, run_id)).start()
            sink = make_datasink(output, run_id=run_id, schema=schema_with_metadata(meta),
                                 rows_per_file=spec.rows_per_file, progress_actor=actor_name)
            t_label = time.time()
            try:
                build_dataset(spec, todo, meta, run_id, actor_name).write_datasink(sink)
            except Exception as exc:  # noqa: BLE001 - only a lost lease is translated
                lost = _find_cause(exc, LeaseLost)
                if lost is None:
                    raise
                raise JobError(str(lost)) from None
            result.label_s = time.time() - t_label
            result.files = [f["file"] for f in sink.files]
            result.ok = sum(f["ok"] for f in sink.files)
            result.errors = sum(f["errors"] for f in sink.files)
            del started_ray
        holder = lease_holder(output)
        if holder not in (None, run_id):  # lost after its last commit: touch nothing more
            raise JobError(f"run {run_id} lost the lease on OUTPUT {output} to run {holder}; "
                           f"it leaves the rest to that run")
        if reconcile:
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
            reporter.finish(state)
            try:
                ray.kill(counter)
            except Exception:  # noqa: BLE001
                pass
        else:
            progress.state = state
            save(progress)
        result.state = state
        result.wall_s = time.time() - t_start
        result.images_per_s = (result.ok + result.errors) / result.label_s if result.label_s else 0.0
        write_bytes_atomic(output, f"{RUNS_DIR}/{run_id}.json",
                           json.dumps(_record(spec, meta, result, t_start), indent=2).encode())
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
                   "files": len(result.files)},
        "timings": {"started_at": datetime.fromtimestamp(t_start, timezone.utc).isoformat(),
                    "wall_s": round(result.wall_s, 3), "startup_s": round(result.startup_s, 3),
                    "label_s": round(result.label_s, 3),
                    "images_per_s": round(result.images_per_s, 3)},
        "files": result.files,
        "host": socket.gethostname(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "ray": ray.__version__, "pyarrow": pa.__version__},
    }
