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
