"""Progress of a running job: counts aggregated by an actor, shown and saved by the driver.

Workers report labelled and committed rows to an actor whose handle they are given; a driver thread polls it
every few seconds, writes ``OUTPUT/_state/progress.json`` and prints a live line on a terminal
(plain periodic lines otherwise). ``drn-label status OUTPUT`` prints the file.

One images/s figure: images labelled over the labelling time (from the moment the run
starts labelling, start-up excluded, to now or to the end), so the live line, the summary
and the run record agree. The ETA comes from `EtaEstimator`.
"""
from __future__ import annotations

import json
import logging
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, TextIO

log = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h07m: how long, as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass
class Progress:
    run_id: str
    output: str
    state: str = "running"  # running, finished, failed, interrupted
    total: int = 0  # images this run labels (grows while the inputs are being listed)
    skipped: int = 0  # images that already had a row (resume)
    labelled: int = 0
    labelled_ok: int = 0
    labelled_errors: int = 0
    committed: int = 0
    committed_ok: int = 0
    committed_errors: int = 0
    committed_files: int = 0
    images_per_s: float = 0.0  # labelled / elapsed_s
    # steady state: images after the first batch / time from the first to the last batch
    steady_images_per_s: float | None = None
    eta_s: float | None = None
    started_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    elapsed_s: float = 0.0  # labelling time so far (start-up excluded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


class ProgressCounter:
    """The actor's body (also usable in-process)."""

    def __init__(self) -> None:
        self.labelled_ok = self.labelled_errors = 0
        self.committed_ok = self.committed_errors = self.committed_files = 0
        self.listed = self.skipped = 0  # inputs streamed through the skip stage so far
        self.first_t: float | None = None
        self.first_n = 0  # images in the first report (labelled before first_t)
        self.last_t: float | None = None

    def add_labelled(self, ok: int, errors: int, t: float) -> None:
        self.labelled_ok += ok
        self.labelled_errors += errors
        if self.first_t is None or t < self.first_t:
            self.first_t, self.first_n = t, ok + errors
        self.last_t = t if self.last_t is None else max(self.last_t, t)

    def add_listed(self, listed: int, skipped: int) -> None:
        self.listed += listed
        self.skipped += skipped

    def add_committed(self, ok: int, errors: int) -> None:
        """One file committed with `ok` + `errors` rows (a retried task rewrites the same
        file; the sink reports only commits that happened)."""
        self.committed_ok += ok
        self.committed_errors += errors
        self.committed_files += 1

    def snapshot(self) -> dict:
        return dict(labelled_ok=self.labelled_ok, labelled_errors=self.labelled_errors,
                    committed_ok=self.committed_ok, committed_errors=self.committed_errors,
                    committed_files=self.committed_files, listed=self.listed,
                    skipped=self.skipped, first_t=self.first_t, first_n=self.first_n,
                    last_t=self.last_t)


def start_counter_actor():
    """The run's progress actor; its handle travels to predict actors and write tasks."""
    import ray

    from pipeline.job.commit import driver_node

    actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(ProgressCounter)
    return actor_cls.options(scheduling_strategy=driver_node()).remote()


class EtaEstimator:
    """Seconds left, from completed work only, so one slow batch moves it little.

    When the labelled count grows (an event), the interval since the previous event gives
    a rate; the estimate's rate is the median of the last `window` such rates (one slow
    batch is an outlier it ignores) but never above the throughput observed over the whole
    labelling time up to that event (periodic slow batches, or a slowdown, are evidence it
    keeps). Between events the estimate counts down with the clock instead of growing, but
    never below the time the images after those in flight take at that rate.
    """

    def __init__(self, t0: float, window: int = 20) -> None:
        self.t0 = self.t_event = t0
        self.labelled = 0  # at the last event
        self.in_flight = 0  # images of the last event: about what one poll sees finish
        self.rate: float | None = None
        self.rates: deque[float] = deque(maxlen=window)

    def observe(self, t: float, labelled: int) -> None:
        if labelled <= self.labelled:
            return
        added, span = labelled - self.labelled, max(t - self.t_event, 1e-3)
        self.rates.append(added / span)
        overall = labelled / max(t - self.t0, 1e-3)
        self.rate = min(statistics.median(self.rates), overall)
        self.labelled, self.t_event, self.in_flight = labelled, t, added

    def eta(self, t: float, total: int) -> float | None:
        if not self.rate:
            return None
        left = max(total - self.labelled, 0)
        countdown = left / self.rate - max(t - self.t_event, 0.0)
        return max(countdown, max(left - self.in_flight, 0) / self.rate)


