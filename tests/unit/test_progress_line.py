"""The progress line a run prints (on a terminal, and every 10 s in logs)."""
from __future__ import annotations

from pipeline.job.progress import Progress, format_line


def test_a_run_that_has_listed_nothing_yet_says_it_is_starting():
    p = Progress(run_id="r", output="o", elapsed_s=12.4)
    assert format_line(p) == "starting: listing the inputs, loading the model (12s)"


def test_the_bar_follows_labelled_over_listed():
    p = Progress(run_id="r", output="o", total=400, labelled=100, labelled_errors=3,
                 images_per_s=20.0, eta_s=15.0)
    assert format_line(p) == "[######------------------] 100/400 (25%)  errors 3  20.0 img/s  ETA 15s"


def test_a_finished_run_with_nothing_to_label_is_complete():
    p = Progress(run_id="r", output="o", state="finished", skipped=40, eta_s=0.0)
    assert format_line(p) == "[########################] 0/0 (100%)  errors 0  0.0 img/s  ETA 0s"


# -- the ETA -------------------------------------------------------------------------------------
def _etas(estimator, events, total, until, step=2.0):
    """ETA at each poll (every `step` s) of a run whose labelled count follows `events`
    ((time, labelled) pairs), as the reporter polls it."""
    out, k, labelled, t = [], 0, 0, step
    while t <= until + 1e-9:
        while k < len(events) and events[k][0] <= t:
            labelled = events[k][1]
            k += 1
        estimator.observe(t, labelled)
        out.append((t, labelled, estimator.eta(t, total)))
        t += step
    return out


def test_the_eta_does_not_grow_while_a_slow_batch_is_stuck():
    """--tta on 8 images: the first batch of 4 after 8 s, the second 30 s later. The ETA
    was 8 s and grew to 38 s while stuck at 4/8; now it counts down and stays there."""
    from pipeline.job.progress import EtaEstimator

    polls = _etas(EtaEstimator(0.0), [(8.0, 4), (38.0, 8)], total=8, until=36.0)
    stuck = [eta for t, n, eta in polls if n == 4]
    assert stuck[0] == 8.0
    assert all(b <= a for a, b in zip(stuck, stuck[1:])), stuck
    assert min(stuck) >= 0.0


def test_one_slow_batch_in_a_long_run_moves_the_eta_a_few_percent():
    """A batch of 4 every second (4 images/s) for 200 s, then one batch that takes 10 s:
    while it is stuck the ETA only counts down (never below the time the rest after it
    needs), and once it is done the ETA is within 5% of where it was."""
    from pipeline.job.progress import EtaEstimator

    events = [(float(s), 4 * s) for s in range(1, 201)] + [(210.0, 804)] + \
        [(210.0 + s, 804 + 4 * s) for s in range(1, 20)]
    polls = _etas(EtaEstimator(0.0, window=20), events, total=2000, until=228.0, step=1.0)
    before = next(eta for t, n, eta in polls if t == 200.0)
    assert before == (2000 - 800) / 4
    during = [eta for t, n, eta in polls if 200.0 < t < 210.0]
    assert all(b <= a for a, b in zip([before, *during], during)), during
    assert min(during) >= (2000 - 804) / 4 - 1e-6
    after = next(eta for t, n, eta in polls if t == 210.0)
    assert abs(after - before) / before < 0.05, (before, after)


def test_a_run_that_slows_down_for_good_gets_a_longer_eta():
    """The estimate is not stuck optimistic: when batches take twice as long from some
    point on, the ETA follows within the window."""
    from pipeline.job.progress import EtaEstimator

    fast = [(float(s), 4 * s) for s in range(1, 101)]
    slow = [(100.0 + 2 * s, 400 + 4 * s) for s in range(1, 31)]
    polls = _etas(EtaEstimator(0.0, window=20), fast + slow, total=2000, until=160.0, step=1.0)
    eta = next(eta for t, n, eta in polls if t == 160.0)
    assert abs(eta - (2000 - 520) / 2) / ((2000 - 520) / 2) < 0.05, eta


def test_the_rate_is_labelled_images_over_labelling_time():
    """The live line's rate, the summary's and the record's are one figure: images
    labelled over the time since labelling began (start-up excluded), or over the time
    the run measured when it ends."""
    from pipeline.job.progress import ProgressReporter

    snap = dict(labelled_ok=150, labelled_errors=0, committed_ok=150, committed_errors=0,
                committed_files=2, listed=150, skipped=0, first_t=None, first_n=0, last_t=None)
    saved = []
    reporter = ProgressReporter(Progress(run_id="r", output="o"), lambda: snap, save=saved.append,
                                stream=open("/dev/null", "w"))
    final = reporter.finish("finished", label_s=16.7)
    assert final.images_per_s == round(150 / 16.7, 3) and final.elapsed_s == 16.7
    assert saved[-1].state == "finished"
    assert format_line(final).endswith("150/150 (100%)  errors 0  9.0 img/s  ETA 0s")


