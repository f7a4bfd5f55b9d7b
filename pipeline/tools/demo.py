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
from pathlib import Path
from typing import Callable


# Training recipe measured on a 2-core CPU (see docs/benchmarks.md): a few minutes.
DEMO_ARCH = "drn_d_22"
DEMO_TRAIN = {"count": 300, "size": 128, "seed": 0}
DEMO_SAMPLES = {"size": 128, "seed": 1}
DEMO_FIT = {"epochs": 20, "batch_size": 8, "size": 64, "lr": 0.05, "scale_range": (0.5, 1.5)}


def ensure_checkpoint(root: Path, echo: Callable[[str], None] = print) -> Path:
    """Train the demo model once; later calls return the cached checkpoint."""
    from pipeline.training.synth import make_synthetic_set
    from pipeline.training.train import state_path, train

    ckpt = root / f"{DEMO_ARCH}-synthetic.pth"
    state = state_path(ckpt)
    if ckpt.exists() and state.exists() and json_finished(state):
        return ckpt
    train_dir = root / "train"
    if not (train_dir / "classes.json").exists():
        echo(f"writing {DEMO_TRAIN['count']} synthetic training scenes to {train_dir}")
        make_synthetic_set(train_dir, **DEMO_TRAIN)
    echo(f"training {DEMO_ARCH} on them (first run only; a few minutes on a laptop CPU)")
    train(train_dir, arch=DEMO_ARCH, out=ckpt, log=lambda m: echo("  " + m), **DEMO_FIT)
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


def run_demo(root: Path, count: int, *, echo: Callable[[str], None] = print,
             echo_err: Callable[[str], None] = print) -> None:
    """Label `count` sample images with a trained DRN on an embedded local Ray, and score them."""
    from pipeline.tools.evaluate import evaluate_output
    from pipeline.job.run import run_job
    from pipeline.spec import load_spec
    from pipeline.store.output import DATA_DIR, STATE_DIR
    from pipeline.training.synth import make_synthetic_set

    root = root.absolute()  # every path the demo prints works from any folder
    root.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(root, echo)
    if len(list((root / "images").glob("*.png"))) != count:
        echo(f"writing {count} sample images to {root / 'images'} (ground truth in {root / 'masks'})")
        make_synthetic_set(root, count=count, **DEMO_SAMPLES)
    spec_file = write_demo_spec(root, ckpt)
    spec = load_spec(spec_file)
    out = Path(spec.output)
    result = run_job(spec, echo=lambda m: echo_err(m))
    echo(result.summary())
    scores = evaluate_output(str(out), root)
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