def draw_bar(fraction: float, width: int = 24) -> str:
    """[#####-------]: `fraction` (0 to 1) of `width` filled."""
    filled = int(width * min(max(fraction, 0.0), 1.0))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_line(p: Progress) -> str:
    if p.state == "running" and not p.total and not p.skipped:
        return f"starting: listing the inputs, loading the model ({p.elapsed_s:.0f}s)"
    done = p.labelled
    pct = 100.0 * done / p.total if p.total else 100.0
    bar = draw_bar(min(done, p.total) / p.total if p.total else 1.0)
    eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
    return (f"{bar} {done}/{p.total} ({pct:.0f}%)  errors {p.labelled_errors}  "
            f"{p.images_per_s:.1f} img/s  ETA {eta}")


class ProgressReporter:
    """Driver thread: poll the counter, save _state/progress.json, print, keep the lease fresh."""

    def __init__(self, progress: Progress, poll: Callable[[], dict] | None, *,
                 save: Callable[[Progress], None], stream: TextIO | None = None,
                 interval: float = 2.0, print_interval: float = 10.0,
                 heartbeat: Callable[[], None] | None = None,
                 stall_s: float | None = None, on_stall: Callable[[float], None] | None = None,
                 show: Callable[[Progress, bool], None] | None = None) -> None:
        self.progress, self.poll, self.save = progress, poll, save
        self.show = show  # draws the progress instead of the line below, when given
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.print_interval = interval, print_interval
        self.heartbeat = heartbeat
        # A run whose counts stand still for `stall_s` (no image listed, labelled or
        # committed) calls `on_stall(seconds)` once: a worker that can never come back
        # (a node lost from a cluster with no room for it elsewhere) must not hang the run.
        self.stall_s, self.on_stall = stall_s, on_stall
        self._counts: tuple | None = None
        self._moved_t = time.monotonic()
        self.stalled = False
        self._t0 = time.time()  # labelling starts when the reporter does
        self._eta = EtaEstimator(self._t0)
        self._last_print = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drn-label-progress", daemon=True)

    def start(self) -> "ProgressReporter":
        self.save(self.progress)
        self._thread.start()
        return self

    def update(self, label_s: float | None = None) -> None:
        """Poll the counts; `label_s` (the run's own measure, at its end) fixes the
        labelling time the rate is over."""
        p = self.progress
        now = time.time()
        if self.poll is not None:
            try:
                snap = self.poll()
            except Exception:  # noqa: BLE001 - a missed poll is not worth failing a job
                snap = None
            if snap:
                p.labelled_ok, p.labelled_errors = snap["labelled_ok"], snap["labelled_errors"]
                p.committed_ok, p.committed_errors = snap["committed_ok"], snap["committed_errors"]
                if snap.get("listed"):  # inputs are listed while the run labels: totals grow
                    p.skipped = snap["skipped"]
                    p.total = snap["listed"] - snap["skipped"]
                # A batch retried after a worker died is reported twice; rows are committed once.
                p.labelled = min(p.labelled_ok + p.labelled_errors, p.total) if p.total else 0
                p.committed = p.committed_ok + p.committed_errors
                p.committed_files = snap.get("committed_files", 0)
                if snap["first_t"] and snap["last_t"] and snap["last_t"] > snap["first_t"]:
                    p.steady_images_per_s = round(
                        (p.labelled - snap["first_n"]) / (snap["last_t"] - snap["first_t"]), 3)
        elapsed = label_s if label_s is not None else now - self._t0
        p.elapsed_s = round(elapsed, 2)
        p.images_per_s = round(p.labelled / elapsed, 3) if elapsed > 0 else 0.0
        self._eta.observe(now, p.labelled)
        eta = self._eta.eta(now, p.total)
        p.eta_s = round(eta, 1) if eta is not None else None
        p.updated_at = utc_now()

    def _emit(self, final: bool = False) -> None:
        if self.show is not None:
            self.show(self.progress, final)
            return
        line = format_line(self.progress)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.time() - self._last_print >= self.print_interval:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = time.time()

    def _watch(self) -> None:
        p, now = self.progress, time.monotonic()
        counts = (p.labelled_ok + p.labelled_errors, p.committed, p.total, p.skipped)
        if counts != self._counts:
            self._counts, self._moved_t = counts, now
        elif (self.stall_s and self.on_stall is not None and not self.stalled
              and now - self._moved_t >= self.stall_s):
            self.stalled = True
            self.on_stall(now - self._moved_t)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.update()
            self._watch()
            try:
                self.save(self.progress)
                if self.heartbeat:
                    self.heartbeat()
            except Exception:  # noqa: BLE001
                pass
            self._emit()

    def finish(self, state: str, label_s: float | None = None) -> Progress:
        """Stop the thread, take the last counts (over `label_s` of labelling, when the
        run measured it), save and print them."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.update(label_s)
        self.progress.state = state
        self.progress.eta_s = 0.0 if state == "finished" else self.progress.eta_s
        try:
            self.save(self.progress)
        except OSError as exc:  # a full disk must not hide why the run ends
            log.warning("cannot save the run's progress: %s", " ".join(str(exc).split()))
        self._emit(final=True)
        return self.progress
