"""Job specs: one frozen dataclass that `run`, `submit` and scheduled runs share.

A TOML file in jobs/ holds the same keys as `drn-label run`'s options (dashes or
underscores), plus an optional ``[schedule]`` table. Flags given on the command line
override the file. A bad key or value is a `SpecError` naming the key and the file.
Relative paths in the file (input, output, weights, classes) are relative to the file,
so a spec means the same from any working directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from drn.errors import Spelling
from pipeline.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTO = "auto"
GPU_SHARE = 0.5
"""A GPU's share per predict actor when `gpus_per_worker` is auto: two actors per GPU, so
that one's host work (arguments, results) overlaps the other's compute."""
MAX_CPU_WORKERS = 32
"""At most this many predict actors when `workers` is auto on CPUs (one per core)."""
SCHEDULE_KINDS = ("raycronjob", "rayjob", "cronjob")


def flag(name: str) -> str:
    """The command-line flag of a JobSpec key (`num_classes` -> `--num-classes`)."""
    return "--" + name.replace("_", "-")


FLAGS = Spelling(argument=flag, setting=lambda name, value: f"{flag(name)} {value}",
                 listing={"models": "`drn-label models`", "weights": "`drn-label models`"})
"""drn's messages in the terms of `run`'s flags (see drn.errors)."""


class SpecError(UsageError):
    """A job spec that cannot run; the message names the key and the file."""


def worker_range(value: int | str) -> tuple[int, int]:
    """(min, max) predict actors of `workers`: N (a fixed pool) or "MIN-MAX" (a pool that
    Ray Data grows from MIN to MAX actors while there is work queued for them)."""
    if value == AUTO:
        raise ValueError("workers is auto: resolve the spec for a cluster first (JobSpec.resolved)")
    if isinstance(value, bool):
        raise ValueError(f"must be a number of workers or MIN-MAX, got {value!r}")
    if isinstance(value, int):
        low = high = value
    else:
        text = str(value).strip()
        low_text, dash, high_text = text.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if dash else low
        except ValueError:
            raise ValueError(f"must be a number (4) or a range MIN-MAX (2-8), got {value!r}") from None
    if low < 1:
        raise ValueError(f"must be at least 1, got {low}")
    if high < low:
        raise ValueError(f"MAX must be at least MIN, got {value!r}")
    return low, high


def canonical_workers(value: int | str) -> int | str:
    """`workers` as stored: "auto", an int for a fixed pool, "MIN-MAX" for an autoscaling one."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    low, high = worker_range(value)
    return low if low == high else f"{low}-{high}"


