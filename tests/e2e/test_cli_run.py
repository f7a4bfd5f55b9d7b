"""`drn-label run` as a user runs it (a subprocess with its own embedded Ray): Ray's
token-authentication notice stays hidden without -v, an autoscaling actor pool (--workers 1-2) labels
everything, and the summary's images/s is the progress line's and the record's; Ctrl-C and
SIGTERM say what was committed and how to resume."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_quiet_run_with_an_autoscaling_pool_and_one_rate(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{k}.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in [k for k in env if k.startswith(("RAY_", "DRN_LABEL_"))]:
        env.pop(key)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(images), str(tmp_path / "out"),
         "--num-classes", "3", "--workers", "1-2", "--batch-size", "2", "--torch-threads", "1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Token authentication" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    # No line of Ray's C++ logger ("[2026-12-06 04:29:17,742 I 6877 6877] logging.cc:303: ..."),
    # at any level: not the actor-restart notice, not the one saying it read its level.
    ray_lines = re.findall(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\].*$", proc.stderr, re.M)
    assert not ray_lines, ray_lines
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("finished: 6 ok, 0 errors"), summary
    last_line = [line for line in proc.stderr.splitlines() if "img/s" in line][-1]
    assert last_line.startswith("[########################] 6/6 (100%)"), last_line
    bar_rate = re.search(r"([\d.]+) img/s", last_line).group(1)
    # One figure: images over labelling time, the bar's, the summary's and the record's.
    import json

    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_state" / "runs").glob("*.json")]
    timings = record["timings"]
    assert bar_rate == f"{timings['images_per_s']:.1f}"
    assert abs(timings["images_per_s"] - 6 / timings["label_s"]) < 0.01, timings
    assert (f"; 6 images in {timings['label_s']:.1f}s of labelling ({bar_rate} images/s) after "
            f"{timings['startup_s']:.1f}s of start-up; output: ") in summary, (last_line, summary)


@pytest.mark.slow
def test_ctrl_c_says_what_was_committed_and_how_to_resume(tmp_path):
    """SIGINT (Ctrl-C) to a real `drn-label run` once it has committed: exit 130 (not
    click's "Aborted!", exit 1), the number of rows it committed, which is what OUTPUT holds
    of that run, and the command that resumes; the run record says "interrupted"; the
    embedded Ray is gone. (SIGTERM: tests/e2e/test_hostile.py.)"""
    import json
    import shlex
    import signal
    import time
    import uuid
    from collections import Counter

    from pipeline.store.output import PROGRESS_FILE, RUNS_DIR
    from tests.e2e.test_faults import cli_command, cli_env, read_rows, wait_gone, write_images
    from tests.e2e.test_streaming import kill_all, start

    inputs, output, log = tmp_path / "in", tmp_path / "out", tmp_path / "run.log"
    write_images(inputs, 240)
    command = cli_command(inputs, output)
    ray_tmp = tempfile.mkdtemp(prefix="drnc-", dir="/tmp")
    mark = uuid.uuid4().hex
    try:
        proc = start(command, cli_env(mark, ray_tmp), log)
        try:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                try:
                    if json.loads((output / PROGRESS_FILE).read_text()).get("committed", 0) > 0:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.1)
            assert proc.poll() is None, f"the run ended before Ctrl-C:\n{log.read_text()[-2000:]}"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                kill_all(proc, mark)
        assert not wait_gone(mark), "the run's Ray outlived it"
        # the probe that test_nothing_to_do_answers_without_starting_ray relies on sees this Ray
        assert list(Path(ray_tmp).glob("ray/session_*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text()
    assert "Aborted!" not in text and "Traceback" not in text, text[-3000:]
    (record_file,) = (output / RUNS_DIR).glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["state"] == "interrupted"
    on_disk = Counter(read_rows(output).column("run_id").to_pylist())[record["run_id"]]
    assert on_disk == record["counts"]["ok"] > 0
    listed = record["counts"]["to_label"]
    assert (f"\ninterrupted: {on_disk} ok, 0 errors committed, {listed - on_disk} of the {listed} "
            f"images listed so far not; ") in text, text[-2000:]
    assert ("rerun the same command to label the rest (nothing is labelled twice):\n  "
            f"{shlex.join(['drn-label', *command[3:]])}\n") in text, text[-2000:]


def test_nothing_to_do_answers_without_starting_ray(run, tmp_path):
    """Rerunning a finished run's command, and running on a folder with no images, answer
    from the files alone: the subprocess's own Ray temp dir (RAY_TMPDIR, where a Ray it
    started would put its session) stays empty, and no process it started outlives it."""
    import uuid

    from tests.e2e.test_faults import cli_env, marked

    ray_tmp = tempfile.mkdtemp(prefix="drnn-", dir="/tmp")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    rerun = ["run", str(run.input), str(run.output), "--model", "drn_d_22", "--weights",
             str(run.checkpoint), "--classes", "cityscapes", "--batch-size", "4",
             "--rows-per-file", "5"]
    try:
        for args, code in ((rerun, 0), (["run", str(empty), str(tmp_path / "out")], 1)):
            mark = uuid.uuid4().hex
            proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args],
                                  env=cli_env(mark, ray_tmp), capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == code, proc.stderr
            assert os.listdir(ray_tmp) == [], os.listdir(ray_tmp)
            assert not marked(mark)
            if code == 0:
                n = len(run.table)
                assert (f"nothing to do: the {n} images {run.input} lists already have rows of "
                        f"drn_d_22 (") in proc.stderr, proc.stderr
                assert proc.stdout.startswith(f"finished: nothing to label, 0 ok, 0 errors, {n} already "
                                              f"labelled (of {n} inputs) in "), proc.stdout
            else:
                assert proc.stderr == (f"error: input {empty}: no images in this directory or its "
                                       "subfolders (looked for .bmp, .jpeg, .jpg, .png, .tif, .tiff, "
                                       ".webp in any letter case); point INPUT at the folder that "
                                       "holds the images, or use a glob or a manifest\n")
                assert not (tmp_path / "out" / "_state").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