def test_the_summary_shows_start_up_apart():
    from pipeline.job.run import RunResult

    result = RunResult(run_id="r", output="/out", state="finished", inputs=150, skipped=0,
                       to_label=150, ok=150, startup_s=13.04, label_s=16.7, wall_s=29.7,
                       images_per_s=150 / 16.7)
    assert result.summary() == ("finished: 150 ok, 0 errors, 0 already labelled (of 150 inputs); "
                                "150 images in 16.7s of labelling (9.0 images/s) after 13.0s of "
                                "start-up; output: /out")
    stopped = RunResult(run_id="r", output="/out", state="interrupted", inputs=150, skipped=10,
                        to_label=140, ok=104, startup_s=13.0, label_s=12.0, images_per_s=104 / 12)
    assert stopped.summary() == ("interrupted: 104 ok, 0 errors committed, 36 of the 140 images "
                                 "listed so far not; 10 were already labelled; 104 images in 12.0s "
                                 "of labelling (8.7 images/s) after 13.0s of start-up; output: /out")


def _snap(labelled: int) -> dict:
    return dict(labelled_ok=labelled, labelled_errors=0, committed_ok=labelled, committed_errors=0,
                committed_files=1, listed=100, skipped=0, first_t=None, first_n=0, last_t=None)


def test_counts_that_stand_still_ring_the_stall_alarm_once():
    """The progress thread calls on_stall once when no count has moved for stall_s; while
    images keep being labelled it never does."""
    import threading

    from pipeline.job.progress import ProgressReporter

    rang: list[float] = []
    rung = threading.Event()
    labelled = iter(range(1, 10**6))
    moving = ProgressReporter(Progress(run_id="r", output="o"), lambda: _snap(next(labelled)),
                              save=lambda p: None, stream=open("/dev/null", "w"), interval=0.01,
                              stall_s=0.05, on_stall=lambda s: (rang.append(s), rung.set()))
    moving.start()
    while next(labelled) < 60:  # the counts move on every poll: dozens of polls, no alarm
        threading.Event().wait(0.005)
    moving.finish("finished")
    assert rang == [] and not moving.stalled

    still = ProgressReporter(Progress(run_id="r", output="o"), lambda: _snap(7), save=lambda p: None,
                             stream=open("/dev/null", "w"), interval=0.01, stall_s=0.05,
                             on_stall=lambda s: (rang.append(s), rung.set()))
    still.start()
    assert rung.wait(30)
    threading.Event().wait(0.1)  # more polls of the same counts: the alarm rang once
    still.finish("failed")
    assert len(rang) == 1 and rang[0] >= 0.05 and still.stalled


def test_the_stall_alarm_stops_the_main_thread_where_it_waits(monkeypatch):
    """Rung from another thread, the armed alarm raises Stalled in the main thread inside a
    wait; disarmed (out of its block) it does nothing, and SIGUSR1's handler is put back."""
    import signal
    import threading
    import time

    import pytest

    from pipeline.job.run import StallAlarm, Stalled

    before = signal.getsignal(signal.SIGUSR1)
    alarm = StallAlarm()
    with pytest.raises(Stalled) as stopped:
        with alarm:
            threading.Timer(0.05, alarm.ring, args=(42.0,)).start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.01)
    assert stopped.value.seconds == 42.0 and not alarm.armed
    assert signal.getsignal(signal.SIGUSR1) == before
    alarm.ring(1.0)  # disarmed: nothing happens
    time.sleep(0.05)

    monkeypatch.setenv("DRN_LABEL_STALL_S", "0")
    assert StallAlarm.after_s() is None
    monkeypatch.setenv("DRN_LABEL_STALL_S", "30")
    monkeypatch.setenv("DRN_LABEL_STORAGE_RETRY_S", "10")
    assert StallAlarm.after_s() == 70.0  # a writer retrying a full disk is not a stall
    monkeypatch.delenv("DRN_LABEL_STALL_S")
    monkeypatch.delenv("DRN_LABEL_STORAGE_RETRY_S")
    assert StallAlarm.after_s() == 900.0