def auto_or(kind: type, *, low: float, open_low: bool = False) -> Callable[[Any], Any]:
    """A parse for a numeric key that also takes "auto" (chosen from the cluster at run time)."""
    def parse(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if isinstance(value, bool):
            raise ValueError(f"must be a number or auto, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number or auto, got {value!r}") from None
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError(f"must be a whole number or auto, got {value!r}")
        if number < low or (open_low and number == low):
            raise ValueError(f"must be {'>' if open_low else 'at least'} {low:g} or auto, got {value!r}")
        return number
    return parse


def check_cron(value: str) -> None:
    """Raise ValueError unless `value` is a five-field cron expression (or a macro such as
    @daily) that Kubernetes CronJobs and KubeRay RayCronJobs accept."""
    from croniter import croniter

    text = value.strip()
    macros = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
    if text.startswith("@"):
        if text not in macros:
            raise ValueError(f"{value!r} is not a cron macro (one of {', '.join(macros)})")
        return
    if len(text.split()) != 5 or not croniter.is_valid(text):
        raise ValueError(f"{value!r} is not a cron expression; give five fields "
                         "(minute hour day-of-month month day-of-week), e.g. \"0 2 * * *\"")


def check_time_zone(value: str) -> None:
    """Raise ValueError unless `value` is an IANA time zone name (e.g. Europe/Berlin)."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone; give a name such as UTC or "
                         "Europe/Berlin") from None


def key(default: Any = None, help: str = "", *, min: float | None = None,  # noqa: A002
        max: float | None = None, min_open: bool = False, choices: tuple[str, ...] = (),
        cli: bool = True, default_factory: Any = None,
        parse: Callable[[Any], Any] | None = None, metavar: str | None = None) -> Any:
    """A JobSpec field with what the TOML reader, `validate` and the CLI need to know.

    `help` is the option's help text (`cli=False`: a TOML-only key); `min`/`max` (with
    `min_open` for "greater than") and `choices` are checked by `validate` and become
    the option's click type, so a bound is written once. `parse` turns a value written in
    TOML or on the command line into the field's canonical value, raising ValueError
    with the reason (the CLI and `validate` both call it); `metavar` names the option's
    value in --help.
    """
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "choices": choices,
            "cli": cli, "parse": parse, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _checked(check: Callable[[str], None]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        check(value)
        return value
    return parse


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str | None = key(None, parse=_checked(check_cron))
    time_zone: str = key("UTC", parse=_checked(check_time_zone))
    image: str = "drn-label:latest"
    kind: str = key("raycronjob", choices=SCHEDULE_KINDS)
    # Address of a long-lived cluster, for kind = "cronjob" (submit from a pod).
    address: str | None = None
    namespace: str = "default"
    name: str | None = None

    parse_cron = staticmethod(_checked(check_cron))
    parse_time_zone = staticmethod(_checked(check_time_zone))


@dataclass(frozen=True)
class JobSpec:
    """Everything one labelling run needs. Small and picklable: it crosses to workers.

    Each field is a TOML key and (unless `cli=False`) an option of `run` and `submit`.
    """

    input: str | None = key(help="", cli=False)
    output: str | None = key(help="", cli=False)
    model: str = key("drn_d_22", "Architecture, see `drn-label models`.")
    weights: str | None = key(None, "Checkpoint: a path, an http(s)://, s3://, gs:// or hf:// URL, "
                                    "or a released name such as drn_d_22:cityscapes (`drn-label "
                                    "models` lists them).")
    classes: str | None = key(None, "Label set: a preset (cityscapes) or a classes file.")
    num_classes: int | None = key(None, "Number of classes when neither weights nor --classes tell it.",
                                  min=1)
    batch_size: int | str = key(AUTO, "Images per forward pass; auto: 16 on a GPU (fewer when "
                                      "the device's free memory needs it), 4 on CPUs.",
                                parse=auto_or(int, low=1), metavar="N|auto")
    workers: int | str = key(AUTO, "Predict actors: N, MIN-MAX for a pool that grows from MIN "
                                   "to MAX actors while work is queued, or auto: every GPU of "
                                   "the cluster (two actors each), else one actor per CPU core.",
                             parse=canonical_workers, metavar="N|MIN-MAX|auto")
    gpus_per_worker: float | str = key(AUTO, "GPUs per predict actor; fractions share a GPU; "
                                             "auto: 0.5 when the cluster has GPUs, else 0.",
                                       parse=auto_or(float, low=0), metavar="N|auto")
    cpus_per_worker: float | str = key(AUTO, "CPUs reserved per predict actor; auto: 1 on GPUs, "
                                             "else the CPUs decoding leaves, shared.",
                                       parse=auto_or(float, low=0, open_low=True),
                                       metavar="N|auto")
    torch_threads: int | None = key(None, "Torch threads per predict actor [default: on CPU, "
                                          "cluster CPUs / workers].", min=1)
    decode_cpus: float = key(1.0, "CPUs per decode task.", min=0, min_open=True, cli=False)
    max_side: int = key(2048, "Scale larger images down for inference; masks come back at "
                              "source size.", min=8)
    size_bucket: int | None = key(None, "Pad images to multiples of this many pixels so mixed "
                                        "sizes batch together (labels may change near the "
                                        "bottom/right edges) [default: exact sizes].", min=8)
    # test-time augmentation: mean log-probabilities over scales (+ flip)
    tta: bool = key(False, "Test-time augmentation: average log-probabilities over --tta-scales "
                           "(slower, better labels).")
    tta_scales: tuple[float, ...] = key((0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                                        "Comma-separated scales for --tta.", min=0, min_open=True)
    tta_flip: bool = key(False, "With --tta, also average a horizontal flip.")
    save_probs: bool = key(False, "Also store per-pixel class probabilities in the probs column "
                                  "(uint8, averaged over 8 x 8 pixel blocks; docs/output.md).")
    precision: str = key(AUTO, "Inference precision; auto: bf16 on a GPU (fp16 where it has no "
                               "bf16), fp32 on CPUs.", choices=PRECISIONS)
    stand_in: bool = key(False, "Replace the model by a stand-in that costs nothing (zero "
                                "logits): shows how fast the pipeline alone feeds a model; rows "
                                "are labelled as model `stand-in`.")
    retries: int = key(3, "Retries of transient read failures per image.", min=0)
    max_bytes: int = key(256 << 20, "Largest image file read, in bytes; larger files become error rows.",
                         min=1)
    max_pixels: int = key(100_000_000, "Largest image decoded (width x height, read from the header "
                                       "before decoding); larger ones become error rows.", min=64)
    allow_private_urls: bool = key(False, "Also fetch http(s) URLs whose host is a loopback, "
                                          "link-local or private address (refused by default, on "
                                          "every redirect hop too).")
    max_error_rate: float | None = key(None, "Exit 3 when the share of error rows exceeds this.",
                                       min=0, max=1)
    rows_per_file: int = key(1000, "Rows per Parquet file.", min=1)
    png_compression: int = key(4, "PNG level of the masks (measured: docs/benchmarks.md).",
                               min=0, max=9, cli=False)
    overwrite: bool = key(False, "Relabel everything this model already labelled.")
    retry_errors: bool = key(False, "Relabel images whose row is an error.")
    address: str | None = key(None, "Ray cluster address (RAY_ADDRESS); `run` without one starts "
                                    "an embedded local Ray.")
    schedule: ScheduleSpec = key(default_factory=ScheduleSpec, cli=False)
    source: str | None = field(default=None, metadata={"cli": False, "toml": False})  # the TOML file, for messages

    def worker_range(self) -> tuple[int, int]:
        """(min, max) predict actors (equal for a fixed pool)."""
        return worker_range(self.workers)

    def resolved(self, *, cpus: float, gpus: float, nodes: int = 1,
                 node_cpus: float | None = None) -> "JobSpec":
        """The spec with its auto values chosen for a cluster of `cpus` CPUs and `gpus` GPUs
        on `nodes` nodes, the smallest with `node_cpus` CPUs: on GPUs, two actors per GPU,
        batch 16, bf16; on CPUs, one single-threaded actor per core (up to
        MAX_CPU_WORKERS), sharing the CPUs that one decode task leaves on each node, batch 4,
        fp32. Values that were given are kept."""
        nodes = max(1, int(nodes))
        node_cpus = cpus / nodes if node_cpus is None else node_cpus
        gpus_per_worker = self.gpus_per_worker
        if gpus_per_worker == AUTO:
            gpus_per_worker = GPU_SHARE if gpus >= 1 else 0.0
        on_gpu = gpus_per_worker > 0
        workers = self.workers
        if workers == AUTO:
            workers = (max(1, int(gpus / gpus_per_worker + 1e-9)) if on_gpu
                       else max(1, min(int(cpus), MAX_CPU_WORKERS)))
        most = worker_range(workers)[1]
        decode_cpus = min(self.decode_cpus, max(node_cpus / 2, 0.1))
        # Actors spread over the nodes; each node must keep room for a decode task, or a
        # node full of actors starves them (the smallest node bounds the share).
        per_node = -(-most // nodes)
        cpus_per_worker = self.cpus_per_worker
        if cpus_per_worker == AUTO:
            cpus_per_worker = 1.0 if on_gpu else round(max(min(
                (cpus - decode_cpus * nodes) / most, (node_cpus - decode_cpus) / per_node), 0.1), 3)
        torch_threads = self.torch_threads
        if torch_threads is None and not on_gpu:
            torch_threads = max(1, int(node_cpus // per_node))
        return self.replace(
            gpus_per_worker=gpus_per_worker, workers=workers, cpus_per_worker=cpus_per_worker,
            decode_cpus=decode_cpus, torch_threads=torch_threads,
            batch_size=(16 if on_gpu else 4) if self.batch_size == AUTO else self.batch_size,
            precision=("bf16" if on_gpu else "fp32") if self.precision == AUTO else self.precision)

    def chosen(self, given: "JobSpec") -> str:
        """What this resolved spec chose where `given` said auto, for the run's summary."""
        parts = []
        for name in ("workers", "gpus_per_worker", "cpus_per_worker", "batch_size", "precision"):
            if getattr(given, name) == AUTO:
                value = getattr(self, name)
                parts.append(f"{flag(name)} {value:g}" if isinstance(value, float) else
                             f"{flag(name)} {value}")
        return ", ".join(parts)

    def replace(self, **changes: Any) -> "JobSpec":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "JobSpec":
        where = f" in {self.source}" if self.source else ""

        def bad(key: str, msg: str) -> SpecError:
            return SpecError(f"{key}{where}: {msg}")

        # INPUT and OUTPUT are the command's arguments or the spec's keys: say both.
        for name in ("input", "output"):
            if not getattr(self, name):
                spec_file = f"in {self.source}" if self.source else "of a --job spec"
                raise SpecError(f"{name.upper()} is missing: give it on the command line "
                                f"(INPUT OUTPUT) or as `{name} = \"...\"` {spec_file}")
        for prefix, obj in (("", self), ("schedule.", self.schedule)):
            for f in fields(obj):
                value = getattr(obj, f.name)
                problem = _out_of_bounds(f, value)
                if problem is None and f.metadata.get("parse") and value is not None:
                    try:
                        f.metadata["parse"](value)
                    except ValueError as exc:
                        problem = str(exc)
                if problem:
                    raise bad(prefix + f.name, problem)
        if self.overwrite and self.retry_errors:
            keys = f" (overwrite, retry_errors in {self.source})" if self.source else ""
            raise SpecError(f"--overwrite and --retry-errors{keys} cannot be combined: "
                            "--overwrite relabels every image, error rows included")
        return self

    def to_toml_dict(self) -> dict[str, Any]:
        """The spec as TOML-ready values (None left out), for job records and manifests."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("source", "schedule"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[f.name] = value
        sched = {k: v for k, v in dataclasses.asdict(self.schedule).items() if v is not None}
        out["schedule"] = sched
        return out


def _out_of_bounds(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for field `f` (its min/max/choices), or None."""
    meta = f.metadata
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}, got {value!r}"
    values = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and not value:
        return "must not be empty"
    if isinstance(value, str):
        return None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        low, high = meta.get("min"), meta.get("max")
        if low is not None and (v <= low if meta.get("min_open") else v < low):
            if isinstance(value, tuple):
                return f"must be positive numbers, got {list(value)}" if low == 0 else \
                    f"must be > {low:g}, got {list(value)}"
            if meta.get("min_open"):
                return f"must be > {low:g}, got {v}"
            return f"must be at least {low:g}, got {v}" if low >= 1 else f"must be >= {low:g}, got {v}"
        if high is not None and v > high:
            if low is not None:
                return f"must be between {low:g} and {high:g}, got {v}"
            return f"must be at most {high:g}, got {v}"
    return None


