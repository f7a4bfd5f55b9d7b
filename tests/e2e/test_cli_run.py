"""`drn-label run` as a user runs it (a subprocess with its own embedded Ray): Ray's
token-authentication notice stays hidden without -v, an autoscaling actor pool (--workers 1-2) labels
everything, and the summary's images/s is the progress line's."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("finished: 6 ok, 0 errors"), summary
    last_line = [line for line in proc.stderr.splitlines() if "img/s" in line][-1]
    assert last_line.startswith("[########################] 6/6 (100%)"), last_line
    bar_rate = re.search(r"([\d.]+) img/s", last_line).group(1)
    assert f"({bar_rate} img/s)" in summary, (last_line, summary)
