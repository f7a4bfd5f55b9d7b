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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import EXIT_ERROR_RATE, EXIT_OK, JobError
from pipeline.job.progress import Progress, ProgressReporter
from pipeline.job.stages import ModelSpec, RowIdentity
from pipeline.spec import JobSpec
from pipeline.store.fs import resolve, write_bytes_atomic
from pipeline.store.lease import (LeaseLost, acquire_lease, heartbeat_lease, lease_holder,
                                  release_lease)
from pipeline.store.output import (PROBS_STRIDE, PROGRESS_FILE, RUNS_DIR, OutputMetadata, foreign_files,
                                   schema_with_metadata)
from pipeline.store.reconcile import (clean_tmp, drop_replaced_rows, existing_rows, has_duplicates,
                                      remove_identity_rows)
from pipeline.store.sources import list_inputs

log = logging.getLogger(__name__)

INPUT_BLOCK_ROWS = 16


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
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("DRN_LABEL_")}
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
                  progress=None):
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.job.stages import PredictActor, decode_batch, encode_batch

    chunks = [todo.slice(i, INPUT_BLOCK_ROWS) for i in range(0, todo.num_rows, INPUT_BLOCK_ROWS)]
    ds = ray.data.from_arrow(chunks)
    # Ray fuses consecutive stages whose resources match; on a CPU-only cluster that would
    # run decoding inside the predict actors, in series with the model. Decode tasks
    # reserve the memory a block of the largest images takes, which also keeps them a
    # separate stage on purpose, so that decoding overlaps prediction.
    decode_memory = INPUT_BLOCK_ROWS * spec.max_side * spec.max_side * 3 * 2
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=None,
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
                        compute=ActorPoolStrategy(size=spec.workers),
                        fn_constructor_args=(model_spec, progress), num_cpus=spec.cpus_per_worker,
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
        inputs = list_inputs(spec.input)
    except (ValueError, OSError) as exc:
        raise JobError(str(exc)) from None
    acquire_lease(output, run_id)
    try:
        return _run_leased(RunContext(spec=spec, meta=meta, inputs=inputs, run_id=run_id,
                                      output=output, t_start=t_start, echo=echo, stream=stream))
    finally:
        release_lease(output, run_id)


@dataclass(frozen=True)
class RunContext:
    """What a leased run works from (all fixed before the lease is taken)."""

    spec: JobSpec
    meta: OutputMetadata
    inputs: pa.Table
    run_id: str
    output: str
    t_start: float
    echo: Callable[[str], None]
    stream: TextIO | None


def _run_leased(ctx: RunContext) -> RunResult:
    import ray

    spec, meta, inputs, run_id, output = ctx.spec, ctx.meta, ctx.inputs, ctx.run_id, ctx.output
    t_start, echo, stream = ctx.t_start, ctx.echo, ctx.stream

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

            from pipeline.job.progress import start_counter_actor
            from pipeline.job.sink import LabelDatasink

            data_ctx = DataContext.get_current()
            data_ctx.enable_progress_bars = False
            data_ctx.print_on_execution_start = False
            counter = start_counter_actor()
            result.startup_s = time.time() - t_start
            reporter = ProgressReporter(progress, lambda: ray.get(counter.snapshot.remote(), timeout=10),
                                        save=save, stream=stream,
                                        heartbeat=lambda: heartbeat_lease(output, run_id)).start()
            sink = LabelDatasink(output, run_id=run_id, schema=schema_with_metadata(meta),
                                 rows_per_file=spec.rows_per_file, progress=counter)
            t_label = time.time()
            try:
                build_dataset(spec, todo, meta, run_id, counter).write_datasink(sink)
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
            final = reporter.finish(state)
            if state != "finished":  # the sink never reported back: count what was committed
                result.ok, result.errors = final.committed_ok, final.committed_errors
                result.files_committed = final.committed_files
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