def toml_types_of(annotation: Any) -> tuple[type, ...]:
    """The TOML value types a field's annotation accepts (ints for floats, lists for tuples)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if union else [annotation]
    if len(args) > 1:  # e.g. workers: int | str
        return tuple(t for a in args for t in toml_types_of(a))
    base = typing.get_origin(args[0]) or args[0]
    if base is tuple:
        return (list,)
    if base is float:
        return (int, float)
    return (base,)


def toml_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Field name -> accepted TOML types, derived from the dataclass annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: toml_types_of(hints[f.name]) for f in fields(cls)
            if f.metadata.get("toml", True) and not dataclasses.is_dataclass(hints[f.name])}


def cli_fields() -> list[dataclasses.Field]:
    """JobSpec fields that are options of `run` and `submit`, in declaration order."""
    return [f for f in fields(JobSpec) if f.metadata.get("cli", True)]


def _check(table: Mapping[str, Any], types: dict[str, tuple[type, ...]], prefix: str,
           source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        name = f"{prefix}{raw_key}"
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise SpecError(f"{source}: unknown key {name!r}{hint}")
        want = types[key]
        ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
        if not ok:
            names = " or ".join(t.__name__ for t in want)
            raise SpecError(
                f"{source}: key {name!r} must be {names}, got {type(value).__name__} {value!r}"
            )
        if float in want and isinstance(value, int):
            value = float(value)
        if list in want:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise SpecError(f"{source}: key {name!r} must be a list of numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        out[key] = value
    return out


PATH_KEYS = ("input", "output")
"""Keys that are always a path or a URI."""
NAMED_PATH_KEYS = ("weights", "classes")
"""Keys that are a path or a name (a released checkpoint, a label-set preset): a bare name
with no folder in it stays a name unless a file of that name sits beside the spec."""


def relative_to_spec(folder: Path, key: str, value: str | None) -> str | None:
    """`value` of path key `key` as written in a spec in `folder`: a relative local path
    joined onto the spec's folder; URIs, absolute paths and names unchanged."""
    if not value or "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if key in NAMED_PATH_KEYS and "/" not in value and not (folder / value).exists():
        return value
    return os.path.normpath(folder / path)


