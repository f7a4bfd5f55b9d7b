"""docs/labelling-loop.md runs as written: its command blocks are read from the page and
run in order (drn-label commands in this process on the session's Ray, the annotator
stand-in as a subprocess), and the held-out mIoU after the round must beat the one before.

By default seed 0 with least-confident selection runs (a few minutes); the page's figures
come from ``LOOP_SEEDS=0,1,2 LOOP_STRATEGIES=least-confident,random``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "labelling-loop.md"


def blocks() -> dict[str, list[str]]:
    """The page's bash blocks by their first-line comment ("# per seed", "# per strategy")."""
    found = {}
    for body in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
        if lines and lines[0].startswith("# per "):
            found[lines[0][2:]] = lines[1:]
    return found


def run_block(lines: list[str], variables: dict[str, str], cwd: Path, runner) -> list[str]:
    outputs = []
    for line in lines:
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        args = shlex.split(line)
        if args[0] == "drn-label":
            res = runner.invoke(cli, args[1:])
            assert res.exit_code == 0, f"{line}\n{res.output}"
            outputs.append(res.output)
        else:
            assert args[:2] == ["python", "docs/annotate_with_ground_truth.py"], line
            done = subprocess.run([sys.executable, str(ROOT / args[1]), *args[2:]], cwd=cwd,
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
    return outputs


def test_the_worked_round_of_the_docs_improves_held_out_miou(tmp_path, monkeypatch, cli_runner, ray_session):
    import torch

    steps = blocks()
    assert set(steps) == {"per seed", "per strategy"}
    seeds = [s.strip() for s in os.environ.get("LOOP_SEEDS", "0").split(",")]
    strategies = [s.strip() for s in os.environ.get("LOOP_STRATEGIES", "least-confident").split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    figures = []
    try:
        for seed in seeds:
            work = tmp_path / f"seed{seed}"
            work.mkdir()
            monkeypatch.chdir(work)
            run_block(steps["per seed"], {"SEED": seed}, work, cli_runner)
            before = json.loads((work / "loop" / "before.json").read_text())["miou"]
            for strategy in strategies:
                out = run_block(steps["per strategy"], {"SEED": seed, "STRATEGY": strategy}, work, cli_runner)
                after = json.loads((work / "loop" / f"after-{strategy}.json").read_text())["miou"]
                agreement = re.search(r"pixel agreement ([0-9.]+)", out[-1]).group(1)
                figures.append((seed, strategy, before, after, float(agreement)))
                imported = len(list((work / "loop" / strategy / "data" / "masks").glob("*.png")))
                assert imported == 50
    finally:
        torch.set_num_threads(threads)
    print("\nseed  strategy         before  after   pool pixel agreement weak vs new")
    for seed, strategy, before, after, agreement in figures:
        print(f"{seed:>4}  {strategy:<15}  {before:.4f}  {after:.4f}  {agreement:.4f}")
    for seed, strategy, before, after, _ in figures:
        assert after > before, (seed, strategy, before, after)
