"""Job specs: one frozen dataclass that `run`, `submit` and scheduled runs share.

A TOML file in jobs/ holds the same keys as `drn-label run`'s options (dashes or
underscores), plus an optional ``[schedule]`` table. Flags given on the command line
override the file. A bad key or value is a `SpecError` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULE_KINDS = ("raycronjob", "rayjob", "cronjob")


class SpecError(ValueError):
    """A job spec that cannot run; the message names the key and the file."""


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str | None = None
    time_zone: str = "UTC"
    image: str = "drn-label:latest"
    kind: str = "raycronjob"
    # Address of a long-lived cluster, for kind = "cronjob" (submit from a pod).
    address: str | None = None
    namespace: str = "default"
    name: str | None = None


@dataclass(frozen=True)
class JobSpec:
    """Everything one labelling run needs. Small and picklable: it crosses to workers."""

    input: str | None = None
    output: str | None = None
    model: str = "drn_d_22"
    weights: str | None = None
    classes: str | None = None
    num_classes: int | None = None
    batch_size: int = 4
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    decode_cpus: float = 1.0
    max_side: int = 2048
    size_bucket: int | None = None
    tta: bool = False  # test-time augmentation: mean log-probabilities over scales (+ flip)
    tta_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    tta_flip: bool = False
    precision: str = "fp32"
    retries: int = 3
    max_error_rate: float | None = None
    rows_per_file: int = 1000
    png_compression: int = 4  # measured: docs/benchmarks.md
    overwrite: bool = False
    retry_errors: bool = False
    address: str | None = None
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    source: str | None = None  # the TOML file this came from, for messages

    def replace(self, **changes: Any) -> "JobSpec":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "JobSpec":
        where = f" in {self.source}" if self.source else ""

        def bad(key: str, msg: str) -> SpecError:
            return SpecError(f"{key}{where}: {msg}")

        if not self.input:
            raise bad("input", "missing: give INPUT on the command line or `input = ...`")
        if not self.output:
            raise bad("output", "missing: give OUTPUT on the command line or `output = ...`")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.workers < 1:
            raise bad("workers", f"must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise bad("gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.decode_cpus <= 0:
            raise bad("decode_cpus", f"must be > 0, got {self.decode_cpus}")
        if self.max_side < 8:
            raise bad("max_side", f"must be at least 8, got {self.max_side}")
        if self.size_bucket is not None and self.size_bucket < 8:
            raise bad("size_bucket", f"must be at least 8, got {self.size_bucket}")
        if not self.tta_scales or any(s <= 0 for s in self.tta_scales):
            raise bad("tta_scales", f"must be positive numbers, got {list(self.tta_scales)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.retries < 0:
            raise bad("retries", f"must be >= 0, got {self.retries}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise bad("max_error_rate", f"must be between 0 and 1, got {self.max_error_rate}")
        if self.rows_per_file < 1:
            raise bad("rows_per_file", f"must be at least 1, got {self.rows_per_file}")
        if not 0 <= self.png_compression <= 9:
            raise bad("png_compression", f"must be 0..9, got {self.png_compression}")
        if self.num_classes is not None and self.num_classes < 1:
            raise bad("num_classes", f"must be at least 1, got {self.num_classes}")
        if self.overwrite and self.retry_errors:
            raise bad("overwrite", "cannot be combined with retry_errors")
        if self.schedule.kind not in SCHEDULE_KINDS:
            raise bad("schedule.kind", f"must be one of {', '.join(SCHEDULE_KINDS)}, got {self.schedule.kind!r}")
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


_TYPES: dict[str, tuple[type, ...]] = {
    "input": (str,), "output": (str,), "model": (str,), "weights": (str,),
    "classes": (str,), "num_classes": (int,), "batch_size": (int,), "workers": (int,),
    "gpus_per_worker": (int, float), "cpus_per_worker": (int, float),
    "torch_threads": (int,), "decode_cpus": (int, float), "max_side": (int,),
    "size_bucket": (int,), "tta": (bool,), "tta_scales": (list,), "tta_flip": (bool,),
    "precision": (str,), "retries": (int,), "max_error_rate": (int, float),
    "rows_per_file": (int,), "png_compression": (int,), "overwrite": (bool,),
    "retry_errors": (bool,), "address": (str,),
}
_SCHEDULE_TYPES: dict[str, tuple[type, ...]] = {
    "cron": (str,), "time_zone": (str,), "image": (str,), "kind": (str,),
    "address": (str,), "namespace": (str,), "name": (str,),
}


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


def load_spec(path: str | Path) -> JobSpec:
    """Read a TOML job spec. Relative input/output/weights resolve against the CWD."""
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
    values = _check(data, _TYPES, "", source)
    sched = _check(schedule_table, _SCHEDULE_TYPES, "schedule.", source)
    spec = JobSpec(**values, schedule=ScheduleSpec(**sched), source=source)
    if spec.schedule.kind not in SCHEDULE_KINDS:
        raise SpecError(
            f"{source}: key 'schedule.kind' must be one of {', '.join(SCHEDULE_KINDS)}, "
            f"got {spec.schedule.kind!r}"
        )
    if spec.precision not in PRECISIONS:
        raise SpecError(
            f"{source}: key 'precision' must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}"
        )
    return spec


def merge(spec: JobSpec, overrides: Mapping[str, Any]) -> JobSpec:
    """Apply command-line overrides (None means 'not given')."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    sched_changes = {k[len("schedule_"):]: changes.pop(k) for k in list(changes)
                     if k.startswith("schedule_")}
    if sched_changes:
        changes["schedule"] = dataclasses.replace(spec.schedule, **sched_changes)
    return dataclasses.replace(spec, **changes)
