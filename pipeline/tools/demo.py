"""`drn-label demo`: a newcomer's first run, with labels that are right, not noise.

1. Sample images with exact ground truth (synthetic scenes, `pipeline.training.synth`).
2. A drn_d_22 trained on other synthetic scenes (`pipeline.training.train`), the first time only:
   the checkpoint is cached beside the samples and training resumes if interrupted.
3. `run_job` on an embedded local Ray from the job spec it writes beside the samples,
   exactly what `drn-label run --job DIR/job.toml` does, then `eval` of the masks against
   the ground truth.
"""
from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO


# Training recipe measured on a 2-core CPU (docs/benchmarks.md, "The demo"): 10 epochs keep
# the demo under 4 minutes beside another busy process, with mIoU 0.85 on its samples.
DEMO_ARCH = "drn_d_22"
DEMO_TRAIN = {"count": 300, "size": 128, "seed": 0}
DEMO_SAMPLES = {"size": 128, "seed": 1}
DEMO_FIT = {"epochs": 10, "batch_size": 8, "size": 64, "lr": 0.05, "scale_range": (0.5, 1.5)}


# What each step took on an idle 2-core machine (docs/benchmarks.md, "The demo"): the
# bar's first estimate. Once training has run a few batches, every step's estimate is
# scaled by how fast this machine is going compared with that one.
STEP_SECONDS = {"scenes": 1.5, "train_epoch": 14.0, "samples": 0.3, "start": 5.0, "image": 0.5,
                "score": 2.0}


@dataclass
class Step:
    key: str
    what: str
    prior_s: float  # the estimate before this machine's speed is known
    started: float | None = None
    ended: float | None = None
    fraction: float = 0.0  # of the step done
    detail: str = ""
    eta_s: float | None = None  # the step's own estimate of what is left, when it has one
    # Whether the step's pace shows this machine's speed (the model's work: training,
    # labelling), so that it scales the estimates of the steps to come; writing small
    # files does not.
    gauge: bool = False


class DemoBar:
    """One progress bar for the whole demo, with the time left for all of it.

    Each step has an estimate from an idle 2-core machine; the running step reports how
    far it is (`advance`), and how fast this machine goes compared with that one (the
    model's steps done, and the running one once a tenth of it is done) scales every
    estimate still to come. On a terminal the bar is redrawn every second, with messages printed
    above it; elsewhere it is printed as a line when a step starts and every 15 seconds.
    """

    def __init__(self, steps: list[Step], stream: TextIO | None = None, *,
                 clock: Callable[[], float] = time.monotonic, every_s: float = 15.0) -> None:
        self.steps = steps
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock, self.every_s = clock, every_s
        self.t0 = clock()
        self._current: Step | None = None
        self._printed = -1e9
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "DemoBar":
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, name="drn-label-demo-bar", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.draw()

    def begin(self, key: str, detail: str = "") -> None:
        """Step `key` starts; the one before it, and any skipped, are done."""
        with self._lock:
            now = self.clock()
            for step in self.steps:
                if step.key == key:
                    step.started, step.detail = now, detail
                    self._current = step
                    break
                if step.ended is None:
                    step.started = step.started if step.started is not None else now
                    step.ended, step.fraction = now, 1.0
            else:
                raise KeyError(key)
            self.draw(force=True)

    def skip(self, key: str) -> None:
        """Step `key` has nothing to do (the checkpoint is cached): it takes no time."""
        with self._lock:
            step = next(s for s in self.steps if s.key == key)
            step.prior_s, step.fraction = 0.0, 1.0

    def advance(self, fraction: float, detail: str | None = None, eta_s: float | None = None) -> None:
        with self._lock:
            step = self._current
            if step is None:
                return
            step.fraction = min(max(fraction, 0.0), 1.0)
            step.eta_s = eta_s
            if detail is not None:
                step.detail = detail
            self.draw()

    def message(self, text: str) -> None:
        """A line above the bar."""
        with self._lock:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()
            if self.tty:
                self.draw(force=True)

    def speed(self, now: float) -> float:
        """How much longer than on the reference machine this one takes (1.0: as long)."""
        spent = prior = 0.0
        for step in self.steps:
            if step.started is None or not step.prior_s or not step.gauge:
                continue
            if step.ended is not None:
                spent, prior = spent + step.ended - step.started, prior + step.prior_s
            elif step.fraction >= 0.1:
                spent += now - step.started
                prior += step.prior_s * step.fraction
        return min(max(spent / prior, 0.3), 10.0) if prior > 0 else 1.0

    def left_s(self, now: float) -> float:
        """Seconds left for the whole demo."""
        factor = self.speed(now)
        left = 0.0
        for step in self.steps:
            if step.ended is not None:
                continue
            if step is self._current and step.started is not None:
                spent = now - step.started
                if step.eta_s is not None:
                    left += step.eta_s
                elif step.fraction >= 0.05:
                    left += spent * (1 - step.fraction) / step.fraction
                else:  # no measure of its own yet: the estimate, less what it has had
                    left += max(step.prior_s * factor - spent, 0.1 * step.prior_s * factor)
            else:
                left += step.prior_s * factor * (1 - step.fraction)
        return left

    def line(self) -> str:
        from pipeline.job.progress import draw_bar, format_duration

        now = self.clock()
        spent, left = now - self.t0, self.left_s(now)
        done = spent / (spent + left) if spent + left > 0 else 0.0
        step = self._current
        what = f"{step.what}{': ' + step.detail if step and step.detail else ''}" if step else "starting"
        return (f"demo {draw_bar(done)} {100 * done:3.0f}%  {what}  "
                f"{format_duration(spent)}, about {format_duration(left)} left")

    def draw(self, force: bool = False) -> None:
        with self._lock:
            now = self.clock()
            if self.tty:
                self.stream.write("\r\033[K" + self.line())
            elif force or now - self._printed >= self.every_s:
                self.stream.write(self.line() + "\n")
                self._printed = now
            else:
                return
            self.stream.flush()


