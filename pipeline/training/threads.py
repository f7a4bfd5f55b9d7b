"""How many threads torch uses for a CPU training run, picked by timing batches.

On a machine with other work, torch's threads lose more than their share: every
parallel region waits for its slowest thread, and a thread the scheduler has put aside
holds all of them. Fewer threads are then faster (docs/benchmarks.md, "Fair share"). The
right count depends on the load, which changes during a run, so `ThreadTuner` measures:
it times a few batches at each candidate count, keeps the fastest, and measures again
every `every` batches.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def candidate_counts(cores: int) -> tuple[int, ...]:
    """The counts worth timing: every count up to 4 cores, then halvings of the cores."""
    if cores <= 4:
        return tuple(range(cores, 0, -1))
    counts, n = [], cores
    while n >= 1:
        counts.append(n)
        n //= 2
    return tuple(counts)


class ThreadTuner:
    """Call `step()` after every batch; it sets the thread count through `set_threads`.

    Probing times `probe` batches at each candidate (after one batch to settle at the new
    count) and keeps the count with the lowest median batch time; the chosen count then
    runs `every` batches before the next probe. The first candidate is the count torch
    would use by itself, so an idle machine loses nothing but the probes of the others.
    """

    def __init__(self, candidates: Sequence[int], set_threads: Callable[[int], None], *,
                 probe: int = 5, every: int = 90,
                 clock: Callable[[], float] = time.perf_counter,
                 on_change: Callable[[int, dict[int, float]], None] | None = None) -> None:
        if not candidates:
            raise ValueError("no thread counts to choose from")
        self.candidates = tuple(candidates)
        self.set_threads, self.probe, self.every, self.clock = set_threads, probe, every, clock
        self.on_change = on_change  # (count, median batch seconds by count) when the choice changes
        self.chosen = self.candidates[0]
        self.history: list[tuple[int, float]] = []  # (count, median batch seconds) per probe
        self._queue: list[int] = []
        self._times: list[float] = []
        self._skip = 0
        self._left = 0  # batches before the next probe
        self._last: float | None = None
        self._start_probe()

    @property
    def probing(self) -> bool:
        return bool(self._queue)

    def _use(self, count: int) -> None:
        self.set_threads(count)
        self._times, self._skip = [], 1

    def _start_probe(self) -> None:
        if len(self.candidates) == 1:
            self._use(self.chosen)
            self._queue, self._left = [], 1 << 62
            return
        self._queue = list(self.candidates)
        self._results: dict[int, float] = {}
        self._use(self._queue[0])

    def pause(self) -> None:
        """The time until the next `step()` is not a batch's (validation, saving)."""
        self._last = None

    def step(self) -> None:
        now = self.clock()
        last, self._last = self._last, now
        if last is None:  # the first batch after a pause has no start to time it from
            return
        if not self._queue:
            self._left -= 1
            if self._left <= 0:
                self._start_probe()
            return
        if self._skip:
            self._skip -= 1
            return
        self._times.append(now - last)
        if len(self._times) < self.probe:
            return
        count = self._queue.pop(0)
        self._results[count] = statistics.median(self._times)
        if self._queue:
            self._use(self._queue[0])
            return
        before, self.chosen = self.chosen, min(self._results, key=self._results.__getitem__)
        self.history.append((self.chosen, self._results[self.chosen]))
        if self.on_change is not None and (self.chosen != before or len(self.history) == 1):
            self.on_change(self.chosen, dict(self._results))
        self.set_threads(self.chosen)
        self._left = self.every
