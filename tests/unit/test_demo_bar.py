"""The demo's one progress bar: a time left for the whole demo that follows this machine."""
from __future__ import annotations

import io
import re

import pytest

from pipeline.tools.demo import DemoBar, Step


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bar_of(steps, clock):
    return DemoBar(steps, io.StringIO(), clock=clock, every_s=15.0)


def test_the_time_left_counts_every_step_and_follows_this_machine():
    clock = Clock()
    bar = bar_of([Step("scenes", "writing scenes", 10.0), Step("train", "training", 100.0, gauge=True),
                  Step("label", "labelling", 20.0, gauge=True)], clock)
    bar.begin("scenes")
    assert bar.left_s(clock.now) == pytest.approx(130.0)  # the estimates, before any measure
    clock.now = 1.0  # ten times faster than its estimate: writing files says nothing of the model
    bar.begin("train")
    assert bar.speed(clock.now) == 1.0 and bar.left_s(clock.now) == pytest.approx(120.0)
    clock.now = 41.0
    bar.advance(0.2, "epoch 5/20")  # this machine trains twice as slowly as the reference
    assert bar.speed(clock.now) == pytest.approx(2.0)
    # the running step from its own pace (40 s for a fifth), the next one scaled by 2
    assert bar.left_s(clock.now) == pytest.approx(160.0 + 40.0)
    clock.now = 201.0
    bar.begin("label", "starting Ray")
    assert bar.steps[1].ended == 201.0 and bar.speed(clock.now) == pytest.approx(2.0)
    clock.now = 211.0
    assert bar.left_s(clock.now) == pytest.approx(30.0)  # 40 s scaled, 10 s spent
    bar.advance(0.5, "12/24", eta_s=6.0)  # the run's own ETA wins once it has one
    assert bar.left_s(clock.now) == pytest.approx(6.0)


def test_a_cached_step_takes_no_time_and_the_line_says_what_runs():
    clock = Clock()
    bar = bar_of([Step("scenes", "writing scenes", 10.0), Step("train", "training", 100.0),
                  Step("label", "labelling 24 images", 20.0)], clock)
    bar.skip("scenes")
    bar.skip("train")
    bar.begin("label", "starting Ray")
    clock.now = 5.0
    assert bar.left_s(clock.now) == pytest.approx(15.0)
    line = bar.line()
    assert line.startswith("demo [######") and "labelling 24 images: starting Ray" in line
    assert "5.0s, about 15.0s left" in line


def test_off_a_terminal_it_prints_a_line_per_step_and_every_15_seconds():
    clock = Clock()
    bar = bar_of([Step("a", "step a", 10.0), Step("b", "step b", 10.0)], clock)
    with bar:
        bar.begin("a")
        for t in range(1, 31):
            clock.now = float(t)
            bar.advance(t / 31)
        bar.begin("b")
        bar.message("a message")
    lines = bar.stream.getvalue().splitlines()
    assert [re.search(r"%  (step \w)  ", line)[1] for line in lines if line.startswith("demo")] == [
        "step a", "step a", "step a", "step b"]
    assert lines[-1] == "a message"
    assert "\r" not in bar.stream.getvalue()


def test_a_step_it_does_not_know_is_an_error():
    bar = bar_of([Step("a", "step a", 1.0)], Clock())
    with pytest.raises(KeyError):
        bar.begin("nope")