def demo_steps(count: int) -> list[Step]:
    """The demo's steps, with their estimates on an idle 2-core machine."""
    sec = STEP_SECONDS
    return [
        Step("scenes", f"writing {DEMO_TRAIN['count']} training scenes", sec["scenes"]),
        Step("train", f"training {DEMO_ARCH}", sec["train_epoch"] * DEMO_FIT["epochs"], gauge=True),
        Step("samples", f"writing {count} sample images", sec["samples"] * count / 24),
        Step("label", f"labelling {count} images", sec["start"] + sec["image"] * count, gauge=True),
        Step("score", "scoring the labels", sec["score"]),
    ]


def ensure_checkpoint(root: Path, echo: Callable[[str], None] = print,
                      bar: DemoBar | None = None) -> Path:
    """Train the demo model once; later calls return the cached checkpoint."""
    from pipeline.training.synth import make_synthetic_set
    from pipeline.training.train import state_path, train

    ckpt = root / f"{DEMO_ARCH}-synthetic.pth"
    state = state_path(ckpt)
    if ckpt.exists() and state.exists() and json_finished(state):
        if bar is not None:
            bar.skip("scenes")
            bar.skip("train")
        return ckpt
    train_dir = root / "train"
    if not (train_dir / "classes.json").exists():
        if bar is not None:
            bar.begin("scenes")
        echo(f"writing {DEMO_TRAIN['count']} synthetic training scenes to {train_dir}")
        make_synthetic_set(train_dir, **DEMO_TRAIN)
    elif bar is not None:
        bar.skip("scenes")
    if bar is not None:
        bar.begin("train")
    echo(f"training {DEMO_ARCH} on them (first run only; a few minutes on a laptop CPU)")

    def on_batch(done: int, total: int) -> None:
        if bar is not None:
            epochs = DEMO_FIT["epochs"]
            bar.advance(done / total, f"epoch {min(done * epochs // total + 1, epochs)}/{epochs}")

    train(train_dir, arch=DEMO_ARCH, out=ckpt, log=lambda m: echo("  " + m), on_batch=on_batch,
          **DEMO_FIT)
    return ckpt