def load_spec(path: str | Path) -> JobSpec:
    """Read a TOML job spec. Relative paths in it (input, output, weights, classes) are
    relative to the spec file's folder, not to the current one."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{source}: job spec not found") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    schedule_table = data.pop("schedule", {})
    if not isinstance(schedule_table, dict):
        raise SpecError(f"{source}: key 'schedule' must be a table ([schedule])")
    values = _check(data, toml_types(JobSpec), "", source)
    folder = path.absolute().parent
    for key in (*PATH_KEYS, *NAMED_PATH_KEYS):
        if key in values:
            values[key] = relative_to_spec(folder, key, values[key])
    sched = _check(schedule_table, toml_types(ScheduleSpec), "schedule.", source)
    spec = JobSpec(**values, schedule=ScheduleSpec(**sched), source=source)
    # Choices are checked as the file is read (bounds wait for `validate`, after overrides).
    for prefix, obj in (("", spec), ("schedule.", spec.schedule)):
        for f in fields(obj):
            if f.metadata.get("choices") and getattr(obj, f.name) not in f.metadata["choices"]:
                raise SpecError(f"{source}: key '{prefix}{f.name}' {_out_of_bounds(f, getattr(obj, f.name))}")
    return spec


def merge(spec: JobSpec, overrides: Mapping[str, Any]) -> JobSpec:
    """Apply command-line overrides (None means 'not given')."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    sched_changes = {k[len("schedule_"):]: changes.pop(k) for k in list(changes)
                     if k.startswith("schedule_")}
    if sched_changes:
        changes["schedule"] = dataclasses.replace(spec.schedule, **sched_changes)
    return dataclasses.replace(spec, **changes)
