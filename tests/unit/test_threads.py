"""The training thread tuner keeps the count whose batches are fastest, and looks again."""
from __future__ import annotations

import pytest

from pipeline.training.threads import ThreadTuner, candidate_counts


class FakeMachine:
    """A clock whose batches take `cost[count]` seconds at the count last set."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.count, self.calls = cost, 0.0, None, []

    def set_threads(self, count: int) -> None:
        self.count = count
        self.calls.append(count)

    def clock(self) -> float:
        return self.now

    def batches(self, tuner: ThreadTuner, n: int) -> None:
        for _ in range(n):
            self.now += self.cost[self.count]
            tuner.step()


def test_candidates_start_with_all_cores_and_end_with_one():
    assert candidate_counts(2) == (2, 1)
    assert candidate_counts(4) == (4, 3, 2, 1)
    assert candidate_counts(16) == (16, 8, 4, 2, 1)
    assert candidate_counts(1) == (1,)


def test_keeps_the_fastest_count_and_probes_again_when_the_load_changes():
    machine = FakeMachine({2: 0.30, 1: 0.20})  # another process is busy: one thread is faster
    changes = []
    tuner = ThreadTuner((2, 1), machine.set_threads, probe=3, every=10, clock=machine.clock,
                        on_change=lambda n, timed: changes.append((n, timed)))
    assert machine.count == 2  # torch's own count first
    machine.batches(tuner, 1 + 4 + 4)  # untimed first batch, then (settle + 3) per candidate
    assert not tuner.probing and tuner.chosen == 1 and machine.count == 1
    assert tuner.history == [(1, pytest.approx(0.20))]

    machine.cost = {2: 0.10, 1: 0.20}  # the other process ended
    machine.batches(tuner, 10 + 8)
    assert tuner.chosen == 2 and machine.count == 2
    assert [c for c, _ in tuner.history] == [1, 2]
    assert changes == [(1, {2: pytest.approx(0.30), 1: pytest.approx(0.20)}),
                       (2, {2: pytest.approx(0.10), 1: pytest.approx(0.20)})]


def test_a_pause_is_not_timed_as_a_batch():
    machine = FakeMachine({2: 0.10, 1: 0.20})
    tuner = ThreadTuner((2, 1), machine.set_threads, probe=3, every=100, clock=machine.clock)
    machine.batches(tuner, 3)  # first (untimed), settle, one timed batch at 2 threads
    tuner.pause()
    machine.now += 60.0  # validation and saving: not a batch at 2 threads
    machine.batches(tuner, 1 + 2 + 4)
    assert tuner.chosen == 2, tuner.history


def test_one_candidate_sets_it_and_never_probes():
    machine = FakeMachine({1: 0.1})
    tuner = ThreadTuner((1,), machine.set_threads, clock=machine.clock)
    machine.batches(tuner, 500)
    assert machine.calls == [1] and not tuner.probing


def test_train_leaves_torch_thread_count_as_it_found_it(tmp_path):
    import torch

    from pipeline.training.synth import make_synthetic_set
    from pipeline.training.train import train

    make_synthetic_set(tmp_path / "data", count=8, size=32, seed=0)
    before = torch.get_num_threads()
    seen = []
    train(tmp_path / "data", arch="drn_d_22", out=tmp_path / "m.pth", epochs=1, batch_size=2,
          size=16, val_split=0, threads=1, log=lambda m: None,
          on_batch=lambda done, total: seen.append((done, total, torch.get_num_threads())))
    assert seen == [(i, 4, 1) for i in range(1, 5)]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        train(tmp_path / "data", arch="drn_d_22", out=tmp_path / "n.pth", threads=-1)