def json_finished(state: Path) -> bool:
    """A finished training run leaves a tensor-free record (see pipeline.training.train)."""
    import torch

    try:
        record = torch.load(state, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable state: train again
        return False
    return bool(isinstance(record, dict) and record.get("model") is None
                and record.get("checkpoint_sha256"))


def write_demo_spec(root: Path, checkpoint: Path) -> Path:
    """DIR/job.toml: the demo's run as a job spec (paths relative to it, so the command the
    demo prints works from any folder)."""
    spec_file = root / "job.toml"
    spec_file.write_text(
        "# Written by `drn-label demo`; label its sample images again (nothing twice) with\n"
        f"#   drn-label run --job {shlex.quote(str(spec_file))}\n"
        "# Paths are relative to this file.\n"
        f'input = "images"\noutput = "out"\nmodel = "{DEMO_ARCH}"\n'
        f'weights = {json.dumps(checkpoint.name)}\nbatch_size = 4\nrows_per_file = 100\n')
    return spec_file


def _demo_steps(root: Path, count: int, bar: DemoBar, message: Callable[[str], None]):
    """The demo's work, step by step (`root` is absolute)."""
    from pipeline.job.progress import Progress
    from pipeline.job.run import run_job
    from pipeline.spec import load_spec
    from pipeline.tools.evaluate import evaluate_output
    from pipeline.training.synth import make_synthetic_set

    root.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(root, message, bar)
    if len(list((root / "images").glob("*.png"))) != count:
        bar.begin("samples")
        message(f"writing {count} sample images to {root / 'images'} (ground truth in {root / 'masks'})")
        make_synthetic_set(root, count=count, **DEMO_SAMPLES)
    else:
        bar.skip("samples")
    spec_file = write_demo_spec(root, ckpt)
    spec = load_spec(spec_file)
    bar.begin("label", "starting Ray, loading the model")

    def show(p: Progress, final: bool) -> None:
        if p.total:
            bar.advance(p.labelled / p.total, f"{p.labelled}/{p.total}", p.eta_s)

    result = run_job(spec, echo=message, show=show)
    bar.begin("score")
    scores = evaluate_output(spec.output, root)
    return result, scores, Path(spec.output), spec_file


def run_demo(root: Path, count: int, *, echo: Callable[[str], None] = print,
             echo_err: Callable[[str], None] | None = None, stream: TextIO | None = None) -> None:
    """Label `count` sample images with a trained DRN on an embedded local Ray, and score them.

    Progress is one bar for the whole demo on `stream` (stderr), with messages above it
    (`echo_err`, when given, prints them instead)."""
    from pipeline.store.output import DATA_DIR, STATE_DIR

    root = root.absolute()  # every path the demo prints works from any folder
    with DemoBar(demo_steps(count), stream) as bar:
        result, scores, out, spec_file = _demo_steps(root, count, bar, echo_err or bar.message)
    echo(result.summary())
    echo(f"agreement with the ground truth: mIoU {scores['miou']:.3f}, pixel accuracy "
               f"{scores['pixel_accuracy']:.3f} over {scores['images_evaluated']} images")
    echo(json.dumps(scores["per_class"], indent=None))
    q = shlex.quote
    echo(f"""
The labels are in {out}/{DATA_DIR}/ (Parquet files only; progress and run records are in {out}/{STATE_DIR}/). Try, from any folder:
  drn-label inspect {q(str(out))}
  drn-label status {q(str(out))}
  python -c "import duckdb; print(duckdb.sql(\\"SELECT image_id, confidence, class_fraction FROM read_parquet('{out}/{DATA_DIR}/*.parquet') ORDER BY confidence LIMIT 5\\"))"
  python -c "import pandas as pd; print(pd.read_parquet('{out}/{DATA_DIR}')[['image_id', 'status', 'confidence']].head())"
  drn-label report {q(str(out))} --html {q(str(root / 'report.html'))}
Rerun `drn-label demo` (or `drn-label run --job {q(str(spec_file))}`): nothing is labelled twice.""")
